# Two commands do all the set-up on a fresh machine:
#   make quickstart   # venv + install + simulate small -> train -> export -> serve -> rank
#   make test         # venv + install + the test suite
#   make test-shuffled  # the same in a random order (pytest-randomly; the seed is printed)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build: an unpinned torch would pull several GB of CUDA packages.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: quickstart test test-shuffled venv protos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

quickstart: venv
	$(BIN)/recstack quickstart

# two pytest-xdist workers, one per core of the 2-core CI machine; --dist loadfile gives a worker
# whole files, so that a module's fixtures are built once. `make test XDIST=` runs one process.
XDIST  ?= -n 2 --dist loadfile

test: venv
	$(BIN)/python -m pytest -q $(XDIST)

# pyproject's addopts keep the file order (-p no:randomly); -p randomly here turns the shuffle on
test-shuffled: venv
	$(BIN)/python -m pytest -q -p randomly $(XDIST)

protos: venv
	$(BIN)/python tools/gen_protos.py

clean:
	rm -rf $(VENV) runs .pytest_cache
