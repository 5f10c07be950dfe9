"""Soak with a ledger: users, rooms, replies, uploads and reconnects across two instances, checked against Firestore.

It starts a stack of its own on free 127.0.0.1 ports (both emulators,
fake-gcs-server, the AI function with the offline provider, both upload
functions and TWO socket-service instances, default per-user limits) and
creates ``--rooms`` conversations of 2-4 participants among ``--users``
users. Each user is one python-socketio ``AsyncClient`` (a new one for each
connection), first on instance A or B in turn. For ``--minutes`` every client
acts at random, one action at a time, pausing about ``--think-seconds``
between actions: ``send_message`` (with a ``client_message_id``; sometimes a
``/stream N`` request, sometimes a retry of the same id, sometimes 2-3 sends at
once), ``typing``, ``join_room``/``leave_room``, ``stop_generation``, an upload
(POST the ``upload_url`` of ``/config.json``, PUT the bytes to the signed URL,
wait for ``file_uploaded``), and a drop: a Socket.IO disconnect, or the TCP
connection shut without a goodbye, then a reconnect to either instance,
``join_room`` again and the ``streaming`` snapshot merged.

The ledger. Each client writes down every call (event, payload, the time it
was sent and answered, the answer), every event it received (time,
connection epoch) and every stay in a room (a *stay*: from the ``join_room``
ack until ``leave_room`` is sent, the connection is dropped or seen lost,
or the end of the run). Times come from one monotonic clock; all clients run
in this process. At the end the load stops, the replies still streaming are
waited for (bounded), and the ledgers are compared with Firestore:

- every acked message is stored exactly once (one document with its
  ``client_message_id``, under the acked id, with its text); a retry got the
  same id; a send refused with any code but ``unavailable`` stored nothing;
- delivery: a stay is *connected at the time* of a message when its
  ``join_room`` was acked before the message was sent and it lasted until at
  least ``BUS_GRACE_SECONDS`` after the ack (a conservative bound on "after it
  was broadcast"). Every such stay received the message exactly once;
  uploads likewise, from the POST to ``FILE_GRACE_SECONDS`` after the PUT;
- order: any two connections received the messages they both got in the same
  order, and a message acked before another was sent is received before it;
- every reply has ended (complete, cancelled or error), its stored chunks are
  1..seq without gap and join to its stored content; every stay that saw a
  reply end received its chunks after its snapshot (``seq`` > the snapshot's)
  without gap, repeat or disorder, and snapshot + chunks = the stored content
  (a stay that left before the end: a gap-free prefix);
- 0 ``internal`` answers (every error code is counted), every call answered
  within the request deadline;
- the socket services' RSS and open file descriptors, sampled every
  ``--sample-seconds``: the median over the last 10% of the load phase is less
  than 10% above the median over the 10% right after warm-up
  (``--warmup-fraction``, 20% of the load phase). The descriptors compared
  are those other than the client connections' sockets (the clients on an
  instance come and go at random, one socket each); those sockets must all
  be closed a few seconds after the last client left.

Prints a table (check, figure, pass/fail; rows marked "information" have no
verdict: the load, what stop_generation did, WARNING lines in our services'
logs), writes JSON to bench/results/soak-<stamp>.json (with examples of
every failure) and every client's ledger to soak-<stamp>-ledger.jsonl.gz,
and exits 1 if a check fails. The processes' logs stay in
bench/results/logs-soak-<stamp>/.

    .venv/bin/python bench/soak.py [--minutes 30] [--users 8] [--rooms 4] [--seed N]
    make soak SOAK_ARGS="--minutes 1"
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import logging
import os
import random
import signal
import socket
import statistics
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import psutil  # noqa: E402
import socketio  # noqa: E402

from bench.machine import code_state  # noqa: E402
from bench.stack_run import run_on_stack  # noqa: E402
from chatcore.identity.auth import issue_token  # noqa: E402
from chatcore.store.uploads import file_message_id  # noqa: E402
from devstack.processes import free_port  # noqa: E402
from devstack.stack import Stack  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DEADLINE_SECONDS = 10.0  # REQUEST_DEADLINE_SECONDS, the services' default
CALL_TIMEOUT = DEADLINE_SECONDS + 5  # a call unanswered by then counts as unanswered
ANSWER_SLACK = 1.0  # an answer later than the deadline plus this is late
BUS_GRACE_SECONDS = 5.0  # a stay must last this long after the ack to count as joined "after the broadcast"
FILE_GRACE_SECONDS = 10.0  # the same after an upload's PUT (finalize notification, function, bus)
FILE_WAIT_SECONDS = 20.0  # how long an uploader waits for its file_uploaded
DRAIN_SECONDS = 150.0  # replies still streaming after the load: longer than REPLY_STALE_SECONDS + a sweep
SETTLE_SECONDS = 3.0  # after the last reply ended, for the last events to arrive
GROWTH_LIMIT = 0.10
ENDED = ("complete", "cancelled", "error")
END_EVENTS = ("ai_response_complete", "ai_response_error")
EXAMPLES = 10  # examples kept per failed check
WORDS = ("soak", "ledger", "room", "reply", "stream", "héllo", "naïve", "日本語", "🙂", "שלום", "x" * 40)
# Relative weights of a client's actions.
ACTIONS = {"send": 34, "burst": 4, "typing": 20, "join_leave": 12, "stop": 8, "upload": 6, "drop": 6, "idle": 10}


def now() -> float:
    return time.monotonic()


# -- the ledger ----------------------------------------------------------------
@dataclass(eq=False)
class Epoch:
    """One connection of one client, from connect to drop (or the end)."""

    client: int
    n: int
    instance: str
    t_connect: float
    t_end: float | None = None
    end_kind: str | None = None  # clean, transport, lost (not ours), final
    events: list = field(default_factory=list)  # (time, event, data), in the order received


@dataclass(eq=False)
class Stay:
    """One connection in one room: from the join_room ack until leave_room is sent or the connection ends."""

    client: int
    epoch: Epoch
    cid: str
    t_join_sent: float
    t_join_ack: float
    snapshot: dict  # reply id -> (seq, content), the join_room ack's `streaming`
    t_end: float | None = None


@dataclass(eq=False)
class Call:
    client: int
    epoch: Epoch
    event: str
    payload: dict
    t_sent: float
    t_ack: float | None = None
    ack: dict | None = None
    lost: bool = False  # no answer, and the connection was lost meanwhile

    @property
    def ok(self) -> bool:
        return bool(self.ack and self.ack.get("ok"))

    @property
    def code(self) -> str | None:
        if self.ack is None:
            return None
        return None if self.ok else str((self.ack.get("error") or {}).get("code"))


@dataclass(eq=False)
class Upload:
    client: int
    epoch: Epoch
    cid: str
    t_start: float
    size: int
    post_status: int | None = None
    upload_id: str | None = None
    put_status: int | None = None
    t_put: float | None = None
    t_event: float | None = None
    error: str | None = None


class Run:
    """What all clients share: instance URLs, the upload URL, the HTTP session, counters."""

    def __init__(self, urls: list[str], upload_url: str, http: aiohttp.ClientSession, seed: int, think: float):
        self.urls = urls
        self.upload_url = upload_url
        self.http = http
        self.seed = seed
        self.think = think
        self.actions: Counter = Counter()
        self.problems: list[str] = []  # client-side exceptions, kept for the report

    def problem(self, text: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(text)


class SoakClient:
    """One user, one connection at a time, acting at random and keeping a ledger."""

    def __init__(self, run: Run, index: int, user: str, token: str, conversations: list[str]):
        self.run = run
        self.index = index
        self.user = user
        self.token = token
        self.conversations = conversations
        self.rng = random.Random(run.seed * 1000 + index)
        self.sio: socketio.AsyncClient | None = None
        self.epoch: Epoch | None = None
        self.epochs: list[Epoch] = []
        self.joined: dict[str, Stay] = {}
        self.stays: list[Stay] = []
        self.calls: list[Call] = []
        self.uploads: list[Upload] = []
        self.in_progress: dict[str, str] = {}  # reply id -> conversation id, from ai_thinking/snapshot to its end
        self.waiting: dict[str, tuple[asyncio.Event, Upload]] = {}  # file message id -> (event, upload)
        self.sent = 0

    # -- connection ----------------------------------------------------
    @property
    def live(self) -> bool:
        return self.sio is not None and self.epoch is not None and self.epoch.t_end is None and self.sio.connected

    async def connect(self, url: str) -> bool:
        sio = socketio.AsyncClient(reconnection=False)
        epoch = Epoch(self.index, len(self.epochs) + 1, url, now())

        def on_any(event, *args):  # synchronous: events are recorded in the order they arrive
            data = args[0] if args else None
            t = now()
            epoch.events.append((t, event, data))
            if epoch is not self.epoch or not isinstance(data, dict):
                return
            if event == "ai_thinking":
                self.in_progress[data.get("message_id")] = data.get("conversation_id")
            elif event in END_EVENTS:
                self.in_progress.pop(data.get("message_id"), None)
            elif event == "file_uploaded" and data.get("message_id") in self.waiting:
                waiter, upload = self.waiting[data["message_id"]]
                upload.t_event = upload.t_event or t
                waiter.set()

        def on_disconnect(*args):
            if epoch.t_end is None:  # not a drop of ours
                self._end_epoch(epoch, now(), "lost")

        sio.on("*", on_any)
        sio.on("disconnect", on_disconnect)
        try:
            await sio.connect(url, auth={"token": self.token}, transports=["websocket"], wait_timeout=10)
        except Exception as exc:  # noqa: BLE001 - counted, then retried by the caller
            self.run.problem(f"client {self.index}: connect to {url} failed: {type(exc).__name__}: {exc}")
            await _close_quietly(sio)
            return False
        self.sio, self.epoch = sio, epoch
        self.epochs.append(epoch)
        return True

    def _end_epoch(self, epoch: Epoch, t: float, kind: str) -> None:
        epoch.t_end, epoch.end_kind = t, kind
        if epoch is self.epoch:
            for stay in self.joined.values():
                stay.t_end = t
            self.joined.clear()
            self.in_progress.clear()

    async def drop(self) -> None:
        """Lose the connection (a Socket.IO disconnect, or the TCP connection shut without a word), then resume."""
        kind = self.rng.choice(("clean", "transport"))
        rooms = list(self.joined)
        sio, epoch = self.sio, self.epoch
        self._end_epoch(epoch, now(), kind)
        if kind == "clean":
            await _close_quietly(sio)
        else:
            try:
                sock = sio.eio.ws.get_extra_info("socket")
                sock.shutdown(socket.SHUT_RDWR)  # the server sees the TCP connection end, no close frame
            except Exception as exc:  # noqa: BLE001
                self.run.problem(f"client {self.index}: transport shutdown failed: {exc!r}")
                await sio.disconnect()
            for _ in range(50):
                if not sio.connected:
                    break
                await asyncio.sleep(0.1)
        await _close_quietly(sio)
        self.sio = None
        await asyncio.sleep(self.rng.uniform(0, 2))
        await self.resume(rooms)

    async def resume(self, rooms: list[str]) -> None:
        """Reconnect to either instance and join again (most of) the rooms we were in, merging each snapshot."""
        if self.sio is not None:
            await _close_quietly(self.sio)
            self.sio = None
        for attempt in range(5):
            if await self.connect(self.rng.choice(self.run.urls)):
                break
            await asyncio.sleep(1 + attempt)
        else:
            return
        for cid in self.conversations:
            if self.rng.random() < (0.9 if cid in rooms else 0.3):
                await self.join(cid)

    # -- calls ---------------------------------------------------------
    async def call(self, event: str, payload: dict) -> Call:
        record = Call(self.index, self.epoch, event, payload, now())
        self.calls.append(record)
        try:
            record.ack = await self.sio.call(event, payload, timeout=CALL_TIMEOUT)
            record.t_ack = now()
        except socketio.exceptions.TimeoutError:
            record.lost = record.epoch.t_end is not None
        except (socketio.exceptions.BadNamespaceError, socketio.exceptions.DisconnectedError):
            record.lost = True
        return record

    async def join(self, cid: str) -> None:
        call = await self.call("join_room", {"conversation_id": cid})
        if call.ok and call.epoch is self.epoch and self.epoch.t_end is None:
            streaming = {s["message_id"]: (s["seq"], s["content"]) for s in call.ack.get("streaming", [])}
            stay = Stay(self.index, call.epoch, cid, call.t_sent, call.t_ack, streaming)
            self.joined[cid] = stay
            self.stays.append(stay)
            for reply in streaming:
                self.in_progress[reply] = cid

    async def leave(self, cid: str) -> None:
        stay = self.joined.pop(cid)
        stay.t_end = now()
        for reply in [r for r, c in self.in_progress.items() if c == cid]:
            del self.in_progress[reply]
        await self.call("leave_room", {"conversation_id": cid})

    def _text(self) -> str:
        self.sent += 1
        if self.rng.random() < 0.3:
            return f"/stream {self.rng.randint(30, 200)}"
        words = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(1, 12)))
        return f"soak {self.user} #{self.sent}: {words}"

    async def send(self, cid: str) -> None:
        payload = {"conversation_id": cid, "message": self._text(), "client_message_id": uuid.uuid4().hex}
        call = await self.call("send_message", payload)
        for _ in range(2):  # unavailable: retry with the same client_message_id, as the answer says
            if call.code != "unavailable" or not self.live:
                break
            await asyncio.sleep(min(float(call.ack["error"].get("retry_after") or 1), 5))
            if not self.live:
                break
            call = await self.call("send_message", payload)
        if call.ok and self.live and self.rng.random() < 0.1:
            await self.call("send_message", payload)  # a retry of a stored message: same id, nothing new

    # -- actions -------------------------------------------------------
    def _joined_room(self) -> str | None:
        return self.rng.choice(sorted(self.joined)) if self.joined else None

    async def act(self) -> None:
        if not self.live:
            self.run.actions["resume after loss"] += 1
            await self.resume(list(self.joined))
            return
        action = self.rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
        cid = self._joined_room()
        if cid is None and action in ("send", "burst", "typing", "stop", "upload"):
            action = "join_leave"
        self.run.actions[action] += 1
        if action == "send":
            await self.send(cid)
        elif action == "burst":
            rooms = [self._joined_room() for _ in range(self.rng.randint(2, 3))]
            await asyncio.gather(*(self.send(room) for room in rooms))
        elif action == "typing":
            await self.call("typing", {"conversation_id": cid, "is_typing": self.rng.random() < 0.7})
        elif action == "join_leave":
            outside = [c for c in self.conversations if c not in self.joined]
            if outside and (not self.joined or self.rng.random() < 0.6):
                await self.join(self.rng.choice(outside))
            elif self.joined:
                await self.leave(self._joined_room())
        elif action == "stop":
            payload = {"conversation_id": cid}
            replies = sorted(r for r, c in self.in_progress.items() if c == cid)
            if replies and self.rng.random() < 0.6:
                payload["message_id"] = self.rng.choice(replies)
            await self.call("stop_generation", payload)
        elif action == "upload":
            await self.upload(cid)
        elif action == "drop":
            await self.drop()

    async def upload(self, cid: str) -> None:
        data = "".join(f"soak file of {self.user}, line {i}\n" for i in range(self.rng.randint(1, 60))).encode()
        record = Upload(self.index, self.epoch, cid, now(), len(data))
        self.uploads.append(record)
        body = {"conversation_id": cid, "filename": f"soak-{self.index}-{len(self.uploads)}.txt",
                "content_type": "text/plain", "size": len(data)}
        if self.rng.random() < 0.5:
            body["message"] = f"file {len(self.uploads)} of {self.user}"
        try:
            async with self.run.http.post(self.run.upload_url, json=body,
                                          headers={"Authorization": f"Bearer {self.token}"}) as r:
                record.post_status = r.status
                grant = await r.json(content_type=None)
            if r.status != 201:
                record.error = f"request_upload answered {r.status}: {grant}"
                return
            record.upload_id = grant["upload_id"]
            waiter = asyncio.Event()
            self.waiting[file_message_id(record.upload_id)] = (waiter, record)
            async with self.run.http.request(grant["method"], grant["url"], data=data,
                                             headers=grant["headers"]) as r:
                await r.read()
                record.put_status, record.t_put = r.status, now()
            if r.status != 200:
                record.error = f"PUT answered {r.status}"
                return
            await asyncio.wait_for(waiter.wait(), FILE_WAIT_SECONDS)
        except TimeoutError:
            record.error = f"no file_uploaded within {FILE_WAIT_SECONDS:g} s"
        except (aiohttp.ClientError, ValueError, KeyError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"

    async def loop(self, stop_at: float) -> None:
        while now() < stop_at:
            try:
                await self.act()
            except Exception as exc:  # noqa: BLE001 - the ledger goes on; the report lists these
                self.run.problem(f"client {self.index}: {type(exc).__name__}: {exc}")
            pause = min(self.rng.expovariate(1 / self.run.think), 5 * self.run.think)
            await asyncio.sleep(max(0.0, min(pause, stop_at - now())))

    async def finish(self, t: float) -> None:
        if self.epoch is not None and self.epoch.t_end is None:
            self._end_epoch(self.epoch, t, "final")
        if self.sio is not None:
            await _close_quietly(self.sio)
            self.sio = None


async def _close_quietly(sio: socketio.AsyncClient) -> None:
    try:
        if sio.connected:
            await asyncio.wait_for(sio.disconnect(), 5)
        await sio.eio._reset()  # closes the client's HTTP session whatever state it is in
    except Exception:  # noqa: BLE001 - closing what may already be gone
        pass


# -- set-up and sampling -------------------------------------------------------
def room_plan(users: list[str], rooms: int) -> list[list[str]]:
    """Rooms of 2, 3, 4, 2, 3, 4... participants, filled in turn so that every user is in at least one."""
    plan, k = [], 0
    for r in range(rooms):
        size = min(2 + r % 3, len(users))
        members: list[str] = []
        while len(members) < size:
            if users[k % len(users)] not in members:
                members.append(users[k % len(users)])
            k += 1
        plan.append(members)
    for i, user in enumerate(users):  # anyone left out joins a room
        if not any(user in m for m in plan):
            plan[i % rooms].append(user)
    return plan


async def create_rooms(http: aiohttp.ClientSession, url: str, tokens: dict[str, str],
                       plan: list[list[str]]) -> list[str]:
    cids = []
    for members in plan:
        headers = {"Authorization": f"Bearer {tokens[members[0]]}"}
        async with http.post(f"{url}/api/conversations", json={"title": "soak"}, headers=headers) as r:
            body = await r.json()
            if r.status != 201:
                raise RuntimeError(f"creating a conversation: {r.status} {body}")
        for member in members[1:]:
            async with http.post(f"{url}/api/conversations/{body['id']}/participants", json={"user_id": member},
                                 headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"adding a participant: {r.status} {await r.text()}")
        cids.append(body["id"])
    return cids


def process_sample(pid: int, port: int | None = None) -> dict:
    """RSS (bytes) and open file descriptors of a process and its children.

    With ``port``: ``client_sockets`` are its TCP connections accepted on
    that port (one per client connection, or closing), and ``fds_other`` the
    descriptors that are not: those must not follow the clients' comings and
    goings, only leak."""
    rss = fds = sockets = 0
    try:
        proc = psutil.Process(pid)
        for p in (proc, *proc.children(recursive=True)):
            try:
                rss += p.memory_info().rss
                fds += p.num_fds()
                if port is not None:
                    sockets += sum(1 for c in p.net_connections(kind="tcp")
                                   if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN)
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    row = {"rss": rss, "fds": fds}
    if port is not None:
        row.update(client_sockets=sockets, fds_other=fds - sockets)
    return row


async def sampler(pids: dict[str, tuple[int, int | None]], clients: list[SoakClient], t0: float, every: float,
                  samples: list[dict], stop: asyncio.Event) -> None:
    while True:
        row = {"t": round(now() - t0, 1), **{name: process_sample(*pp) for name, pp in pids.items()},
               "connections": dict(Counter(c.epoch.instance for c in clients if c.live))}
        samples.append(row)
        try:
            await asyncio.wait_for(stop.wait(), every)
            return
        except TimeoutError:
            pass


# -- Firestore -----------------------------------------------------------------
def read_store(project: str, cids: list[str]) -> dict:
    """Every message of the soak's conversations, and every chunk of their replies."""
    from google.cloud import firestore

    db = firestore.Client(project=project)
    try:
        messages: dict[str, dict] = {}
        for cid in cids:
            for doc in db.collection("conversations").document(cid).collection("messages").stream():
                messages[doc.id] = {**doc.to_dict(), "id": doc.id, "conversation_id": cid, "chunks": []}
        for doc in db.collection_group("chunks").stream():
            message = messages.get(doc.reference.parent.parent.id)
            if message is not None:
                message["chunks"].append(doc.to_dict())
        for message in messages.values():
            message["chunks"].sort(key=lambda c: c.get("seq", 0))
        return messages
    finally:
        db.close()


def replies_in_progress(db, cids: list[str]) -> int:
    from google.cloud import firestore

    return sum(1 for cid in cids for _ in db.collection("conversations").document(cid).collection("messages")
               .where(filter=firestore.FieldFilter("status", "in", ["pending", "streaming"])).stream())


async def drain(project: str, cids: list[str], limit: float) -> tuple[float, int]:
    """Wait (bounded) until no reply of the soak is pending or streaming; returns (seconds, left)."""
    from google.cloud import firestore

    db = firestore.Client(project=project)
    t0 = now()
    try:
        while True:
            left = await asyncio.to_thread(replies_in_progress, db, cids)
            if left == 0 or now() - t0 > limit:
                return now() - t0, left
            await asyncio.sleep(1)
    finally:
        db.close()


# -- the comparison ------------------------------------------------------------
@dataclass
class Check:
    name: str
    figure: str
    passed: bool | None  # None: information only
    examples: list = field(default_factory=list)


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p * len(values)))] * 1000, 1)


class Analysis:
    def __init__(self, clients: list[SoakClient], store: dict, cids: list[str]):
        self.clients = clients
        self.store = store
        self.cids = cids
        self.epochs = [e for c in clients for e in c.epochs]
        self.stays = [s for c in clients for s in c.stays]
        self.calls = [k for c in clients for k in c.calls]
        self.stays_by_room: dict[str, list[Stay]] = defaultdict(list)
        for stay in self.stays:
            self.stays_by_room[stay.cid].append(stay)
        # The sends, by client_message_id: every attempt in order.
        self.sends: dict[str, list[Call]] = defaultdict(list)
        for call in self.calls:
            if call.event == "send_message":
                self.sends[call.payload["client_message_id"]].append(call)
        self.user_of = {c.index: c.user for c in clients}
        self.stored_user = [m for m in store.values() if m.get("role") == "user" and not m.get("files")]
        self.stored_by_cmid: dict[str, list[dict]] = defaultdict(list)
        for m in self.stored_user:
            self.stored_by_cmid[m.get("client_message_id")].append(m)
        # Acked messages whose first attempt was acked: their broadcast time is bounded by [sent, ack].
        self.messages: dict[str, Call] = {}  # message id -> the acked first attempt
        self.sent_at: dict[str, float] = {}  # user message id -> first attempt's send time
        for attempts in self.sends.values():
            ok = [a for a in attempts if a.ok]
            if ok:
                self.sent_at[ok[0].ack["message_id"]] = attempts[0].t_sent
                if attempts[0].ok:
                    self.messages[ok[0].ack["message_id"]] = attempts[0]
        self.received: dict[Epoch, Counter] = {e: Counter() for e in self.epochs}
        self.sequence: dict[tuple[Epoch, str], list[str]] = defaultdict(list)  # new_message ids in receipt order
        self.receipt: dict[tuple[Epoch, str], float] = {}
        for e in self.epochs:
            for t, event, data in e.events:
                if event in ("new_message", "file_uploaded") and isinstance(data, dict):
                    mid = data.get("message_id")
                    self.received[e][mid] += 1
                    self.receipt.setdefault((e, mid), t)
                    if event == "new_message" and self.received[e][mid] == 1:
                        self.sequence[(e, data.get("conversation_id"))].append(mid)

    def run(self) -> list[Check]:
        return [self.stored_once(), self.refused_not_stored(), self.delivered(), self.uploads(),
                self.order_agreement(), self.order_realtime(), self.replies_ended(), self.stored_chunks(),
                self.client_streams(), self.no_internal(), self.answered(), self.load(), self.stops()]

    def load(self) -> Check:
        ends = Counter(e.end_kind for e in self.epochs)
        by_instance = Counter(e.instance for e in self.epochs)
        calls = Counter(c.event for c in self.calls)
        return Check("load (information)",
                     f"{len(self.clients)} users, {len(self.cids)} rooms; calls {dict(calls)}; "
                     f"{sum(1 for c in self.clients for _ in c.uploads)} uploads; {len(self.epochs)} connections "
                     f"({', '.join(str(n) for n in by_instance.values())} per instance; dropped: "
                     f"{ends.get('clean', 0)} disconnect, {ends.get('transport', 0)} TCP shutdown; lost: "
                     f"{ends.get('lost', 0)}); {len(self.stays)} room stays", None)

    def stops(self) -> Check:
        info = self.reply_info
        late = [x for x in info["stopped_but_complete"] if x["chunks_after_stop_ack"]]
        return Check("stop_generation (information)",
                     f"{info['stop_calls_ok']} stops acked for {info['stopped_replies']} replies: ended "
                     f"{dict(info['stopped_final_status'])}; of those ended complete, {len(late)} sent chunks after "
                     f"the stop was acked", None, info["stopped_but_complete"][:EXAMPLES])

    # -- messages ------------------------------------------------------
    def stored_once(self) -> Check:
        acked = missing = duplicated = mismatched = changed = 0
        examples = []
        for cmid, attempts in self.sends.items():
            ok = [a for a in attempts if a.ok]
            if not ok:
                continue
            acked += 1
            ids = {a.ack["message_id"] for a in ok}
            docs = self.stored_by_cmid.get(cmid, [])
            first = attempts[0]
            problem = None
            if len(ids) > 1:
                changed += 1
                problem = f"retries got different ids {sorted(ids)}"
            elif not docs:
                missing += 1
                problem = "not stored"
            elif len(docs) > 1:
                duplicated += 1
                problem = f"stored {len(docs)} times"
            elif (docs[0]["id"] not in ids or docs[0].get("content") != first.payload["message"]
                  or docs[0].get("user_id") != self.user_of[first.client]
                  or docs[0].get("conversation_id") != first.payload["conversation_id"]):
                mismatched += 1
                problem = f"stored as {docs[0]['id']} with other fields"
            if problem and len(examples) < EXAMPLES:
                examples.append({"client_message_id": cmid, "acked_ids": sorted(ids), "problem": problem})
        retried = sum(1 for attempts in self.sends.values() if len(attempts) > 1 and sum(a.ok for a in attempts) > 1)
        bad = missing + duplicated + mismatched + changed
        return Check("acked messages stored exactly once",
                     f"{acked - bad}/{acked} (missing {missing}, duplicated {duplicated}, other fields {mismatched}, "
                     f"retry answered another id {changed}; {retried} retried after ok)", bad == 0, examples)

    def refused_not_stored(self) -> Check:
        refused = stored = after_unknown = 0
        examples = []
        for cmid, attempts in self.sends.items():
            if any(a.ok for a in attempts):
                continue
            codes = {a.code for a in attempts}
            if codes & {"unavailable", None}:  # outcome unknown: may be stored (and then announced)
                after_unknown += bool(self.stored_by_cmid.get(cmid))
                continue
            refused += 1
            if self.stored_by_cmid.get(cmid):
                stored += 1
                if len(examples) < EXAMPLES:
                    examples.append({"client_message_id": cmid, "codes": sorted(codes)})
        known = set(self.sends)
        strangers = sum(1 for m in self.stored_user if m.get("client_message_id") not in known)
        return Check("refused sends stored nothing",
                     f"{refused - stored}/{refused} refused sends not stored; stored after unavailable/no answer: "
                     f"{after_unknown}; stored messages nobody sent: {strangers}", stored == 0 and strangers == 0,
                     examples)

    def _expected(self, cid: str, t_from: float, t_until: float) -> list[Stay]:
        """The stays in ``cid`` connected at the time: joined (acked) before ``t_from``, still there at ``t_until``."""
        return [s for s in self.stays_by_room[cid] if s.t_join_ack < t_from and s.t_end >= t_until]

    def delivered(self) -> Check:
        expected = missing = duplicates = 0
        local, remote = [], []
        examples = []
        for mid, send in self.messages.items():
            cid = send.payload["conversation_id"]
            for stay in self._expected(cid, send.t_sent, send.t_ack + BUS_GRACE_SECONDS):
                expected += 1
                if self.received[stay.epoch][mid] == 0:
                    missing += 1
                    if len(examples) < EXAMPLES:
                        examples.append({"message_id": mid, "room": cid, "receiver": stay.client,
                                         "epoch": stay.epoch.n, "receiver_instance": stay.epoch.instance,
                                         "sender_instance": send.epoch.instance})
        for counts in self.received.values():
            duplicates += sum(n - 1 for n in counts.values() if n > 1)
        for (e, mid), t in self.receipt.items():
            send = self.messages.get(mid)
            if send is not None:
                (local if e.instance == send.epoch.instance else remote).append(t - send.t_sent)
        self.latency = {"same_instance": {"p50_ms": pct(local, 0.5), "p99_ms": pct(local, 0.99),
                                          "max_ms": pct(local, 1.0), "n": len(local)},
                        "other_instance": {"p50_ms": pct(remote, 0.5), "p99_ms": pct(remote, 0.99),
                                           "max_ms": pct(remote, 1.0), "n": len(remote)}}
        same, other = self.latency["same_instance"], self.latency["other_instance"]
        return Check("acked messages delivered to every member connected at the time",
                     f"{expected - missing}/{expected} deliveries of {len(self.messages)} messages "
                     f"(missing {missing}, duplicate receipts {duplicates}); send->receipt p99/max "
                     f"{same['p99_ms']}/{same['max_ms']} ms same instance, "
                     f"{other['p99_ms']}/{other['max_ms']} ms other instance",
                     missing == 0 and duplicates == 0, examples)

    def uploads(self) -> Check:
        uploads = [u for c in self.clients for u in c.uploads]
        put = [u for u in uploads if u.put_status == 200]
        stored_once = expected = missing = 0
        examples = []
        for u in put:
            mid = file_message_id(u.upload_id)
            doc = self.store.get(mid)
            if doc is not None and len(doc.get("files", [])) == 1 and doc.get("conversation_id") == u.cid:
                stored_once += 1
            elif len(examples) < EXAMPLES:
                examples.append({"upload_id": u.upload_id, "problem": "no file message stored"})
            for stay in self._expected(u.cid, u.t_start, u.t_put + FILE_GRACE_SECONDS):
                expected += 1
                if self.received[stay.epoch][mid] == 0:
                    missing += 1
                    if len(examples) < EXAMPLES:
                        examples.append({"upload_id": u.upload_id, "receiver": stay.client, "epoch": stay.epoch.n,
                                         "problem": "file_uploaded not received"})
        # The uploader waits for its own file_uploaded (FILE_WAIT_SECONDS) while staying in the room.
        own_missing = [u for u in put if u.t_event is None and u.epoch.end_kind != "lost"]
        for u in own_missing[:EXAMPLES]:
            examples.append({"upload_id": u.upload_id, "problem": u.error})
        latencies = [u.t_event - u.t_put for u in put if u.t_event]
        refused = Counter(str(u.post_status) for u in uploads if u.post_status not in (201, None))
        errors = Counter(u.error.split(":")[0] for u in uploads if u.error)
        files_stored = sum(1 for m in self.store.values() if m.get("files"))
        self.upload_info = {"requested": len(uploads), "put": len(put), "refused": dict(refused),
                            "errors": dict(errors), "file_messages_stored": files_stored,
                            "put_to_file_uploaded_p50_ms": pct(latencies, 0.5),
                            "put_to_file_uploaded_max_ms": pct(latencies, 1.0)}
        ok = stored_once == len(put) and missing == 0 and files_stored == len(put) and not own_missing
        return Check("uploads stored once and delivered",
                     f"{stored_once}/{len(put)} uploads stored as one file message ({files_stored} in all); "
                     f"uploader got file_uploaded {len(put) - len(own_missing)}/{len(put)}; "
                     f"{expected - missing}/{expected} deliveries to stays connected at the time; PUT->file_uploaded max "
                     f"{self.upload_info['put_to_file_uploaded_max_ms']} ms; refused {dict(refused) or 0}", ok,
                     examples)

    def _same_instance(self, x: str, y: str) -> bool:
        """Both messages were sent through the same socket-service instance."""
        sx, sy = self.messages.get(x), self.messages.get(y)
        return sx is not None and sy is not None and sx.epoch.instance == sy.epoch.instance

    def order_agreement(self) -> Check:
        """Any two connections agree on the order of two messages sent through one instance.

        Messages sent through different instances at nearly the same time may
        arrive in different orders (each instance delivers its own emits at
        once and the other's a bus round trip later, DESIGN.md); the order
        every client converges on is the stored one, by ``timestamp``, which
        the chat page places messages by. Those pairs are counted, not failed.
        """
        pairs: set[frozenset] = set()
        across: set[frozenset] = set()
        examples = []
        compared = 0
        for cid in self.cids:
            seqs = [(e, s) for (e, room), s in self.sequence.items() if room == cid and len(s) > 1]
            for i in range(len(seqs)):
                ea, a = seqs[i]
                pos_a = {m: k for k, m in enumerate(a)}
                for eb, b in seqs[i + 1:]:
                    common = [m for m in b if m in pos_a]
                    if len(common) < 2:
                        continue
                    compared += 1
                    for x, y in zip(common, common[1:], strict=False):  # b's order; a must agree on every adjacent pair
                        if pos_a[x] < pos_a[y]:
                            continue
                        if not self._same_instance(x, y):
                            across.add(frozenset((x, y)))
                        elif frozenset((x, y)) not in pairs:
                            pairs.add(frozenset((x, y)))
                            if len(examples) < EXAMPLES:
                                examples.append(self._pair(cid, x, y, (ea, eb)))
        # For information: how often a receiver got two messages in the other order than the stored one
        # (the history's order, by timestamp).
        key = {mid: m.get("sort_key") or "" for mid, m in self.store.items()}
        against_history = sum(1 for seq in self.sequence.values() for x, y in zip(seq, seq[1:], strict=False)
                              if x in key and y in key and key[x] > key[y])
        return Check("same order at every receiver, for messages sent through one instance",
                     f"{len(pairs)} message pairs received in opposite orders by two connections ({compared} pairs "
                     f"of connections compared); pairs sent through different instances received in opposite "
                     f"orders (allowed, placed by timestamp): {len(across)}; consecutive receipts in another "
                     f"order than the history's: {against_history}", not pairs, examples)

    def _pair(self, cid: str, x: str, y: str, epochs: tuple[Epoch, ...]) -> dict:
        def info(mid):
            send = self.messages.get(mid)
            return {"message_id": mid, "sender": send.client if send else None,
                    "sender_instance": send.epoch.instance if send else None,
                    "sent": round(send.t_sent, 3) if send else None,
                    "acked": round(send.t_ack, 3) if send else None}

        return {"room": cid, "messages": [info(x), info(y)],
                "receivers": [{"client": e.client, "epoch": e.n, "instance": e.instance,
                               "order": [m for m in self.sequence[(e, cid)] if m in (x, y)],
                               "received": [round(self.receipt[(e, m)], 3) for m in (x, y)
                                            if (e, m) in self.receipt]} for e in epochs]}

    def order_realtime(self) -> Check:
        """A message acked before another was sent through the same instance is received before it.

        Across instances this is counted, not failed (see ``order_agreement``)."""
        violations = same_sender = across = 0
        examples = []
        for (e, cid), seq in self.sequence.items():
            known = [m for m in seq if m in self.messages]
            # Walking back from the end: per sending instance, the earliest-acked message received later.
            earliest_later: dict[str, tuple[float, str]] = {}
            for mid in reversed(known):
                send = self.messages[mid]
                for instance, (ack, other) in earliest_later.items():
                    if ack >= send.t_sent:
                        continue
                    if instance != send.epoch.instance:
                        across += 1
                        continue
                    violations += 1
                    same_sender += self.messages[other].client == send.client
                    if len(examples) < EXAMPLES:
                        examples.append(self._pair(cid, mid, other, (e,)))
                best = earliest_later.get(send.epoch.instance)
                if best is None or send.t_ack < best[0]:
                    earliest_later[send.epoch.instance] = (send.t_ack, mid)
        return Check("acked-before-sent order kept, for messages sent through one instance",
                     f"{violations} receipts of a message before one acked before it was sent "
                     f"({same_sender} of them from the same sender); through different instances (allowed): "
                     f"{across}", violations == 0, examples)

    # -- replies -------------------------------------------------------
    def replies_ended(self) -> Check:
        replies = [m for m in self.store.values() if m.get("role") == "assistant"]
        statuses = Counter(m.get("status") for m in replies)
        open_ = [m for m in replies if m.get("status") not in ENDED]
        reply_of = {m.get("reply_to") for m in replies}
        orphans = [mid for mid in self.sent_at if mid not in reply_of]
        stops = [c for c in self.calls if c.event == "stop_generation" and c.ok]
        stopped = {mid for c in stops for mid in c.ack.get("message_ids", [])}
        stopped_status = Counter(self.store.get(mid, {}).get("status") for mid in stopped)
        # A stopped reply that ended complete: how much it produced after the stop was acknowledged.
        not_cancelled = []
        for call in stops:
            for mid in call.ack.get("message_ids", []):
                stored = self.store.get(mid, {})
                if stored.get("status") != "complete":
                    continue
                events = [(t, ev, d) for t, ev, d in call.epoch.events
                          if isinstance(d, dict) and d.get("message_id") == mid]
                before = [d["seq"] for t, ev, d in events if ev == "ai_response_chunk" and t <= call.t_ack]
                after = [d["seq"] for t, ev, d in events if ev == "ai_response_chunk" and t > call.t_ack]
                ends = [t for t, ev, _ in events if ev in END_EVENTS]
                not_cancelled.append({"reply": mid, "stored_seq": stored.get("seq"),
                                      "last_seq_before_stop_ack": max(before, default=None),
                                      "chunks_after_stop_ack": len(after),
                                      "stop_ack_to_end_ms": round((ends[0] - call.t_ack) * 1000) if ends else None,
                                      "stop_sent_to_ack_ms": round((call.t_ack - call.t_sent) * 1000)})
        self.reply_info = {"statuses": dict(statuses), "stop_calls_ok": len(stops),
                           "stopped_replies": len(stopped), "stopped_final_status": dict(stopped_status),
                           "stopped_but_complete": not_cancelled,
                           "error_codes": dict(Counter((m.get("error") or {}).get("code") for m in replies
                                                       if m.get("status") == "error"))}
        examples = [{"message_id": m["id"], "status": m.get("status")} for m in open_[:EXAMPLES]]
        examples += [{"user_message_id": mid, "problem": "no reply stored"} for mid in orphans[:EXAMPLES]]
        return Check("every reply ended",
                     f"{len(replies) - len(open_)}/{len(replies)} ended ({', '.join(f'{k} {v}' for k, v in sorted(statuses.items()))}); "
                     f"{len(stopped)} stopped: {dict(stopped_status)}; acked messages without a reply: {len(orphans)}",
                     not open_ and not orphans, examples)

    def stored_chunks(self) -> Check:
        bad = []
        replies = [m for m in self.store.values() if m.get("role") == "assistant" and m.get("status") in ENDED]
        for m in replies:
            seqs = [c.get("seq") for c in m["chunks"]]
            text = "".join(c.get("text", "") for c in m["chunks"])
            if seqs != list(range(1, len(seqs) + 1)) or len(seqs) != m.get("seq", 0) or text != m.get("content"):
                bad.append({"message_id": m["id"], "status": m.get("status"), "chunk_seqs": seqs[:50],
                            "stored_seq": m.get("seq"), "chunks_chars": len(text),
                            "content_chars": len(m.get("content") or "")})
        chunks = sum(len(m["chunks"]) for m in replies)
        return Check("stored chunks 1..seq join to the stored content",
                     f"{len(replies) - len(bad)}/{len(replies)} replies ({chunks} chunks)", not bad, bad[:EXAMPLES])

    def client_streams(self) -> Check:
        full = resumed = prefix = skipped = dropped = 0
        bad = []
        for stay in self.stays:
            window_end = stay.t_end
            chunks: dict[str, list] = defaultdict(list)
            ends: dict[str, dict] = {}
            for t, event, data in stay.epoch.events:
                if t < stay.t_join_sent or t > window_end or not isinstance(data, dict):
                    continue
                if data.get("conversation_id") != stay.cid:
                    continue
                if event == "ai_response_chunk":
                    chunks[data.get("message_id")].append((data.get("seq"), data.get("chunk", "")))
                elif event in END_EVENTS:
                    ends.setdefault(data.get("message_id"), {"event": event, **data})
            for rid in set(chunks) | set(ends):
                stored = self.store.get(rid)
                if stored is None:
                    continue
                if rid in stay.snapshot:
                    s0, base = stay.snapshot[rid]
                elif self.sent_at.get(stored.get("reply_to"), -1) > stay.t_join_ack:
                    s0, base = 0, ""  # the reply was created after the join: every chunk comes live
                else:
                    skipped += 1  # created before the join and not in the snapshot: it ended meanwhile
                    continue
                got = chunks.get(rid, [])
                live = [(s, c) for s, c in got if s > s0]
                dropped += len(got) - len(live)
                seqs = [s for s, _ in live]
                text = base + "".join(c for _, c in live)
                end = ends.get(rid)
                problem = None
                if end is not None:
                    if rid in stay.snapshot:
                        resumed += 1
                    else:
                        full += 1
                    if seqs != list(range(s0 + 1, stored.get("seq", 0) + 1)):
                        problem = "chunk seqs after the snapshot are not s0+1..seq"
                    elif text != stored.get("content"):
                        problem = "snapshot + chunks differ from the stored content"
                    elif end["event"] == "ai_response_complete" and end.get("content") != stored.get("content"):
                        problem = "ai_response_complete content differs from the stored content"
                else:
                    prefix += 1
                    if seqs != list(range(s0 + 1, s0 + 1 + len(seqs))):
                        problem = "chunk seqs of a stay that left mid-reply have a gap or repeat"
                    elif not stored.get("content", "").startswith(text):
                        problem = "received text is not a prefix of the stored content"
                if problem:
                    bad.append({"reply": rid, "receiver": stay.client, "epoch": stay.epoch.n,
                                "instance": stay.epoch.instance, "problem": problem, "snapshot_seq": s0,
                                "seqs": seqs[:60], "stored_seq": stored.get("seq"), "status": stored.get("status")})
        self.stream_info = {"stays_to_the_end_from_start": full, "stays_to_the_end_resumed": resumed,
                            "stays_left_mid_reply": prefix, "not_checkable": skipped,
                            "chunks_at_or_below_snapshot_dropped": dropped}
        checked = full + resumed + prefix
        return Check("clients' chunk streams gap-free and equal to the stored content",
                     f"{checked - len(bad)}/{checked} (reply, stay) pairs: {full} whole, {resumed} resumed from a "
                     f"snapshot, {prefix} left mid-reply; {dropped} chunks at or below a snapshot dropped",
                     not bad, bad[:EXAMPLES])

    # -- answers -------------------------------------------------------
    def no_internal(self) -> Check:
        codes: Counter = Counter()
        for call in self.calls:
            if call.code is not None:
                codes[f"{call.event}:{call.code}"] += 1
        events: Counter = Counter()
        for e in self.epochs:
            for _, event, data in e.events:
                if event == "error" and isinstance(data, dict):
                    events[f"{data.get('event')}:{data.get('code')}"] += 1
        uploads: Counter = Counter(f"upload:{u.post_status}" for c in self.clients for u in c.uploads
                                   if u.post_status not in (201, None))
        internal = sum(n for k, n in (codes + events).items() if k.endswith(":internal"))
        server_errors = sum(n for k, n in uploads.items() if k.split(":")[1].startswith("5"))
        self.codes = {"acks": dict(codes), "error_events": dict(events), "upload_http": dict(uploads)}
        return Check("0 internal", f"{internal} internal; 5xx from request_upload: {server_errors}; "
                     f"acks: {dict(sorted(codes.items())) or 'none'}", internal == 0 and server_errors == 0)

    def answered(self) -> Check:
        unanswered = [c for c in self.calls if c.ack is None and not c.lost]
        lost = sum(1 for c in self.calls if c.ack is None and c.lost)
        latencies = [c.t_ack - c.t_sent for c in self.calls if c.t_ack is not None]
        late = [c for c in self.calls if c.t_ack is not None and c.t_ack - c.t_sent > DEADLINE_SECONDS + ANSWER_SLACK]
        by_event = {ev: {"n": len(v), "p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99), "max_ms": pct(v, 1.0)}
                    for ev in sorted({c.event for c in self.calls})
                    for v in [[c.t_ack - c.t_sent for c in self.calls if c.event == ev and c.t_ack is not None]]}
        self.call_info = by_event
        examples = [{"event": c.event, "client": c.client, "epoch": c.epoch.n, "instance": c.epoch.instance,
                     "seconds": round((c.t_ack or now()) - c.t_sent, 2)} for c in (unanswered + late)[:EXAMPLES]]
        return Check("every call answered within the deadline",
                     f"{len(self.calls) - len(unanswered) - lost - len(late)}/{len(self.calls) - lost} calls "
                     f"(unanswered {len(unanswered)}, later than {DEADLINE_SECONDS:g}+{ANSWER_SLACK:g} s {len(late)}; "
                     f"{lost} lost with a dropped connection); slowest {pct(latencies, 1.0)} ms",
                     not unanswered and not late, examples)


def growth_checks(samples: list[dict], after: dict[str, dict], load_seconds: float,
                  warmup_fraction: float) -> tuple[list[Check], dict]:
    """RSS and fds of each service: median over the last 10% of the load vs the 10% right after warm-up.

    The fds compared are those other than client connections (``fds_other``):
    the clients connected to an instance vary at random between 0 and all of
    them, one descriptor each. The client sockets themselves must all be
    closed once the clients are gone (``after``, sampled a few seconds after
    the last disconnect)."""
    warm = warmup_fraction * load_seconds
    width = max(0.1 * load_seconds, 15.0)
    first = [s for s in samples if warm <= s["t"] <= warm + width]
    last = [s for s in samples if load_seconds - width <= s["t"] <= load_seconds]
    checks, figures = [], {}
    for name, final in after.items():
        for metric, label, unit, scale in (("rss", "RSS", "MiB", 2**20),
                                           ("fds_other", "open fds", "fds", 1)):
            a = statistics.median(s[name][metric] for s in first) if first else None
            b = statistics.median(s[name][metric] for s in last) if last else None
            peak = max((s[name][metric] for s in samples), default=0)
            growth = (b / a - 1) if a and b is not None else None
            figures[f"{name}.{metric}"] = {"after_warmup": a, "end": b, "peak": peak, "growth": growth,
                                           "samples_after_warmup": len(first), "samples_end": len(last)}

            def shown(v, scale=scale):
                return f"{v / scale:.1f}" if v is not None else "?"

            figure = (f"{shown(a)} -> {shown(b)} {unit} ({growth * 100:+.1f}%; peak {shown(peak)})"
                      if growth is not None else "not enough samples")
            passed = growth is not None and growth < GROWTH_LIMIT
            if metric == "fds_other":
                total = [s[name]["fds"] for s in last]
                figure += (f", besides client sockets; with them {min(total, default=0)}-{max(total, default=0)} "
                           f"at the end; client sockets left after the clients went: {final['client_sockets']}")
                figures[f"{name}.after_clients_left"] = final
                passed = passed and final["client_sockets"] == 0
            checks.append(Check(f"{name} {label} flat after warm-up", figure, passed))
    return checks, figures


# -- the run -------------------------------------------------------------------
async def soak(stack: Stack, urls: list[str], args, out: dict, ledger_path: Path) -> list[Check]:
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"{urls[0]}/config.json") as r:
            config = await r.json()
        users = [f"soak{i}-{uuid.uuid4().hex[:6]}" for i in range(args.users)]
        ttl = int(args.minutes * 60 + 3600)
        tokens = {u: issue_token(stack.jwt_secret, u, name=f"Soak {i}", ttl_seconds=ttl) for i, u in enumerate(users)}
        plan = room_plan(users, args.rooms)
        cids = await create_rooms(http, urls[0], tokens, plan)
        out["rooms"] = [{"conversation_id": cid, "members": len(m)} for cid, m in zip(cids, plan, strict=True)]
        run = Run(urls, config["upload_url"], http, args.seed, args.think_seconds)
        clients = [SoakClient(run, i, u, tokens[u], [cid for cid, m in zip(cids, plan, strict=True) if u in m])
                   for i, u in enumerate(users)]
        for c in clients:
            if not await c.connect(urls[c.index % len(urls)]):
                raise RuntimeError(f"client {c.index} could not connect")
            for cid in c.conversations:
                await c.join(cid)

        pids = {p.name: (p.proc.pid, p.port) for p in stack.processes if p.name in ("socket-a", "socket-b")}
        info_pids = {p.name: (p.proc.pid, None) for p in stack.processes if p.name in ("ai-stream",)}
        samples: list[dict] = []
        stop_sampling = asyncio.Event()
        t0 = now()
        load_seconds = args.minutes * 60
        stop_at = t0 + load_seconds
        sampling = asyncio.create_task(sampler({**pids, **info_pids}, clients, t0, args.sample_seconds, samples,
                                               stop_sampling))
        loops = [asyncio.create_task(c.loop(stop_at)) for c in clients]

        async def progress():
            while now() < stop_at:
                await asyncio.sleep(min(60, max(1.0, stop_at - now())))
                sends = sum(1 for c in clients for k in c.calls if k.event == "send_message" and k.ok)
                last = samples[-1] if samples else {}
                rss = ", ".join(f"{n} {last[n]['rss'] / 2**20:.0f} MiB/{last[n]['fds']} fds "
                                f"({last[n]['client_sockets']} client sockets)"
                                for n in pids if n in last)
                print(f"  {now() - t0:5.0f} s: {sends} sends acked, {sum(len(c.epochs) for c in clients)} "
                      f"connections, {rss}", flush=True)

        reporter = asyncio.create_task(progress())
        print(f"load: {len(clients)} users, {len(cids)} rooms, {args.minutes:g} min on {', '.join(urls)}", flush=True)
        _, pending = await asyncio.wait(loops, timeout=load_seconds + 90)
        for task in pending:  # a client stuck in an action past the bound: stop it
            task.cancel()
        if pending:
            run.problem(f"{len(pending)} client loops did not end by themselves and were cancelled")
            await asyncio.gather(*pending, return_exceptions=True)
        load_end = now()
        stop_sampling.set()
        reporter.cancel()
        await asyncio.gather(sampling, reporter, return_exceptions=True)

        print("load stopped; waiting for the replies to end", flush=True)
        drained, left = await drain(stack.project_id, cids, DRAIN_SECONDS)
        await asyncio.sleep(SETTLE_SECONDS)
        t_final = now()
        for c in clients:
            await c.finish(t_final)
        await asyncio.sleep(SETTLE_SECONDS)  # the services notice the last disconnects
        after = {name: process_sample(*pp) for name, pp in pids.items()}

    await asyncio.to_thread(write_ledger, ledger_path, clients, t0)
    store = await asyncio.to_thread(read_store, stack.project_id, cids)
    analysis = Analysis(clients, store, cids)
    checks = analysis.run()
    growth, figures = growth_checks(samples, after, load_end - t0, args.warmup_fraction)
    checks += growth
    epochs = [e for c in clients for e in c.epochs]
    out.update({
        "load_seconds": round(load_end - t0, 1), "drain_seconds": round(drained, 1), "replies_left_after_drain": left,
        "actions": dict(run.actions), "calls": analysis.call_info, "codes": analysis.codes,
        "connections": {"total": len(epochs), "by_instance": dict(Counter(e.instance for e in epochs)),
                        "ends": dict(Counter(e.end_kind for e in epochs))},
        "stays": len(analysis.stays), "delivery_latency": analysis.latency, "uploads": analysis.upload_info,
        "replies": analysis.reply_info, "streams": analysis.stream_info, "resources": figures,
        "events_received": dict(Counter(ev for e in epochs for _, ev, _ in e.events)),
        "client_problems": run.problems, "samples": samples,
    })
    return checks


def write_ledger(path: Path, clients: list[SoakClient], t0: float) -> None:
    """Every client's ledger, one JSON line per client, times in seconds from the start of the load."""
    def t(v):
        return None if v is None else round(v - t0, 4)

    with gzip.open(path, "wt") as f:
        for c in clients:
            f.write(json.dumps({
                "client": c.index, "user": c.user, "conversations": c.conversations,
                "epochs": [{"n": e.n, "instance": e.instance, "connected": t(e.t_connect), "ended": t(e.t_end),
                            "end": e.end_kind, "events": [[t(at), ev, data] for at, ev, data in e.events]}
                           for e in c.epochs],
                "calls": [{"epoch": k.epoch.n, "event": k.event, "payload": k.payload, "sent": t(k.t_sent),
                           "answered": t(k.t_ack), "ack": k.ack, "lost": k.lost} for k in c.calls],
                "stays": [{"epoch": s.epoch.n, "room": s.cid, "join_sent": t(s.t_join_sent),
                           "join_acked": t(s.t_join_ack), "ended": t(s.t_end),
                           "snapshot": {r: list(v) for r, v in s.snapshot.items()}} for s in c.stays],
                "uploads": [{"epoch": u.epoch.n, "room": u.cid, "upload_id": u.upload_id, "started": t(u.t_start),
                             "post_status": u.post_status, "put_status": u.put_status, "put_done": t(u.t_put),
                             "file_uploaded": t(u.t_event), "error": u.error} for u in c.uploads],
            }, default=str) + "\n")


def service_log_problems(log_dir: Path) -> Check:
    """WARNING and worse lines in the logs of our own processes (not the emulators')."""
    counts: Counter = Counter()
    for path in sorted(log_dir.glob("*.log")):
        if path.name.startswith(("firestore", "pubsub", "fake-gcs")):
            continue
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                if "Traceback" in line or "ERROR" in line:
                    counts[(path.stem.rsplit("-", 1)[0], "ERROR", line[:120])] += 1
                continue
            if isinstance(entry, dict) and entry.get("severity") in ("WARNING", "ERROR", "CRITICAL"):
                counts[(path.stem.rsplit("-", 1)[0], entry["severity"], str(entry.get("message"))[:120])] += 1
    by_severity = Counter()
    for (_, severity, _), n in counts.items():
        by_severity[severity] += n
    return Check("service logs (information)",
                 f"WARNING or worse: {dict(by_severity) or 'none'}", None,
                 [{"process": k[0], "severity": k[1], "message": k[2], "lines": n}
                  for k, n in counts.most_common(EXAMPLES)])


def print_table(checks: list[Check]) -> None:
    print("\n| check | figure | result |\n|---|---|---|")
    for c in checks:
        result = "info" if c.passed is None else ("pass" if c.passed else "FAIL")
        print(f"| {c.name} | {c.figure} | {result} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0,
                   help="length of the load phase (default 30: the RSS saw-tooth has a period of 11-15 minutes)")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--rooms", type=int, default=4)
    p.add_argument("--think-seconds", type=float, default=1.5, help="mean pause between a client's actions")
    p.add_argument("--sample-seconds", type=float, default=5.0, help="RSS/fd sampling period")
    p.add_argument("--warmup-fraction", type=float, default=0.2, help="part of the load phase that is warm-up")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    if args.users < 2 or args.rooms < 1 or args.minutes <= 0 or not 0 < args.warmup_fraction < 0.9:
        p.error("needs at least 2 users, 1 room, a positive time and a warm-up fraction below 0.9")
    args.seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    for name in ("socketio", "engineio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # SIGTERM unwinds like Ctrl-C, so the stack is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    checks: list[Check] = []

    def body(stack: Stack, out: dict) -> None:
        stamp = stack.log_dir.name.removeprefix("logs-soak-")
        ledger = RESULTS / f"soak-{stamp}-ledger.jsonl.gz"
        out.update(code=code_state(), args=vars(args), ledger=str(ledger.relative_to(ROOT)),
                   limits="service defaults (AI_MAX_CONCURRENT_PER_USER 2, AI_MESSAGES_PER_WINDOW 30 per 60 s, "
                          "UPLOADS_PER_WINDOW 30 per 60 s)")
        print(f"soak: seed {args.seed}; logs in {stack.log_dir.relative_to(ROOT)}/", flush=True)
        os.environ.update(stack.emulator_env)  # this process reads Firestore at the end
        stack.start_ai_function(stack.ports.ai)
        stack.start_upload_functions()
        port_b = free_port()
        stack.start_socket_service(stack.ports.chat, name="socket-a")
        stack.start_socket_service(port_b, name="socket-b")
        urls = [stack.chat_url(), stack.chat_url(port_b)]
        RESULTS.mkdir(parents=True, exist_ok=True)
        budget = args.minutes * 60 + 90 + DRAIN_SECONDS + 300  # load, stuck actions, drain, set-up and reading
        checks.extend(asyncio.run(asyncio.wait_for(soak(stack, urls, args, out, ledger), budget)))
        checks.append(service_log_problems(stack.log_dir))
        out["failed"] = [c.name for c in checks if c.passed is False]
        out["checks"] = [{"check": c.name, "figure": c.figure, "passed": c.passed, "examples": c.examples}
                         for c in checks]
        out.update(json.loads(json.dumps(out, default=str)))  # plain JSON types only (stored timestamps, ...)

    rc = run_on_stack("soak", body)
    if checks:
        print_table(checks)
        for c in checks:
            if (c.passed is False or c.name.startswith("service logs")) and c.examples:
                print(f"\n{c.name}: first examples\n" + "\n".join(json.dumps(x, default=str) for x in c.examples[:3]))
    return rc or (1 if any(c.passed is False for c in checks) else 0)


if __name__ == "__main__":
    sys.exit(main())
