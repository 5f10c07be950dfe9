"""chatcore.runtime.tuning: what the socket service and the AI function apply at start-up."""

import gc
import sys

import pytest

from aistream.settings import Settings as AiSettings
from chatcore.runtime import tuning


@pytest.fixture
def restore_interpreter():
    thresholds, interval = gc.get_threshold(), sys.getswitchinterval()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    sys.setswitchinterval(interval)


def test_tune_freezes_what_is_alive_and_raises_the_thresholds(restore_interpreter):
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    interval = sys.getswitchinterval()
    tuning.tune()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == tuning.GC_THRESHOLDS
    assert tuning.GC_THRESHOLDS[0] > 700, "fewer young collections than Python's default"
    assert sys.getswitchinterval() == interval, "the GIL switch interval is left alone"


def test_gc_tuning_off_changes_nothing(restore_interpreter):
    gc.unfreeze()
    before = gc.get_threshold()
    tuning.tune(gc_tuning=False)
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before


@pytest.mark.parametrize("raw, expected", [(None, True), ("1", True), ("0", False), ("off", False)])
def test_the_ai_function_reads_gc_tuning(raw, expected):
    env = {"GOOGLE_CLOUD_PROJECT": "demo"} | ({} if raw is None else {"GC_TUNING": raw})
    assert AiSettings.from_env(env).gc_tuning is expected
