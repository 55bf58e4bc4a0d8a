# Two commands do everything on a fresh Debian machine, as root:
#   make demo   builds kproxy and runs it on the bundled example cluster in throwaway namespaces
#   make test   runs the whole test suite (unit, golden, netlink, real packets in namespaces)
# Each first installs the Debian packages it needs.

SHELL := /bin/bash
# What building and the demo need; the test suite adds promtool (prometheus), headless chromium
# for the status-page test, pip for kubernetes-validate and shellcheck for the scripts.
BUILD_PACKAGES := libnftnl-dev libmnl-dev pkg-config nftables iptables iproute2 python3 curl build-essential
TEST_PACKAGES := $(BUILD_PACKAGES) python3-pip shellcheck socat conntrack prometheus chromium
APT_PACKAGES ?= $(TEST_PACKAGES)
CARGO ?= cargo

.PHONY: all deps deps-build build demo test bench

all: build

# Install what is missing (only as root; otherwise just say what is missing).
deps-build:
	@$(MAKE) --no-print-directory deps APT_PACKAGES="$(BUILD_PACKAGES)" SKIP_PIP=1

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages (run as root to install):$$missing"; fi; \
	fi
	@[ -n "$(SKIP_PIP)" ] || python3 -c 'import kubernetes_validate' 2>/dev/null || { \
	  echo "installing kubernetes-validate (PyPI): tests/deploy.rs validates deploy/ against the Kubernetes schemas"; \
	  python3 -m pip install --quiet kubernetes-validate 2>/dev/null || \
	  python3 -m pip install --quiet --break-system-packages kubernetes-validate; }
	@command -v $(CARGO) >/dev/null 2>&1 || { \
	  echo "cargo not found: installing the Rust toolchain with rustup"; \
	  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal && . "$$HOME/.cargo/env"; }

build: deps-build
	$(CARGO) build --release --bin kproxy

demo: build
	KPROXY_BIN=target/release/kproxy scripts/demo.sh

test: deps
	$(CARGO) build --workspace --all-targets
	$(CARGO) bench -p rules --no-run
	$(CARGO) test --workspace --no-fail-fast 2>&1 | tee target/test.log; exit $${PIPESTATUS[0]}

# The scale benchmark of issue 6 (bench/README.md): appends a dated section to bench/RESULTS.md
# and writes bench/results.png and bench/results-raw.txt. Sizes: SIZES, DP_SIZES (see bench/run.sh).
bench: deps
	@python3 -c 'import matplotlib' 2>/dev/null || { \
	  echo "installing matplotlib (PyPI): bench/report.py plots bench/results.png"; \
	  python3 -m pip install --quiet matplotlib 2>/dev/null || \
	  python3 -m pip install --quiet --break-system-packages matplotlib; }
	$(CARGO) build --release -p kproxy -p kproxy-bench
	OUT=bench/out bench/run.sh
	cp bench/out/raw.txt bench/results-raw.txt
	python3 bench/report.py bench/results-raw.txt bench/results.png > bench/out/section.md
	{ echo; cat bench/out/section.md; } >> bench/RESULTS.md
