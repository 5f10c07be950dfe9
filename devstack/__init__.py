"""The local stack: emulators, fake-gcs-server, provisioning and our services on 127.0.0.1.

``python -m devstack`` (``make dev``) runs it in the foreground; the pytest
fixtures in ``tests/conftest.py`` use the same pieces on free ports, so the
tests exercise exactly what a developer runs.
"""
