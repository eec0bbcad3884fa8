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

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	# torchattacks pins an old requests that would downgrade other packages: no deps (it needs none here)
	$(PY) -m pip install -q --no-deps torchattacks==3.5.1
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nsvit-fast demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs build *.egg-info .pytest_cache
