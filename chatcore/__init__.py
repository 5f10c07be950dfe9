"""Code shared by the socket service and the Cloud Functions.

The wire contract (``protocol``), settings primitives (``config``), JWT
verification (``auth``), the Pub/Sub room bus (``pubsub_manager`` and
``async_pubsub_manager``), Firestore access (``store``), structured logging
(``jsonlog``) and the names of every topic, subscription and bucket
(``topology``). This package imports no deployable.
"""
