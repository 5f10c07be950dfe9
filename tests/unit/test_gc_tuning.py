"""chatcore.gc_tuning: what the socket service and the AI function apply at start-up."""

import gc

import pytest

from aistream.settings import Settings as AiSettings
from chatcore import gc_tuning


@pytest.fixture
def restore_gc():
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tune_freezes_what_is_alive_and_raises_the_thresholds(restore_gc):
    alive = object()  # noqa: F841 (alive while tune() runs)
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    gc_tuning.tune()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == gc_tuning.THRESHOLDS
    assert gc_tuning.THRESHOLDS[0] > 700, "fewer young collections than Python's default"


@pytest.mark.parametrize("raw, expected", [(None, True), ("1", True), ("0", False), ("off", False)])
def test_the_ai_function_reads_gc_tuning(raw, expected):
    env = {"GOOGLE_CLOUD_PROJECT": "demo"} | ({} if raw is None else {"GC_TUNING": raw})
    assert AiSettings.from_env(env).gc_tuning is expected
