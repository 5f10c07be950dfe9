"""Code shared by the socket service and the Cloud Functions, grouped by job.

At the top, the contract: the wire protocol (``protocol``), errors
(``errors``), settings primitives (``config``), the names of every topic,
subscription and bucket (``topology``, ``topology.json``) and the AI request
message (``ai_requests``). Below it:

- ``store/``: Firestore access;
- ``identity/``: JWT auth and URL signing;
- ``bus/``: the chat's room bus, the topology and policy given to the
  socketio_pubsub_gcp library (packages/socketio-pubsub-gcp);
- ``runtime/``: JSON logging and GC tuning.

This package imports no deployable (tests/unit/test_boundaries.py).
"""
