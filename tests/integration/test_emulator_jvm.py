"""The emulator JVMs run with devstack's JIT option (C1 only: half the CPU per request on this machine)."""

from __future__ import annotations

import psutil

from devstack.stack import EMULATOR_JVM_OPTIONS, emulator_jvm_env


def _java_environments(stack) -> dict[str, dict[str, str]]:
    """The environment of the java process under each running emulator, by emulator name."""
    found = {}
    for managed in stack.processes:
        if not managed.name.endswith("-emulator") or managed.proc is None:
            continue
        for proc in [psutil.Process(managed.proc.pid), *psutil.Process(managed.proc.pid).children(recursive=True)]:
            if proc.name() == "java":
                found[managed.name] = proc.environ()
    return found


def test_both_emulator_jvms_run_with_the_jit_option(stack):
    environments = _java_environments(stack)
    assert set(environments) == {"firestore-emulator", "pubsub-emulator"}
    for name, environ in environments.items():
        assert EMULATOR_JVM_OPTIONS in environ.get("JAVA_TOOL_OPTIONS", "").split(), name


def test_options_the_user_already_set_are_kept_and_win(monkeypatch):
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-Xmx512m -XX:TieredStopAtLevel=4")
    options = emulator_jvm_env()["JAVA_TOOL_OPTIONS"].split()
    # The JVM applies the last of two settings of one flag: the user's comes last.
    assert options == [EMULATOR_JVM_OPTIONS, "-Xmx512m", "-XX:TieredStopAtLevel=4"]


def test_no_user_options_gives_ours_alone(monkeypatch):
    monkeypatch.delenv("JAVA_TOOL_OPTIONS", raising=False)
    assert emulator_jvm_env() == {"JAVA_TOOL_OPTIONS": EMULATOR_JVM_OPTIONS}
