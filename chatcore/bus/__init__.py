"""The chat's room bus: the topology and policy that the socketio_pubsub_gcp library is given.

The library (packages/socketio-pubsub-gcp) knows nothing of the chat; here the
chat's topic names, subscription prefixes and lifetimes (``topology.json``) and
its rule for what the functions may emit (``policy``) become its constructor
arguments (``wiring``).
"""
