# optserve: `make demo` and `make test` each work from a fresh clone (they install .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned, so pip takes the CPU build on disk instead of fetching a CUDA one;
# override for another build, e.g. make install TORCH_SPEC='torch==2.11.0'.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench proto clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/optserve demo

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# About 3-10 minutes here; `make bench ARGS=--quick` runs a reduced set in under 2 minutes.
bench: install
	$(PY) bench/run.py $(ARGS)

proto: install
	$(PY) proto/generate.py

clean:
	rm -rf $(VENV) demo-out build *.egg-info

# docker/compose.yaml end to end (docker/compose_test.sh says what it does): builds the image,
# runs 2 shards + 2 workers, restarts a shard mid-run, TLS too; installs/starts docker if needed.
.PHONY: compose-test
compose-test:
	bash docker/compose_test.sh

# docker/stack.yaml on a single-node Docker Swarm (docker/swarm_test.sh says what it does): builds the
# image, deploys 2 shards + 2 workers, moves a shard's task mid-run; makes and leaves the swarm.
.PHONY: swarm-test
swarm-test:
	bash docker/swarm_test.sh
