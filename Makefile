# make setup: create or update .venv;  make demo: train crystal-tiny on CPU;  make test: the test suite.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# The CPU build of torch: on these machines pip finds it on disk; set-up never asks for a CUDA wheel
# where there is no GPU. On a GPU machine, install the torch you want first and run `make setup TORCH=`.
TORCH   ?= torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

demo: setup
	bash examples/demo.sh $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) runs
