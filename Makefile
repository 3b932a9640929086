# Two commands do all the set-up on a fresh machine:
#   make quickstart   # venv + install + simulate small -> train -> export -> serve -> rank
#   make test         # venv + install + the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build: an unpinned torch would pull several GB of CUDA packages.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: quickstart test venv protos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

quickstart: venv
	$(BIN)/recstack quickstart

test: venv
	$(BIN)/python -m pytest -q

protos: venv
	$(BIN)/python tools/gen_protos.py

clean:
	rm -rf $(VENV) runs .pytest_cache
