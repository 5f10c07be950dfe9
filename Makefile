# The two commands of README.md. Both set themselves up on a fresh machine:
# a virtualenv in .venv with the pinned dependencies, then a check of the
# prerequisites that pip cannot install (Java, the gcloud emulators).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
SOAK_ARGS ?=

.PHONY: dev test lint bench soak prereqs clean ui

$(STAMP): requirements-dev.txt constraints.txt $(wildcard */requirements.txt functions/*/requirements.txt)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (found " + sys.version.split()[0] + ")")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	@touch $(STAMP)

# The chat UI's browser libraries: pinned npm packages (package-lock.json),
# copied into socket_service/ui/vendor/ (not committed).
UI_VENDOR := socket_service/ui/vendor
UI_STAMP := $(UI_VENDOR)/.installed-stamp

$(UI_STAMP): package.json package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm (Node.js 18+) is required to install the chat UI's libraries" >&2; exit 1; }
	npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	@mkdir -p $(UI_VENDOR)
	cp node_modules/socket.io-client/dist/socket.io.min.js node_modules/marked/lib/marked.umd.js \
	   node_modules/dompurify/dist/purify.min.js $(UI_VENDOR)/
	@touch $(UI_STAMP)

ui: $(UI_STAMP)

prereqs: $(STAMP) $(UI_STAMP)
	@bash scripts/install-system-deps.sh
	@$(PY) -m devstack --check

dev: prereqs
	$(PY) -m devstack

test: prereqs
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

bench: prereqs
	$(PY) bench/fanout.py

# Soak with a ledger (docs/RELIABILITY.md, "Soak"): 30 minutes by default; SOAK_ARGS="--minutes 1" for a short one.
soak: prereqs
	$(PY) bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .devstack .pytest_cache test-artifacts node_modules $(UI_VENDOR)
