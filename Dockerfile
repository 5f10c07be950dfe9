# The socket service (Cloud Run). Build from the repository root:
#   docker build -t socket-service .        (or: python -m deploy apply / cloudbuild.yaml)
# Only chatcore/, socket_service/, the room bus library's source
# (packages/socketio-pubsub-gcp, built into a wheel below), the pinned
# requirements and the chat UI's pinned npm packages enter the build
# (.dockerignore lists what may).

# The chat UI's browser libraries, from package-lock.json, as `make ui` does.
FROM node:22.12.0-bookworm-slim AS ui-vendor
WORKDIR /build
COPY package.json package-lock.json scripts/vendor-ui.sh ./
RUN npm ci --omit=dev --no-audit --no-fund --ignore-scripts --loglevel=error \
    && sh vendor-ui.sh node_modules vendor

# The room bus library as a wheel, built from its source as `make wheel` builds
# it (the context never holds a local dist/: .dockerignore).
FROM python:3.11.13-slim-bookworm AS bus-wheel
COPY packages/socketio-pubsub-gcp/ /build/socketio-pubsub-gcp/
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels /build/socketio-pubsub-gcp

FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Production defaults: listen on 0.0.0.0, no dev tokens, explicit CORS
    # required. Cloud Run sets PORT, which the service reads.
    CHAT_ENV=production \
    PORT=8080

WORKDIR /app

# Dependencies first, so code changes reuse this layer: exactly the pinned
# runtime requirements and the bus library's wheel, with the repository's
# constraints for what they pull in.
COPY socket_service/requirements.txt /tmp/requirements.txt
COPY constraints.txt /tmp/constraints.txt
COPY --from=bus-wheel /wheels/ /tmp/wheels/
RUN pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
       /tmp/wheels/socketio_pubsub_gcp-0.1.0-py3-none-any.whl \
    && rm -r /tmp/requirements.txt /tmp/constraints.txt /tmp/wheels

RUN groupadd --system --gid 10001 chat \
    && useradd --system --uid 10001 --gid chat --no-create-home --shell /usr/sbin/nologin chat

COPY chatcore/ ./chatcore/
COPY socket_service/ ./socket_service/
COPY --from=ui-vendor /build/vendor/ ./socket_service/ui/vendor/

USER 10001:10001
EXPOSE 8080

# For `docker run`; Cloud Run ignores it and uses the startup and liveness
# probes on /healthz instead (infra/terraform/run.tf).
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('CHAT_PORT') or os.environ.get('PORT', '8080')), timeout=2)"]

CMD ["python", "-m", "socket_service"]
