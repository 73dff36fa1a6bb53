# deltaops: `make demo` and `make test` set everything up on a fresh machine.
#
#   make setup   virtual environment (.venv) with torch and the test peers
#   make build   (re)build the C++ extension into the editable install
#   make test    the whole suite (CPU kernels, Triton under TRITON_INTERPRET=1,
#                peers), failing if the CPU kernels or Triton are not usable
#   make demo    the main job on a generated model family: merge it with a shipped
#                example config, compress and re-apply a delta
#   make bench   the microbenchmarks of every op family (CSV, PNG and a markdown
#                table each in bench/results); `make bench-checkpoint` times whole
#                checkpoint merges against mergekit-yaml (a 1B-parameter family)
#   make cuda    prove the CUDA sources compile (torch CUDA build in .venv-cuda)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
JOBS ?= 2
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: setup build test demo bench bench-checkpoint cuda clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$(JOBS) $(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import deltaops._C" || (echo "the CPU extension did not build: see the output above" && exit 1)
	touch $@

setup: $(VENV)/.deps
build: $(VENV)/.built

test: build
	TRITON_INTERPRET=1 DELTAOPS_REQUIRE=cpu,triton $(PY) -m pytest -q tests

demo: build
	$(PY) -m deltaops info
	$(PY) -m deltaops demo

bench: build
	for family in sparse merge quant lowrank; do $(PY) bench/$$family.py || exit 1; done

bench-checkpoint: build
	$(PY) bench/checkpoint.py

cuda:
	bash .ci/cuda_build.sh

clean:
	rm -rf build python/deltaops/*.so $(VENV) .venv-cuda
