# Two commands on a fresh machine: `make demo` (the main job on the bundled digits data) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test test-all test-fast demo clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# One worker a core (at most four), each module on one worker, the longest first (tests/conftest.py).
PARALLEL := -n logical --maxprocesses 4 --dist loadfile --no-loadscope-reorder

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PARALLEL) -m "not full" tests

# Everything: make test and the variants marked full (pytest.ini).
test-all: $(VENV)/.installed
	$(PY) -m pytest -q $(PARALLEL) tests

# Everyday work: every script once on tiny inputs and each module's core (tests marked fast).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m fast tests

demo: $(VENV)/.installed
	$(PY) demo.py $(if $(FRESH),--fresh,)

clean:
	rm -rf outputs
