# Fender developer commands. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint schema install clean soak bench bench-instructions bench-streams docs mutate

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Start Fender on the example policy together with its demo upstreams.
run: $(STAMP)
	$(BIN)/fender demo policies/example.yaml

## Run the whole test suite.
test: $(STAMP)
	$(BIN)/python -m pytest -q

## Soak: 15 minutes of mixed traffic and switching upstream faults against a Fender subprocess;
## reports RSS slope, fd count and errors (tests/soak/last.json). Not part of `make test`.
## Shorter: make soak MINUTES=2
soak: $(STAMP)
	$(BIN)/python tests/soak/run.py $(if $(MINUTES),--minutes $(MINUTES))

## Mutation check: breaks each rule in tests/mutate/run.py's list (in a throwaway copy of the tree)
## and runs the test files that should catch it; prints caught/missed. Not part of `make test`.
## Some: make mutate MUTATIONS="vary-ignored budget-deposits"; the list: make mutate MUTATIONS=--list
mutate: $(STAMP)
	$(BIN)/python tests/mutate/run.py $(MUTATIONS)

## Style (ruff), the dependency direction (import-linter contracts in pyproject.toml) and types (mypy,
## strict on proxy/kernel, proxy/cluster and proxy/policies). .ci/run runs it before the tests.
lint: $(STAMP)
	$(BIN)/ruff check proxy tests
	$(BIN)/ruff format --check proxy tests
	$(BIN)/lint-imports
	$(BIN)/mypy

## Regenerate policies/schema.json, docs/reference.md (from the policy models) and docs/index.md (from the README).
schema: $(STAMP)
	$(BIN)/python -m proxy.docs --write

## The documentation site (MkDocs, material theme) into site/; --strict fails on broken links and pages.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache

## Data-path benchmark: Fender vs direct vs nginx vs the Python server's ceiling, in one
## interleaved run (wrk and nginx when installed, bundled fallbacks otherwise). Prints a table
## and the change against tests/bench/baseline.json; writes tests/bench/last.json.
## Options: make bench BENCH_ARGS="--seconds 10 --rounds 5 --million"
bench: $(STAMP)
	$(BIN)/python tests/bench/run.py $(BENCH_ARGS)
	$(BIN)/python tests/bench/streams.py $(STREAMS_ARGS)
	$(BIN)/python tests/bench/tracing.py $(TRACING_ARGS)
	$(BIN)/python tests/bench/hedge.py $(HEDGE_ARGS)
	$(BIN)/python tests/bench/dns_replicas.py $(DNS_ARGS)
	$(BIN)/python tests/bench/http2.py $(HTTP2_ARGS)
	$(BIN)/python tests/bench/grpc.py $(GRPC_ARGS)
	$(BIN)/python tests/bench/tls.py $(TLS_ARGS)

## Only the streaming rows of `make bench`: SSE write-to-read latency at 100 events/s and WebSocket
## echo through 1 and 50 tunnels, Fender vs direct vs nginx (proxy_buffering off). Writes
## tests/bench/last-streams.json. FENDER_BENCH_NO_PIN=1 lets the scheduler place the processes.
bench-streams: $(STAMP)
	$(BIN)/python tests/bench/streams.py $(STREAMS_ARGS)

## Instructions per request (valgrind's callgrind): pass-through, every policy, cache hit, and
## their ratios; then pass-through without tracing and with tracing at 0%, 1% and 100% sampling
## (tests/bench/tracing.py --instructions). Deterministic where `make bench` moves with the machine.
## Needs valgrind. Options: make bench-instructions INSTRUCTIONS_ARGS="--requests 5000"
bench-instructions: $(STAMP)
	$(BIN)/python tests/bench/instructions.py $(INSTRUCTIONS_ARGS)
	$(BIN)/python tests/bench/tracing.py --instructions $(INSTRUCTIONS_ARGS)
