"""socket_service.frames in-process: what is a malformed frame, and the budget of WARNING lines about them."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from socket_service.frames import (
    MalformedFrame,
    StrictPacket,
    WarningBudget,
    check_engineio_packet,
    check_polling_payload,
)

LOG = logging.getLogger("tests.frames")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG.name]


def test_budget_logs_the_limit_then_one_summary_per_window(caplog):
    caplog.set_level(logging.WARNING, LOG.name)
    clock = Clock()
    budget = WarningBudget(LOG, limit=3, window=60, clock=clock)
    logged = [budget.warn("bad frame %d", i) for i in range(10)]  # no event loop: no timer
    assert logged == [True] * 3 + [False] * 7
    assert lines(caplog) == ["bad frame 0", "bad frame 1", "bad frame 2"]
    clock.now += 59.9
    assert budget.warn("bad frame 10") is False
    clock.now += 0.1  # the window is over: its summary, then a fresh window
    assert budget.warn("bad frame 11") is True
    assert lines(caplog)[3:] == ["suppressed 8 malformed-frame warnings in the last 60 s", "bad frame 11"]
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in caplog.records)


def test_budget_without_suppression_logs_no_summary(caplog):
    caplog.set_level(logging.WARNING, LOG.name)
    clock = Clock()
    budget = WarningBudget(LOG, limit=3, window=60, clock=clock)
    budget.warn("one")
    clock.now += 61
    budget.warn("two")
    budget.flush()
    assert lines(caplog) == ["one", "two"]


async def test_budget_summary_comes_when_the_window_ends_without_another_frame(caplog):
    caplog.set_level(logging.WARNING, LOG.name)
    budget = WarningBudget(LOG, limit=1, window=0.2)
    started = time.monotonic()
    budget.warn("first")
    budget.warn("second")
    budget.warn("third")
    deadline = started + 5
    while len(lines(caplog)) < 2:
        assert time.monotonic() < deadline, lines(caplog)
        await asyncio.sleep(0.02)
    assert lines(caplog) == ["first", "suppressed 2 malformed-frame warnings in the last 0.2 s"]
    assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize("frame", ["3", "2probe", "3probe", "5", "1", "6", "2", "40", '42["typing",{}]',
                                   "431[{}]", "b" + "AAEC", b"\x00\x01", "41"])
def test_engineio_packets_a_client_may_send(frame):
    check_engineio_packet(frame)


@pytest.mark.parametrize("frame", ["", "0", "0{}", "7", "9x", "x", "\u0663", "4", "4x", "4[" + "[" * 100, "3[[[",
                                   "2ping", "b!!", "b A"])
def test_malformed_engineio_packets(frame):
    with pytest.raises(MalformedFrame):
        check_engineio_packet(frame)


def test_polling_payloads():
    check_polling_payload(b"")
    check_polling_payload('42["typing",{"x":"\u00e9"}]\x1e3'.encode())
    for bad in (b"\xff\xfe", b"40\x1e9", "\x1e".join(["3"] * 17).encode(), b"d=", b"4"):
        with pytest.raises(MalformedFrame):
            check_polling_payload(bad)


@pytest.mark.parametrize("encoded", [
    "0", '0{"token":"t"}', "0/admin,", "1", '2["send_message",{"message":"hi"}]', '21["x"]', "2[7]",
    '2/admin,3["e",1,2]', "31[]", '31[{"ok":true}]', '51-["typing",{"_placeholder":true,"num":0}]',
])
def test_socketio_packets_a_client_may_send(encoded):
    StrictPacket(encoded_packet=encoded)


@pytest.mark.parametrize("encoded", [
    "", "x", "7[]", '4{"message":"x"}', '0"token"', "0[]", '1{"a":1}', "2", "2{}", "2[]", "2[true]", "2[null]",
    "2[{}]", '2["connect"]', '2["disconnect",{}]', '2["newListener"]', "3[]", "31{}", '2["x",' + "1" * 101 + "]",
    "2" + "1" * 101 + '["x"]', '2["x", {', "2" + "[" * 5000, "2" + "[" * 5000 + "]" * 5000, "12345678901-[]",
])
def test_malformed_socketio_packets(encoded):
    with pytest.raises(MalformedFrame):
        StrictPacket(encoded_packet=encoded)


def test_binary_frames_outside_attachments_and_bad_attachments():
    with pytest.raises(MalformedFrame):
        StrictPacket(encoded_packet=b"\xff\x00")
    pending = StrictPacket(encoded_packet='51-["typing",{"_placeholder":true,"num":3}]')
    with pytest.raises(MalformedFrame):
        pending.add_attachment(b"x")
    pending = StrictPacket(encoded_packet='51-["typing",{"_placeholder":true,"num":0}]')
    with pytest.raises(MalformedFrame):
        pending.add_attachment("text, not bytes")
    pending = StrictPacket(encoded_packet='51-["typing",{"_placeholder":true,"num":0}]')
    assert pending.add_attachment(b"bytes") is True and pending.data == ["typing", b"bytes"]


def test_outgoing_packets_are_unchanged():
    assert StrictPacket(2, ["connected", {"status": "ok"}]).encode() == '2["connected",{"status":"ok"}]'
    assert StrictPacket(3, [{"ok": True}], id=4).encode() == '34[{"ok":true}]'
