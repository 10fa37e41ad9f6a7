# Every target sets up .venv first, so `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
# For the HF integration's tests (accelerate: transformers' Trainer; peft: the LoRA tests): the versions
# they were run with.
TRANSFORMERS_VERSION ?= 5.23.0
ACCELERATE_VERSION ?= 1.16.0
PEFT_VERSION ?= 0.21.2
# Where a CUDA toolkit is installed, the extension is built with its CUDA kernels (compiled and
# linked even on a machine without a GPU); torch's builder needs CUDA_HOME to find libcudart.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
export MAX_JOBS ?= 2
DEPS := $(VENV)/.deps-$(TORCH_VERSION)
PYTEST_ARGS ?=

.PHONY: all build test test-fast demo bench check info lint clean

all: build

$(DEPS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)" triton ninja pybind11 "setuptools>=77" wheel \
		pytest hypothesis pyyaml numpy matplotlib tqdm
	$(PY) -m pip install --quiet "transformers==$(TRANSFORMERS_VERSION)" "accelerate==$(ACCELERATE_VERSION)" \
		"peft==$(PEFT_VERSION)"
	FUSEDLOSS_NO_EXT=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

# Incremental (ninja): only changed sources recompile. Quiet: the compiler's output goes to
# build/build.log, printed only when the build fails.
BUILD_LOG := build/build.log
build: $(DEPS)
	@mkdir -p build
	@echo "building the extension (log: $(BUILD_LOG))"
	@$(PY) setup.py --quiet build_ext --inplace > $(BUILD_LOG) 2>&1 || { cat $(BUILD_LOG); echo "build failed (log: $(BUILD_LOG))"; exit 1; }

# The whole suite: the Triton kernels run on CPU tensors under Triton's interpreter. The cpu and
# triton backends must run here: if either cannot, its tests fail instead of skipping.
TEST_ENV := TRITON_INTERPRET=1 FUSEDLOSS_REQUIRE_BACKENDS=cpu,triton
test: build
	$(TEST_ENV) $(PY) -m pytest -q -ra -p no:cacheprovider --durations=15 $(PYTEST_ARGS) tests

test-fast: build
	$(TEST_ENV) $(PY) -m pytest -q -ra -p no:cacheprovider --durations=15 -m "not slow" $(PYTEST_ARGS) tests

demo: build
	$(PY) -m fusedloss demo

bench: build
	$(PY) -m fusedloss bench

check: build
	$(PY) -m fusedloss check

info: build
	$(PY) -m fusedloss info

clean:
	rm -rf build fusedloss/*.so *.egg-info
