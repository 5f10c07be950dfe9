"""ChunkCoalescer: first chunk at once, then at most one per interval measured from the send."""

from aistream.coalescer import ChunkCoalescer


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nothing_buffered_is_never_due():
    assert ChunkCoalescer(0.1, 100, Clock()).seconds_until_due() is None


def test_first_text_is_due_at_once_then_interval_counts_from_the_send():
    clock = Clock()
    c = ChunkCoalescer(0.1, 1000, clock)
    c.add("Hel")
    assert c.seconds_until_due() == 0
    assert c.take() == "Hel"
    clock.now += 0.08  # storing and emitting the chunk took 80 ms
    c.sent()
    c.add("lo")
    assert abs(c.seconds_until_due() - 0.1) < 1e-9
    clock.now += 0.06
    assert abs(c.seconds_until_due() - 0.04) < 1e-9
    c.add(" world")
    clock.now += 0.05
    assert c.seconds_until_due() == 0
    assert c.take() == "lo world"
    assert not c.pending


def test_size_threshold_makes_a_chunk_due_early():
    clock = Clock()
    c = ChunkCoalescer(10.0, 5, clock)
    c.add("a")
    c.take()
    c.sent()
    c.add("abcd")
    assert c.seconds_until_due() > 0
    c.add("e")
    assert c.seconds_until_due() == 0


def test_empty_pieces_are_ignored():
    c = ChunkCoalescer(0.1, 5, Clock())
    c.add("")
    assert not c.pending and c.seconds_until_due() is None


def test_the_interval_also_holds_for_the_last_chunk_and_the_closing_event():
    clock = Clock()
    c = ChunkCoalescer(0.1, 1000, clock)
    assert c.seconds_until_interval() == 0, "nothing sent yet: no wait"
    c.add("a")
    c.take()
    c.sent()
    clock.now += 0.03
    assert abs(c.seconds_until_interval() - 0.07) < 1e-9
    clock.now += 0.2
    assert c.seconds_until_interval() == 0
