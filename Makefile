# Two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SOURCES := ndot_core service clients tests benchmarks
# torch is installed first and pinned, so the range in pyproject.toml pulls nothing bigger.
# TORCH_INDEX_URL empty (default): pip's own index. On an ordinary x86_64 Linux machine that is the
# CUDA build (several GB); on the project's build machines pip finds the CPU wheel on local disk.
# For the CPU-only build anywhere: make TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=

.PHONY: install test demo lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q -e '.[dev]' $(TORCH_SPEC)  # torch again: no dev dep may upgrade it
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)

format: $(STAMP)
	$(VENV)/bin/ruff format $(SOURCES)
	$(VENV)/bin/ruff check --fix $(SOURCES)

demo: $(STAMP)
	$(PY) -m clients.demo

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_events.py
	$(PY) benchmarks/bench_service.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
