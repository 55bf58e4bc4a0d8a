#!/usr/bin/env bash
# The commands that build kproxy's container image, kept in one place so that the Dockerfile and
# CI run the same ones: the Dockerfile calls each step, and tests/deploy.rs runs `build` and
# `check` natively (there is no Docker engine in CI) and checks the package lists against what
# the binary really links.
#
#   build-steps.sh build-deps          Debian packages to compile kproxy (builder stage)
#   build-steps.sh build OUT_DIR       cargo build, then OUT_DIR/kproxy without debug info
#   build-steps.sh runtime-deps        Debian packages kproxy needs at run time (runtime stage)
#   build-steps.sh check BINARY        every shared library resolves and the binary runs
#   build-steps.sh packages build|runtime   print a package list, one per line
#
# Environment: KPROXY_PROFILE (cargo profile, default release), CARGO_TARGET_DIR (default target),
# KPROXY_CARGO_FLAGS (extra cargo build flags; CI's test passes make test's own, to reuse its
# artifacts), APT_SIMULATE=1 (apt-get -s: resolve the packages without installing, no root needed).
set -euo pipefail

# Headers and pkg-config files for the nftnl and mnl crates (libnftnl >= 1.2.4, libmnl >= 1.0.4:
# bookworm has 1.2.4 and 1.0.4).
BUILD_PACKAGES=(libnftnl-dev libmnl-dev pkg-config)
# What the binary links besides glibc (tests/deploy.rs checks this list against ldd), the iptables
# binaries for iptables mode, and CA certificates. No nft CLI: kproxy speaks netlink itself. TLS is
# rustls, so no OpenSSL.
RUNTIME_PACKAGES=(libnftnl11 libmnl0 iptables ca-certificates)

apt_install() {
    if [ "${APT_SIMULATE:-0}" = 1 ]; then
        apt-get -s -qq install --no-install-recommends "$@" >/dev/null
        echo "apt-get would install: $*"
        return
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    rm -rf /var/lib/apt/lists/*
}

step="${1:-}"
case "$step" in
build-deps)
    apt_install "${BUILD_PACKAGES[@]}"
    ;;
runtime-deps)
    apt_install "${RUNTIME_PACKAGES[@]}"
    ;;
build)
    out="${2:?usage: build-steps.sh build OUT_DIR}"
    profile="${KPROXY_PROFILE:-release}"
    target="${CARGO_TARGET_DIR:-target}"
    # --locked: exactly the Cargo.lock that CI tested.
    # shellcheck disable=SC2086 # KPROXY_CARGO_FLAGS is a list of flags
    cargo build --locked --profile "$profile" --bin kproxy ${KPROXY_CARGO_FLAGS:-}
    case "$profile" in
    dev | test) dir=debug ;;
    bench) dir=release ;;
    *) dir="$profile" ;;
    esac
    mkdir -p "$out"
    # The release profile keeps line tables for profiling (debug = 1); the image does not need
    # them (about 5x smaller). Symbols stay, so backtraces still name functions.
    objcopy --strip-debug "$target/$dir/kproxy" "$out/kproxy"
    echo "built $out/kproxy ($profile)"
    ;;
check)
    bin="${2:?usage: build-steps.sh check BINARY}"
    if ldd "$bin" | grep -q 'not found'; then
        ldd "$bin" >&2
        echo "check: $bin has unresolved shared libraries" >&2
        exit 1
    fi
    "$bin" --version
    ;;
packages)
    case "${2:-}" in
    build) printf '%s\n' "${BUILD_PACKAGES[@]}" ;;
    runtime) printf '%s\n' "${RUNTIME_PACKAGES[@]}" ;;
    *) echo "usage: build-steps.sh packages build|runtime" >&2; exit 2 ;;
    esac
    ;;
*)
    sed -n '2,16p' "$0" >&2
    exit 2
    ;;
esac
