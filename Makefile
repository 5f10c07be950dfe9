# The two commands of README.md. Both set themselves up on a fresh machine:
# a virtualenv in .venv with the pinned dependencies, then a check of the
# prerequisites that pip cannot install (Java, the gcloud emulators).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: dev test lint bench prereqs clean

$(STAMP): requirements-dev.txt constraints.txt $(wildcard */requirements.txt functions/*/requirements.txt)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (found " + sys.version.split()[0] + ")")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	@touch $(STAMP)

prereqs: $(STAMP)
	@bash scripts/install-system-deps.sh
	@$(PY) -m devstack --check

dev: prereqs
	$(PY) -m devstack

test: prereqs
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

bench: prereqs
	$(PY) bench/fanout.py

clean:
	rm -rf $(VENV) .devstack .pytest_cache test-artifacts
