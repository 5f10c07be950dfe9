"""What a socket-service instance obeys from the functions' topic.

Two topics, two subscriptions per instance (review issue 13, finding 8). Any
manager message an instance receives is obeyed: an emit to any room or to
everyone, disconnect, enter_room, close_room... So a topic may carry manager
commands only if no one but the socket service can publish on it:

- ``chat-events``, the instances' own bus: only the socket service's account
  may publish on it (infra/terraform/iam.tf), and every manager message on it
  is obeyed, as python-socketio's managers do;
- ``chat-events-functions``: the functions (ai_stream, on_upload_finalized)
  publish their emits there, and only they may. An instance obeys from it only
  the emits the functions make (``FUNCTION_EMITS``, ``is_function_emit``: the
  library's filter for that topic) and drops anything else with a rate-limited
  WARNING, so a stolen function credential can at worst emit those events,
  never steer connections or rooms.

Between a function's emits and an instance's to the same room there was never
an order to keep: an instance delivers its own emits to its local clients at
once, ahead of anything on the bus, and the clients merge replies by
``(message_id, seq)`` (PROTOCOL.md).
"""

from __future__ import annotations

from .. import protocol

# Room prefix -> the events the functions emit to such rooms, and nothing else:
FUNCTION_EMITS: dict[str, frozenset[str]] = {
    # ai_stream's reply to a conversation; on_upload_finalized's file message.
    protocol.conversation_room(""): frozenset({protocol.AI_RESPONSE_CHUNK, protocol.AI_RESPONSE_COMPLETE,
                                               protocol.AI_RESPONSE_ERROR, protocol.FILE_UPLOADED}),
    # on_upload_finalized telling the uploader, in the user's own room, that a file was refused; and the
    # live conversation list after a reply or a file message (to the participants' user rooms, in one emit).
    protocol.user_room(""): frozenset({protocol.ERROR, protocol.CONVERSATION_UPDATED}),
}
# An emit to a list of rooms (conversation_updated to every participant) names at most this many.
MAX_FUNCTION_EMIT_ROOMS = 101


def is_function_emit(message: dict) -> bool:
    """True for an emit that a function makes: one of ``FUNCTION_EMITS``, to one room, plain.

    The one exception to "one room": ``conversation_updated`` to a list of user rooms.

    Plain: the default namespace, no binary attachments, no callback, no
    connection skipped; a function's write-only manager never sets those.
    """
    if message.get("method") != "emit" or message.get("namespace") not in (None, "/"):
        return False
    if message.get("binary") or message.get("callback") or message.get("skip_sid"):
        return False
    room, event = message.get("room"), message.get("event")
    if isinstance(room, list) and 0 < len(room) <= MAX_FUNCTION_EMIT_ROOMS and event == protocol.CONVERSATION_UPDATED:
        rooms = room  # every room of the list must be one a function may emit this event to
    elif isinstance(room, str):
        rooms = [room]
    else:
        return False
    return isinstance(event, str) and all(isinstance(r, str) and any(
        r.startswith(prefix) and len(r) > len(prefix) and event in events
        for prefix, events in FUNCTION_EMITS.items()) for r in rooms)
