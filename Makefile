# The two commands of README.md. Both set themselves up on a fresh machine:
# a virtualenv in .venv with the pinned dependencies, then a check of the
# prerequisites that pip cannot install (Java, the gcloud emulators).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
SOAK_ARGS ?=

.PHONY: dev test lint bench soak prereqs clean ui node wheel

$(STAMP): requirements-dev.txt constraints.txt $(wildcard */requirements.txt functions/*/requirements.txt)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (found " + sys.version.split()[0] + ")")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	@touch $(STAMP)

# The room bus library (packages/socketio-pubsub-gcp) as a wheel, built from its
# sources whenever they change and installed into the venv from that build (not
# editable), as the image and the functions install it (Dockerfile, deploy/packaging.py).
BUS_PKG := packages/socketio-pubsub-gcp
BUS_WHEEL := $(BUS_PKG)/dist/socketio_pubsub_gcp-0.1.0-py3-none-any.whl
BUS_SOURCES := $(BUS_PKG)/pyproject.toml $(BUS_PKG)/README.md $(shell find $(BUS_PKG)/src -name '*.py' -o -name py.typed 2>/dev/null)
BUS_STAMP := $(VENV)/.bus-wheel-stamp

$(BUS_WHEEL): $(STAMP) $(BUS_SOURCES)
	rm -rf $(BUS_PKG)/dist $(BUS_PKG)/build
	$(PY) -m build --wheel --outdir $(BUS_PKG)/dist $(BUS_PKG) >/dev/null
	rm -rf $(BUS_PKG)/build $(BUS_PKG)/src/*.egg-info

$(BUS_STAMP): $(BUS_WHEEL)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall $(BUS_WHEEL)
	@touch $(BUS_STAMP)

wheel: $(BUS_STAMP)

# The pinned npm packages (package-lock.json): the chat UI's browser libraries,
# copied into socket_service/ui/vendor/ (not committed), and, as devDependencies,
# the google provider schemas tests/infra/test_provider_schema.py reads
# (node_modules/@cdktf/provider-google*/.jsii). npm ci writes NODE_STAMP, so a
# deleted node_modules is installed again.
NODE_STAMP := node_modules/.package-lock.json
UI_VENDOR := socket_service/ui/vendor
UI_STAMP := $(UI_VENDOR)/.installed-stamp

$(NODE_STAMP): package.json package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm (Node.js 18+) is required to install the pinned npm packages" >&2; exit 1; }
	npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	@touch $(NODE_STAMP)

$(UI_STAMP): $(NODE_STAMP)
	sh scripts/vendor-ui.sh node_modules $(UI_VENDOR)
	@touch $(UI_STAMP)

ui: $(UI_STAMP)

node: $(NODE_STAMP)

prereqs: $(STAMP) $(BUS_STAMP) $(NODE_STAMP) $(UI_STAMP)
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
	rm -rf $(VENV) .devstack .pytest_cache test-artifacts node_modules $(UI_VENDOR) $(BUS_PKG)/dist $(BUS_PKG)/build
