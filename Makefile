# One command sets up and runs the demo; one sets up and runs the tests. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The versions this project is tested with; on this machine pip takes them from the local index.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-all clean

setup: $(VENV)/.installed

# setup.py also compiles hat/csrc into hat._C (C++ always, CUDA when nvcc is found): rebuilt when a source changes
$(VENV)/.installed: setup.py Makefile $(wildcard hat/csrc/*.* hat/csrc/*/*.*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet --no-build-isolation -e '.[dev]'
	touch $@

DEMO := $(PY) tools/train.py --config projects/digits/convnet.yaml --overwrite

demo: setup
	$(DEMO) --stage float
	$(DEMO) --stage calibration
	$(DEMO) --stage qat
	$(DEMO) --stage int_infer

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf work_dirs .pytest_cache
