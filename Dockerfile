# syntax=docker/dockerfile:1
# kproxy's image: built in rust:1-bookworm, run on debian:bookworm-slim with only the libraries it
# links (libnftnl, libmnl), the iptables binaries for iptables mode, and CA certificates.
# Every build command is a step of deploy/image/build-steps.sh, which CI also runs (tests/deploy.rs).
#   docker build -t ghcr.io/kproxy/kproxy:0.1.0 .
# The tag is a placeholder: use your own registry until images are published.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY deploy/image/build-steps.sh /usr/local/bin/build-steps.sh
RUN build-steps.sh build-deps
COPY . .
# The caches only speed up rebuilds; the result is the same without BuildKit's cache mounts.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    build-steps.sh build /out

FROM debian:bookworm-slim
COPY deploy/image/build-steps.sh /usr/local/bin/build-steps.sh
COPY --from=build /out/kproxy /usr/local/bin/kproxy
RUN build-steps.sh runtime-deps \
    && build-steps.sh check /usr/local/bin/kproxy \
    && rm /usr/local/bin/build-steps.sh
# Root uid on purpose, with the capabilities cut down by the pod spec (deploy/base/daemonset.yaml:
# drop ALL, add NET_ADMIN and NET_RAW, no privilege escalation). nftables needs CAP_NET_ADMIN in the
# host's network namespace; a non-root user could only get it from file capabilities on the binary,
# which the kernel ignores under no_new_privs (allowPrivilegeEscalation: false), so running
# non-root would mean allowing privilege escalation: a worse trade for the same capabilities.
USER 0:0
ENTRYPOINT ["/usr/local/bin/kproxy"]
