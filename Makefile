# The two commands of the README:
#   make bench   sets everything up, then runs `fastmeta bench` on the CPU
#   make test    sets everything up, then runs the test suite
# Set-up: a virtual environment in .venv, PyTorch pinned (override with
# TORCH_SPEC), the other dependencies, and fastmeta built against that PyTorch.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
SOURCES := $(shell find csrc fastmeta -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml

.PHONY: install bench test lint format wheel wheel-check cuda-check cuda-glue-check cuda-emulate gpu clean

install: $(VENV)/.installed

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet numpy pybind11 ninja setuptools wheel pytest pytest-benchmark hypothesis pillow matplotlib tqdm \
	    ruff==0.17.6 clang-format==19.1.7
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-$$(nproc)} $(BIN)/python -m pip install --no-build-isolation --no-deps -e .
	touch $@

bench: install
	$(BIN)/fastmeta bench --device cpu

# The op and model tests again with fastmeta's, PyTorch's, MKL's and oneDNN's
# kernels capped to AVX2, as an AVX2-only machine runs them.
AVX2_ONLY := FASTMETA_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
OP_AND_MODEL_TESTS := $(addprefix tests/ops/test_,metric_ops.py class_prototypes.py contrastive_loss.py \
	mann_memory.py matching_attention_lstm.py relation_pair_pool.py random_shapes.py) tests/nn tests/algorithms

# The tests read the Omniglot subsets of the shared folder beside the checkout.
test: export FASTMETA_DATA ?= $(abspath ../shared/data)
test: install
	$(BIN)/python -m pytest -q tests
	$(AVX2_ONLY) $(BIN)/python -m pytest -q $(OP_AND_MODEL_TESTS)

# A wheel with the compiled kernels, in dist/; wheel-check installs it into a
# fresh virtual environment outside the checkout, with its runtime
# dependencies only, and runs fastmeta from there.
WHEEL_CHECK_DIR ?= /tmp/fastmeta-wheel-check

wheel: install
	rm -rf dist
	$(BIN)/python -m pip wheel --quiet --no-build-isolation --no-deps --wheel-dir dist .

wheel-check: wheel
	rm -rf $(WHEEL_CHECK_DIR)
	$(PYTHON) -m venv $(WHEEL_CHECK_DIR)
	$(WHEEL_CHECK_DIR)/bin/python -m pip install --quiet "$(TORCH_SPEC)" dist/fastmeta-*.whl
	cd $(WHEEL_CHECK_DIR) && bin/fastmeta info && bin/python $(abspath tests/wheel_smoke.py)

# Lint and formatting: ruff for the Python, clang-format for the C++ and CUDA
# (pyproject.toml's [tool.ruff], .clang-format); `make format` applies both.
CPP_SOURCES = $(shell find csrc cuda_emulation -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

lint: $(VENV)/.deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/clang-format --dry-run --Werror $(CPP_SOURCES)

format: $(VENV)/.deps
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/clang-format -i $(CPP_SOURCES)

# Compile-checks the CUDA kernels with nvcc for sm_80 and sm_90, without PyTorch.
cuda-check:
	cmake -S . -B build/cuda-check -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cuda-check --parallel

# Syntax-checks the PyTorch-facing CUDA glue (csrc/cuda/*_glue.cpp) against
# the installed PyTorch's headers, on a machine without CUDA PyTorch: a CPU
# wheel lacks one generated CUDA header, stubbed here as empty.
cuda-glue-check: install
	mkdir -p build/glue-stub/c10/cuda/impl
	touch build/glue-stub/c10/cuda/impl/cuda_cmake_macros.h
	TORCH_INC=$$($(BIN)/python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))"); \
	PY_INC=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['include'])"); \
	for glue in csrc/cuda/*_glue.cpp; do \
	    $${CXX:-g++} -std=c++20 -fsyntax-only -Wall -Ibuild/glue-stub $$TORCH_INC -I$$PY_INC \
	      -I$${CUDA_HOME:-/usr/local/cuda}/include $$glue || exit 1; \
	  done

# Runs the CUDA kernels on the CPU under the emulation layer (cuda_emulation/):
# each test program plain, under ASan + UBSan and under TSan. CSRC=DIR tests the
# kernels of another copy of csrc/ (one with a planted bug, say).
cuda-emulate:
	cuda_emulation/run $(CSRC)

# On a machine with a GPU: build, CUDA tests, CUDA benchmarks, compute-sanitizer.
gpu:
	bash benchmarks/gpu_run.sh

clean:
	rm -rf build $(VENV) fastmeta/*.so fastmeta/_build_config.py *.egg-info
