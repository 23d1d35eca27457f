SHELL := /bin/bash
# The two commands: `make book` and `make test`. Both create .venv when missing (offline except
# for the package registries) and are idempotent: a second run skips the install in seconds.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mlic-installed
PROFILE ?= default
# the Jupyter kernel for JupyterLab, registered per user: with several checkouts it runs the .venv of the last one
# set up (`make kernel` points it back at this one)
KERNEL := $(PY) -m ipykernel install --user --name mlic --display-name "Python (mlic companion)"

.PHONY: help book test lint lab kernel clean distclean env full

help:
	@echo "make book   - set up .venv, execute every chapter (profile=$(PROFILE)) and build _build/html"
	@echo "make test   - set up .venv, run the test suite (incl. a smoke run of every notebook)"
	@echo "make lab    - JupyterLab on the notebooks, with the venv's kernel and the book's trained models"
	@echo "make kernel - point the Jupyter kernel \"Python (mlic companion)\" at this checkout's .venv"
	@echo "make lint   - ruff"
	@echo "make full   - execute every chapter with profile full (the papers' recipes: real data, a GPU) and build"
	@echo "make clean  - remove _build (executed notebooks, HTML, cached runs)"
	@echo "make distclean - make clean, and remove .venv"

env: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt 2>&1 | grep -v "^WARNING: Location"; \
	  test $${PIPESTATUS[0]} -eq 0
	$(PY) -m pip install --quiet --no-deps -e . 2>&1 | grep -v "^WARNING: Location"; \
	  test $${PIPESTATUS[0]} -eq 0
	$(PY) -c "import mlic_lib._torchvision_compat as c; print('torchvision hook:', c.write_pth())"
	$(KERNEL) >/dev/null
	@touch $@

book: $(STAMP)
	$(VENV)/bin/mlic book --profile $(PROFILE)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# JupyterLab's kernels use the book's run cache (unless MLIC_CACHE is set), so after `make book` a chapter opened
# there loads the trained models instead of training them again; results go to ~/.cache/mlic/results, not the book's
lab: $(STAMP)
	MLIC_CACHE="$${MLIC_CACHE:-$(CURDIR)/_build/cache}" $(VENV)/bin/jupyter lab notebooks/

kernel: $(STAMP)
	$(KERNEL)

full: $(STAMP)
	$(VENV)/bin/mlic book --profile full

clean:
	rm -rf _build

distclean: clean
	rm -rf $(VENV)
