# Fermion: `make serve` runs the gateway on the demo model, `make test` runs the checks.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STORE ?= model_store
HOST ?= 127.0.0.1
PORT ?= 8000
# API keys of `make serve` (hashes only); a fresh demo key is printed at each start.
KEYS ?= .fermion/keys.json

.PHONY: serve test lint typecheck imports pytest mutation bench demo clean system-deps protos

$(BIN)/.fermion-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[compile,ray,loadtest,test,fleet]'
	touch $@

demo: $(BIN)/.fermion-installed
	$(BIN)/fermion demo --store $(STORE) --if-missing

serve: demo
	$(BIN)/fermion serve --store $(STORE) --host $(HOST) --port $(PORT) \
		--keys-file $(KEYS) --demo-key demo

lint: $(BIN)/.fermion-installed
	$(BIN)/ruff check serving compilers model_store loadtest bench tests deploy
	$(BIN)/ruff format --check serving compilers model_store loadtest bench tests deploy

typecheck: $(BIN)/.fermion-installed
	$(BIN)/mypy serving compilers model_store loadtest bench tests deploy

# The layer contract of DESIGN.md ([tool.importlinter] in pyproject.toml).
imports: $(BIN)/.fermion-installed
	$(BIN)/lint-imports

pytest: $(BIN)/.fermion-installed system-deps
	$(BIN)/pytest

# System packages the tests use, from Debian, installed only when one is missing (apt-get as
# root, else through sudo): redis-server (the fleet tests start their own on a free port),
# Prometheus and promtool (deploy/prometheus rules and the dashboard's queries against a real
# scrape), Chromium (the load test report's charts in a real browser).
SYSTEM_COMMANDS := redis-server prometheus promtool chromium
SYSTEM_PACKAGES := redis-server prometheus chromium
system-deps:
	@missing=""; for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || missing=1; done; \
	[ -z "$$missing" ] || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		$$SUDO apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); }

test: lint typecheck imports pytest

# Mutation testing of the core modules by their own unit tests ([tool.mutmut] in
# pyproject.toml). A first run takes tens of minutes on 2 cores (most of it the batcher);
# results are kept in mutants/, so a rerun redoes only what changed (a change of the test
# selection in pyproject.toml starts afresh).
# `$(BIN)/mutmut show NAME` prints one survivor's diff.
mutation: $(BIN)/.fermion-installed
	$(BIN)/pip install --quiet 'mutmut==3.8.1'
	$(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results

# The V2 gRPC messages and service stubs in serving/grpc/_proto/ (see its README.md),
# generated from Triton's protos by the grpcio-tools pinned in the test extra: 1.80.0
# writes protobuf 6.31 code, which runs on protobuf 6 (tritonclient[grpc]) and 7.
PROTO := serving/grpc/_proto
protos: $(BIN)/.fermion-installed
	cd $(PROTO) && ../../../$(BIN)/python -m grpc_tools.protoc -I . --python_out=. \
		--pyi_out=. --grpc_python_out=. grpc_service.proto model_config.proto
	sed -i 's/^import \(model_config_pb2\|grpc_service_pb2\) as/from serving.grpc._proto import \1 as/' \
		$(PROTO)/grpc_service_pb2.py $(PROTO)/grpc_service_pb2.pyi $(PROTO)/grpc_service_pb2_grpc.py
	rm -f $(PROTO)/model_config_pb2_grpc.py

bench: demo
	bash bench/run.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
