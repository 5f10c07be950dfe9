"""The room bus library as a stranger gets it: its wheel in a fresh virtualenv, its README's example as the app.

A new virtualenv (``python -m venv``) gets the wheel ``make test`` built
(packages/socketio-pubsub-gcp/dist/, through deploy.packaging.bus_wheel) plus
python-socketio and aiohttp, with pip as configured on this machine, pinned by
constraints.txt (``--no-index`` from ``$WHEELHOUSE`` when that names a folder of
wheels). Nothing of this repository is on its path. The example app is the
first ``python`` block of the package's README, extracted here, so the README
stays true. Two instances of it share a room over the Pub/Sub emulator: a
client of instance A receives what a client of instance B says to the room.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import socketio
from google.api_core.exceptions import AlreadyExists
from google.cloud import pubsub_v1

from deploy import packaging
from devstack.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / packaging.BUS_PACKAGE / "README.md"
TOPIC = "socketio"  # as in the README's example


def readme_app() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
    assert blocks, "the package README has no python example"
    app = blocks[0]
    assert "AsyncGooglePubSubManager" in app and "sys.argv[1]" in app
    return app


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory) -> Path:
    """A fresh virtualenv with the built wheel, python-socketio and aiohttp: nothing of the repository."""
    wheel = packaging.bus_wheel()
    venv = tmp_path_factory.mktemp("bus-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    args = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "-c", str(ROOT / "constraints.txt"), str(wheel), "python-socketio", "aiohttp"]
    wheelhouse = os.environ.get("WHEELHOUSE")
    if wheelhouse and Path(wheelhouse).is_dir():
        args += ["--no-index", "--find-links", wheelhouse]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"pip install in the fresh venv failed:\n{result.stdout}\n{result.stderr}"
    # The library comes from the wheel in this venv, not from the repository.
    where = subprocess.run([str(python), "-c", "import socketio_pubsub_gcp, sys; print(socketio_pubsub_gcp.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=venv.parent, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    return python


class App:
    def __init__(self, python: Path, script: Path, env: dict, log: Path):
        self.port = free_port()
        self.log = log
        with log.open("w") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([str(python), str(script), str(self.port)], env=env, cwd=script.parent,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while "Running on" not in self.log.read_text():  # aiohttp's run_app, once the port is open
            assert self.proc.poll() is None, f"the app exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"the app did not start:\n{self.log.read_text()}"
            await asyncio.sleep(0.1)

    def stop(self) -> str:
        """Stops the app with SIGINT; what became of it: "exit 0" when it stopped gracefully."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # run_app stops gracefully: the example closes the manager
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                return "killed after 20 s"
        return f"exit {self.proc.returncode}"


@pytest.mark.timeout(600)
async def test_readme_example_in_a_fresh_venv_shares_a_room_across_two_instances(stack, venv_python, tmp_path):
    project = stack.project_id
    publisher = pubsub_v1.PublisherClient()
    topic_path = publisher.topic_path(project, TOPIC)
    try:
        publisher.create_topic(request={"name": topic_path})
    except AlreadyExists:  # from an earlier run of this test in the session
        pass
    finally:
        publisher.transport.close()

    script = tmp_path / "app.py"
    script.write_text(readme_app())
    env = {"PATH": os.environ["PATH"], "GOOGLE_CLOUD_PROJECT": project, "PYTHONUNBUFFERED": "1",
           "PUBSUB_EMULATOR_HOST": stack.emulator_env["PUBSUB_EMULATOR_HOST"]}
    a = App(venv_python, script, env, tmp_path / "a.log")
    b = App(venv_python, script, env, tmp_path / "b.log")
    clients: list[socketio.AsyncClient] = []
    try:
        await asyncio.gather(a.ready(), b.ready())
        heard: asyncio.Queue = asyncio.Queue()
        on_a, on_b = socketio.AsyncClient(), socketio.AsyncClient()
        clients += [on_a, on_b]
        on_a.on("said", heard.put_nowait)
        await on_a.connect(a.url, transports=["websocket"], wait_timeout=10)
        await on_b.connect(b.url, transports=["websocket"], wait_timeout=10)
        room = f"room-{uuid.uuid4().hex[:8]}"
        assert await on_a.call("join", room, timeout=10) == "joined"
        assert await on_b.call("join", room, timeout=10) == "joined"

        # Subscriptions start delivering a moment after creation: say it until A hears it, each bounded.
        text, deadline = None, time.monotonic() + 30
        while text is None:
            assert time.monotonic() < deadline, f"A never heard B:\n{a.log.read_text()}\n{b.log.read_text()}"
            await on_b.emit("say", {"room": room, "text": "hello from B"})
            try:
                text = await asyncio.wait_for(heard.get(), 3)
            except TimeoutError:
                pass
        assert text == "hello from B"
    finally:
        for client in clients:
            await client.disconnect()
        ends = [a.stop(), b.stop()]
    assert ends == ["exit 0", "exit 0"], f"{ends}:\n{a.log.read_text()}\n{b.log.read_text()}"
    # Each instance deleted its own subscription when it stopped.
    with pubsub_v1.SubscriberClient() as subscriber:
        left = [s.name for s in subscriber.list_subscriptions(request={"project": f"projects/{project}"})
                if s.topic == topic_path]
    assert left == [], left
