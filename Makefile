# Every target installs what it needs into .venv first, so a fresh clone needs only `make`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SEEDS ?= 1000
DURATION ?= 300
SEED ?= 1
NODES ?= 3
RETENTION ?= 0
PROTOS := src/dcl/api/log/v1/log.proto $(wildcard src/dcl/api/dcl/v1/*.proto)

.PHONY: run test lint proto sim chaos bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/dcl dev

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy src/dcl tests bench

test: lint
	$(VENV)/bin/pytest -q

proto: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m grpc_tools.protoc -I src --python_out=src --pyi_out=src --grpclib_python_out=src $(PROTOS)

sim: $(STAMP)
	$(PY) -m tests.sim --seeds $(SEEDS)

# Jepsen-style run against a real cluster: make chaos DURATION=1800 SEED=3 [NODES=5]
# [RETENTION=bytes of commit log each node keeps]
chaos: $(STAMP)
	$(PY) -m tests.chaos --duration $(DURATION) --seed $(SEED) --nodes $(NODES) \
		--retention-bytes $(RETENTION)

bench: $(STAMP)
	$(PY) bench/storage.py
	$(PY) bench/raft_core.py
	$(PY) bench/cluster.py
	$(PY) bench/floor.py
	$(PY) bench/catchup.py
	$(PY) bench/loaded.py
	$(PY) bench/tail.py
	$(PY) bench/metrics.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
