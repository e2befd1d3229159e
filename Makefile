# The single entry point: `make run` (demo) and `make test` each set up what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_DIR := protos
PROTOS := $(wildcard $(PROTO_DIR)/neurodissect/v1/*.proto)
BENCH ?=

.PHONY: setup system-deps run test fuzz lint proto bench clean readme-figures toy-models test-recipes

setup: $(STAMP) system-deps

# promtool (Debian's prometheus package) checks the shipped scrape config and alert rules;
# Debian's chromium drives the web UI tests (through Playwright, which downloads no browser).
system-deps:
	@{ command -v promtool && command -v chromium; } >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		prometheus chromium >/dev/null; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

proto: setup
	$(BIN)/python -m grpc_tools.protoc -I $(PROTO_DIR) \
		--python_out=$(PROTO_DIR) --pyi_out=$(PROTO_DIR) --grpc_python_out=$(PROTO_DIR) $(PROTOS)

run: setup
	$(BIN)/neurodissect demo

# The README's demo figures, from a demo run (a test checks they equal what `make run` prints).
readme-figures: setup
	$(BIN)/neurodissect demo --readme README.md

# Retrain the shipped toy models (toynet, tiny CLIP, toy captioner); then `make readme-figures`.
toy-models: setup
	$(BIN)/neurodissect toyworld train

test: setup
	$(BIN)/python -m pytest -q -m "not recipes"

# The toy models' recipes retrained with other seeds must reach the same aims.
test-recipes: setup
	$(BIN)/python -m pytest -q -m recipes

# The fuzzers (Hypothesis) with a long random budget; `make test` runs a small fixed one.
fuzz: setup
	NEURODISSECT_FUZZ_PROFILE=long $(BIN)/python -m pytest -q \
		tests/integration/test_gateway_fuzz.py tests/unit/gateway/test_spec_file_fuzz.py

lint: setup
	$(BIN)/ruff check services tests bench
	$(BIN)/mypy services

bench: setup
	$(BIN)/python -m bench $(if $(BENCH),--only $(BENCH),)

clean:
	rm -rf var/store var/bench
