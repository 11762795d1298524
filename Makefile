# Two commands on a fresh machine with Python 3.10+:  make run   |   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUM    := $(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
STAMP  := $(VENV)/.installed-$(SUM)
TSTAMP := $(VENV)/.installed-test-$(SUM)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test test-slow test-all bench clean

setup: $(STAMP)

$(STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is needed")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[ml,curation]'
	rm -f $(VENV)/.installed-* && touch $@

# the tests also need the optional extras (Ray) and the test tools
$(TSTAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[ml,curation,ray,test]'
	touch $@

run: $(STAMP)
	$(BIN)/recipe run recipes/micro_code.yaml

test: $(TSTAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu and not distributed"

test-slow: $(TSTAMP)
	$(BIN)/python -m pytest -m "slow and not gpu"

test-all: $(TSTAMP)
	$(BIN)/python -m pytest -m "not gpu"

bench: $(STAMP)
	$(BIN)/python bench/micro_code.py

clean:
	rm -rf $(VENV) recipe_store .pytest_cache
