# The README's two commands: `make demo` (install + main job) and `make test` (install + tests).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARCH   := $(shell uname -m)
# torch builds on this machine's disk: pip takes them locally, no download
ifeq ($(ARCH),aarch64)
TORCH  ?= torch==2.9.1 torchvision==0.24.1
else
TORCH  ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install ext ext-cuda cuda-check demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	# torchattacks pins an old requests that would downgrade other packages: no deps (it needs none here)
	$(PY) -m pip install -q --no-deps torchattacks==3.5.1
	touch $(STAMP)

# optional compiled ops (C++ / OpenMP on the CPU): nsvit_fast/_C*.so, picked up by nsvit_fast.ops
EXT := $(VENV)/.ext-built
ext: $(EXT)
$(EXT): $(STAMP) csrc/ops.cpp csrc/ops.h setup.py
	NSVIT_BUILD_EXT=cpu $(PY) setup.py -q build_ext --inplace
	touch $(EXT)

# the same with the CUDA sources, for a machine with a GPU (then run bench/gpu_report.py)
ext-cuda: $(STAMP)
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} NSVIT_BUILD_EXT=cuda $(PY) setup.py -q build_ext --inplace

# compile the CUDA sources too (nothing runs them on a CPU machine); the result stays in build/cuda
cuda-check: $(STAMP)
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"} \
	NSVIT_BUILD_EXT=cuda $(PY) setup.py -q build_ext --build-lib build/cuda --build-temp build/cuda-tmp

demo: $(STAMP)
	$(VENV)/bin/nsvit-fast demo --out runs/demo

# builds the C++ extension first, so its tests run (and must: NSVIT_REQUIRE_EXT); the Triton tests
# (interpreter on the CPU, kernels on CUDA) and the sm_80 / sm_90 AOT compile must run too
test: $(STAMP) $(EXT)
	NSVIT_REQUIRE_EXT=1 NSVIT_REQUIRE_TRITON=1 $(PY) -m pytest -q

# the benchmarks (idle machine please): results in bench/results/ (ops: bench/results/<device>/);
# on a GPU machine, after make ext-cuda: $(PY) bench/gpu_report.py
bench: $(STAMP) $(EXT)
	$(PY) bench/bench_ops.py
	$(PY) bench/bench_synth.py
	$(PY) bench/bench_finetune.py

clean:
	rm -rf runs build *.egg-info .pytest_cache nsvit_fast/_C*.so
