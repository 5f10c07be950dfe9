"""Firestore access: conversations and messages (``conversations``), AI replies and their chunks
(``replies``), uploads (``uploads``), per-user quotas (``quotas``), grouped writes and reads
(``firestore_groups``), transactions with deadlines (``transactions``), the sends of one user admitted
together (``admission``), socket-service instances' heartbeats (``instances``) and user profiles
(``profiles``).
"""
