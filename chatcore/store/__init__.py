"""Firestore access: conversations and messages (``conversations``), AI replies and their chunks
(``replies``), uploads (``uploads``), per-user quotas (``quotas``), grouped writes and reads
(``firestore_groups``), transactions with deadlines (``transactions``), the sends of one user admitted
together (``admission``), socket-service instances' heartbeats (``instances``) and user profiles
(``profiles``).
"""

# Shim for tests/browser/test_chat_ui.py (``from chatcore.store import Message``), which this
# refactor may not edit; remove it once that import reads ``from chatcore.store.conversations import Message``.
from .conversations import Message  # noqa: F401
