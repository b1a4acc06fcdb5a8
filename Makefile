# Everything a fresh machine needs: `make demo` and `make test` do all the set-up themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on local disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.8.0
NVCC ?= $(shell command -v nvcc 2>/dev/null)
OUT ?= demo_out

.PHONY: install demo test test-fast lint bench check-cuda build clean

$(VENV)/.installed: pyproject.toml setup.py CMakeLists.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) $(TRITON_PIN)
	$(PY) -m pip install -q "setuptools>=64" wheel cmake ninja "pybind11>=2.10"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

install: $(VENV)/.installed

build: install
	$(PY) setup.py build_ext --inplace

demo: install
	$(PY) -m cpsample_fast demo --out $(OUT)

# Two xdist workers, one thread each (two 2-thread torch processes on 2 cores run ~10x slower).
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 -q tests

test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 -q -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m cpsample_fast bench --out benchmarks/results
	$(PY) -m pytest benchmarks --benchmark-enable --benchmark-only -q

# Compile-check the torch-free CUDA kernels (nothing built here runs without a GPU).
check-cuda:
	@if [ -z "$(NVCC)" ]; then echo "check-cuda: nvcc not found, skipped"; exit 0; fi; \
	for f in csrc/cuda/*.cu; do \
	  echo "nvcc -arch=sm_90 -c $$f"; \
	  $(NVCC) -std=c++17 -arch=sm_90 -O3 -lineinfo -Icsrc -c $$f -o /tmp/$$(basename $$f).o || exit 1; \
	done

clean:
	rm -rf build dist *.egg-info cpsample_fast/_C*.so
