"""Chat UI benchmark in headless Chromium: a 2,000-message conversation and a reply streamed at 50 chunks/s.

Run: ``.venv/bin/python bench/ui_perf.py`` (a few minutes; ``--help``). It is a benchmark, not a test: it
prints figures and writes them as JSON under bench/results/ui_perf-<stamp>.json. Everything runs on
127.0.0.1 through devstack's ``Stack`` (Firestore and Pub/Sub emulators, fake-gcs-server, the ai_stream
function with CHUNK_INTERVAL_MS=20 and a small OFFLINE_TOKEN_DELAY_MS, the socket service) and Debian's
Chromium driven by Playwright with the flags of tests/browser/conftest.py; all of it is stopped at the end,
whatever happens, and ``--max-minutes`` bounds the run.

1. **History.** ``--messages`` messages (alternating user / assistant, the assistant ones short Markdown)
   are written straight into the Firestore emulator with ``Message.to_doc`` (same shape and ``sort_key``
   as the service). The page switches from a small conversation to the big one ``--runs`` times; each
   time, in the page, from the click to the first animation frame in which the newest message (the last
   one of the first page) is in the DOM and inside the visible part of ``#messages``. Then it scrolls to
   the top ``--older-pages`` times, timing each older page (scrollTop=0 until 50 more messages are there).
2. **Streaming.** ``/stream N`` in the big conversation (and, for comparison, in an empty one). An init
   script, registered before the page loads, (a) observes ``longtask`` entries and (b) wraps WebSocket to
   timestamp every incoming ``ai_response_chunk`` frame; a MutationObserver counts re-renders of the
   reply's element. Reported: chunks and their rate at the page, renders, long tasks inside the streaming
   window (first chunk .. ``ai_response_complete``), and whether the rendered text equals the reply.
   The function stores each chunk before emitting it, so the real path gives ~25-30 chunks/s here, not 50.
3. **The UI alone at exactly 50 chunks/s** (``--inject-rate``): ``ai_response_chunk`` frames are fed to the
   page's own Socket.IO WebSocket (``onmessage``, the same parsing and rendering code), then
   ``ai_response_complete``; same figures. Last, the cost of one re-parse (marked + DOMPurify) of a reply
   of 100..2,000 words, which the page does at every rendered frame.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import load  # noqa: E402
from bench.stack_run import run_on_stack  # noqa: E402
from chatcore.identity.auth import issue_token  # noqa: E402
from chatcore.store.conversations import Message  # noqa: E402
from devstack.stack import Stack  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUOTAS = {"AI_MAX_CONCURRENT_PER_USER": "1000", "AI_MESSAGES_PER_WINDOW": "100000"}

INIT_SCRIPT = r"""
(() => {
  window.__longtasks = [];
  try {
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) window.__longtasks.push({start: e.startTime, duration: e.duration});
    }).observe({type: "longtask", buffered: true});
    window.__longtaskSupported = true;
  } catch (e) { window.__longtaskSupported = false; }
  window.__frames = {chunk: [], complete: []};
  const Native = window.WebSocket;
  class Counting extends Native {
    constructor(...args) {
      super(...args);
      (window.__sockets = window.__sockets || []).push(this);
      this.addEventListener("message", (ev) => {
        if (typeof ev.data !== "string") return;
        if (ev.data.startsWith('42["ai_response_chunk"')) window.__frames.chunk.push(performance.now());
        else if (ev.data.startsWith('42["ai_response_complete"')) window.__frames.complete.push(performance.now());
      });
    }
  }
  window.WebSocket = Counting;
})();
"""

# Click a conversation and wait, frame by frame, for `lastId` to be in the DOM and visible in #messages.
OPEN_JS = r"""
async ([convId, lastId, pageSize]) => {
  const button = document.querySelector(`#conversations button[data-id="${convId}"]`);
  const box = document.getElementById("messages");
  const lt0 = window.__longtasks.length;
  const t0 = performance.now();
  button.click();
  for (;;) {
    await new Promise((r) => requestAnimationFrame(r));
    const li = document.querySelector(`#message-list li[data-id="${lastId}"]`);
    if (li && document.querySelectorAll("#message-list > li").length >= pageSize) {
      const a = li.getBoundingClientRect(), b = box.getBoundingClientRect();
      if (a.bottom > b.top && a.top < b.bottom && a.height > 0) break;
    }
    if (performance.now() - t0 > 60000) return {error: "timeout"};
  }
  const ms = performance.now() - t0;
  const lts = window.__longtasks.slice(lt0).filter((e) => e.start >= t0);
  return {ms, count: document.querySelectorAll("#message-list > li").length,
          longtasks: lts.length, longtask_max: Math.max(0, ...lts.map((e) => e.duration))};
}
"""

OLDER_JS = r"""
async ([pageSize]) => {
  const box = document.getElementById("messages");
  const n0 = document.querySelectorAll("#message-list > li").length;
  const t0 = performance.now();
  box.scrollTop = 0;
  for (;;) {
    await new Promise((r) => requestAnimationFrame(r));
    if (document.querySelectorAll("#message-list > li").length >= n0 + pageSize) break;
    if (performance.now() - t0 > 60000) return {error: "timeout"};
  }
  return {ms: performance.now() - t0, count: document.querySelectorAll("#message-list > li").length};
}
"""

# Counts re-renders (replaceChildren) of assistant elements that are streaming.
WATCH_JS = r"""
() => {
  window.__renders = [];
  window.__mo && window.__mo.disconnect();
  window.__mo = new MutationObserver((records) => {
    const now = performance.now();
    const seen = new Set();
    for (const r of records) {
      const t = r.target;
      if (r.type === "childList" && t.tagName === "LI" && t.dataset.role === "assistant" && !seen.has(t)) {
        seen.add(t);
        window.__renders.push({t: now, status: t.dataset.status, len: t.textContent.length});
      }
    }
  });
  window.__mo.observe(document.getElementById("message-list"), {childList: true, subtree: true});
  window.__frames.chunk.length = 0;
  window.__frames.complete.length = 0;
  return performance.now();
}
"""

COLLECT_JS = r"""
(t0) => ({chunks: window.__frames.chunk.filter((t) => t >= t0), complete: window.__frames.complete.filter((t) => t >= t0),
          renders: window.__renders, longtasks: window.__longtasks.filter((e) => e.start >= t0),
          supported: window.__longtaskSupported, heap: performance.memory ? performance.memory.usedJSHeapSize : null,
          dom: document.getElementsByTagName("*").length})
"""


# Feeds ai_response_chunk frames to the page's own Socket.IO connection, as if they came from the server,
# on a fixed 50/s schedule (several frames in one task when the page fell behind, as a socket would).
INJECT_JS = r"""
async ([convId, msgId, words, perChunk, intervalMs]) => {
  const ws = window.__sockets.filter((w) => w.readyState === 1).pop();
  const all = Array.from({length: words}, (_, i) => "word" + (i + 1));
  const chunks = [];
  for (let i = 0; i < all.length; i += perChunk) chunks.push((i ? " " : "") + all.slice(i, i + perChunk).join(" "));
  const deliver = (name, payload) => ws.onmessage({data: "42" + JSON.stringify([name, payload])});
  const t0 = performance.now();
  const sent = [];
  let seq = 0;
  await new Promise((resolve) => {
    const tick = () => {
      const due = Math.min(chunks.length, Math.floor((performance.now() - t0) / intervalMs) + 1);
      while (seq < due) {
        seq += 1;
        deliver("ai_response_chunk", {conversation_id: convId, message_id: msgId, seq, chunk: chunks[seq - 1]});
        sent.push(performance.now());
      }
      if (seq >= chunks.length) resolve(); else setTimeout(tick, Math.max(0, t0 + seq * intervalMs - performance.now()));
    };
    tick();
  });
  await new Promise((r) => setTimeout(r, 100));
  deliver("ai_response_complete", {conversation_id: convId, message_id: msgId, role: "assistant", status: "complete",
                                   content: chunks.join(""), timestamp: new Date().toISOString()});
  const end = performance.now();
  await new Promise((r) => setTimeout(r, 500));
  const li = document.querySelector(`#message-list li[data-id="${msgId}"]`);
  return {t0, end, sent, text: li ? li.querySelector(".content").innerText : null, status: li && li.dataset.status,
          busyTicks: sent.length - new Set(sent.map((t) => Math.round(t))).size};
}
"""


async def inject_once(page, conv: str, words: int, per_chunk: int, interval_ms: float) -> dict:
    t0 = await page.evaluate(WATCH_JS)
    msg_id = f"synthetic-{uuid.uuid4().hex[:8]}"
    r = await page.evaluate(INJECT_JS, [conv, msg_id, words, per_chunk, interval_ms])
    data = await page.evaluate(COLLECT_JS, t0)
    first, end = r["sent"][0], r["end"]
    window_s = (end - first) / 1000
    lts = [e for e in data["longtasks"] if first <= e["start"] <= end]
    renders = [x for x in data["renders"] if first <= x["t"] <= end]
    return {"words": words, "chunks": len(r["sent"]), "words_per_chunk": per_chunk,
            "chunk_rate_per_s": round((len(r["sent"]) - 1) / ((r["sent"][-1] - first) / 1000), 1),
            "streaming_s": round(window_s, 2), "status": r["status"],
            "text_equal": r["text"] is not None and " ".join(r["text"].split()) == stream_words(words),
            "renders": len(renders), "render_rate_per_s": round(len(renders) / window_s, 1),
            "longtasks": {"count": len(lts), "total_ms": round(sum(e["duration"] for e in lts), 1),
                          "max_ms": round(max((e["duration"] for e in lts), default=0), 1),
                          "share_of_streaming": round(sum(e["duration"] for e in lts) / (window_s * 1000), 3)},
            "dom_elements": data["dom"], "load_after": load()}


# What one re-render of a streaming reply costs in parsing alone: the page re-parses the whole reply
# (marked + DOMPurify, the page's own vendored copies) at every rendered frame.
MARKDOWN_COST_JS = r"""
(words) => {
  const out = {};
  for (const n of words) {
    const text = Array.from({length: n}, (_, i) => "word" + (i + 1)).join(" ");
    const times = [];
    for (let k = 0; k < 15; k++) {
      const t = performance.now();
      const div = document.createElement("div");
      div.innerHTML = DOMPurify.sanitize(marked.parse(text, {gfm: true, breaks: true, async: false}),
                                         {USE_PROFILE: {html: true}, FORBID_TAGS: ["style", "form", "input"]});
      times.push(performance.now() - t);
    }
    times.sort((a, b) => a - b);
    out[n + " words (" + text.length + " chars)"] = Math.round(times[7] * 100) / 100;
  }
  return out;
}
"""


def stream_words(n: int) -> str:
    return " ".join(f"word{i}" for i in range(1, n + 1))


def chromium_info(chromium: str) -> dict:
    try:
        chromium_version = subprocess.run([chromium, "--version"], capture_output=True, text=True,
                                          timeout=30).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        chromium_version = f"? ({exc})"
    return {"chromium": chromium_version, "playwright": version("playwright")}


def seed(conversation_id: str, user: str, n: int) -> float:
    """Writes n messages (user / assistant alternately, one second apart, ending a minute ago)."""
    from google.cloud import firestore

    client = firestore.Client()
    t0 = time.perf_counter()
    col = client.collection("conversations").document(conversation_id).collection("messages")
    start = datetime.now(UTC) - timedelta(seconds=n + 60)
    batch, in_batch = client.batch(), 0
    for i in range(n):
        if i % 2 == 0:
            m = Message(id=f"m{i:05d}", conversation_id=conversation_id, role="user", user_id=user,
                        content=f"message {i}: how does step {i // 2} of the plan work?",
                        created_at=start + timedelta(seconds=i), status="complete", client_message_id=f"c{i}")
        else:
            m = Message(id=f"m{i:05d}", conversation_id=conversation_id, role="assistant", user_id=user,
                        content=(f"Reply **{i}**: step {i // 2} works like this:\n\n- first, `read` the input\n"
                                 f"- then [check](https://example.com/{i}) it\n\n> done"),
                        created_at=start + timedelta(seconds=i), status="complete", reply_to=f"m{i - 1:05d}")
        batch.set(col.document(m.id), m.to_doc())
        in_batch += 1
        if in_batch == 400:
            batch.commit()
            batch, in_batch = client.batch(), 0
    if in_batch:
        batch.commit()
    client.close()
    return time.perf_counter() - t0


def summary(values: list[float]) -> dict:
    return {"median_ms": round(statistics.median(values), 1), "max_ms": round(max(values), 1),
            "min_ms": round(min(values), 1), "runs": [round(v, 1) for v in values]}


async def stream_once(page, words: int, timeout_s: float) -> dict:
    """Sends /stream N in the open conversation; returns chunk, render and long-task figures."""
    t0 = await page.evaluate(WATCH_JS)
    box = page.get_by_label("Message", exact=True)
    await box.fill(f"/stream {words}")
    await box.press("Enter")
    reply = page.locator('#message-list li[data-role="assistant"]').last
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await reply.get_attribute("data-status") == "complete" and \
                await page.evaluate("window.__frames.complete.length") > 0:
            break
        await asyncio.sleep(0.25)
    await asyncio.sleep(0.5)  # let the last frame and long tasks settle
    text = (await reply.locator(".content").inner_text()).strip()
    data = await page.evaluate(COLLECT_JS, t0)
    chunks, complete = data["chunks"], data["complete"]
    first, end = (chunks[0] if chunks else t0), (complete[0] if complete else (chunks[-1] if chunks else t0))
    window_s = (end - first) / 1000
    gaps = [b - a for a, b in zip(chunks, chunks[1:], strict=False)]
    in_window = [e for e in data["longtasks"] if first <= e["start"] <= end]
    streaming_renders = [r for r in data["renders"] if first <= r["t"] <= end]
    busiest = 0
    lo = 0
    for hi, t in enumerate(chunks):
        while t - chunks[lo] >= 1000:
            lo += 1
        busiest = max(busiest, hi - lo + 1)
    return {
        "words": words, "text_equal": " ".join(text.split()) == stream_words(words),
        "status": await reply.get_attribute("data-status"), "rendered_chars": len(text),
        "streaming_s": round(window_s, 2), "chunks": len(chunks),
        "chunk_rate_per_s": round((len(chunks) - 1) / window_s, 1) if window_s > 0 and len(chunks) > 1 else None,
        "busiest_second_chunks": busiest,
        "chunk_gap_ms": {"median": round(statistics.median(gaps), 1), "p95": round(sorted(gaps)[int(len(gaps) * .95)], 1),
                         "max": round(max(gaps), 1)} if gaps else None,
        "renders": len(streaming_renders),
        "render_rate_per_s": round(len(streaming_renders) / window_s, 1) if window_s > 0 else None,
        "longtask_supported": data["supported"],
        "longtasks": {"count": len(in_window), "total_ms": round(sum(e["duration"] for e in in_window), 1),
                      "max_ms": round(max((e["duration"] for e in in_window), default=0), 1),
                      "share_of_streaming": round(sum(e["duration"] for e in in_window) / (window_s * 1000), 3)
                      if window_s > 0 else None},
        "longtasks_all_after_send": len(data["longtasks"]),
        "dom_elements": data["dom"], "js_heap_mb": round(data["heap"] / 2**20, 1) if data["heap"] else None,
    }


async def bench(stack: Stack, args, out: dict) -> None:
    from playwright.async_api import async_playwright

    os.environ.update(stack.emulator_env)
    user = f"bench-{uuid.uuid4().hex[:8]}"
    token = issue_token(stack.jwt_secret, user, name="Bench")
    base = stack.chat_url()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        convs = {}
        for title in ("small", "empty", "big"):
            async with http.post(base + "/api/conversations", json={"title": title}) as r:
                assert r.status == 201, await r.text()
                convs[title] = (await r.json())["id"]
    # the small one gets a few messages so switching away from the big one is a real switch
    seed_s = await asyncio.to_thread(seed, convs["big"], user, args.messages)
    await asyncio.to_thread(seed, convs["small"], user, 4)
    out["seed"] = {"messages": args.messages, "seconds": round(seed_s, 1), "how": "Firestore batches of 400, Message.to_doc"}
    print(f"seeded {args.messages} messages in {seed_s:.1f}s; load {load()}", flush=True)
    last_id = f"m{args.messages - 1:05d}"

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1200, "height": 800})
            await context.add_init_script(INIT_SCRIPT)
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            history_requests: list[str] = []
            page.on("request", lambda req: history_requests.append(req.url) if "/messages" in req.url else None)
            await page.goto(f"{base}/#token={token}")
            await page.wait_for_selector('#conn-state[data-state="connected"]', timeout=60_000)
            await page.wait_for_selector(f'#conversations button[data-id="{convs["big"]}"]', timeout=30_000)

            # 1. first page of history
            opens = []
            for i in range(args.runs + 1):  # the first is a warm-up (emulator query plan, JIT)
                await page.evaluate(OPEN_JS, [convs["small"], "m00003", 4])
                await asyncio.sleep(0.5)
                history_requests.clear()
                r = await page.evaluate(OPEN_JS, [convs["big"], last_id, 50])
                assert "error" not in r, r
                await asyncio.sleep(0.5)
                r["history_requests"] = len(history_requests)
                r["older_requests"] = sum("before=" in u for u in history_requests)
                print(f"  open big conversation run {i}: {r['ms']:.0f} ms ({r['count']} items, "
                      f"{r['longtasks']} long tasks, max {r['longtask_max']:.0f} ms, "
                      f"{r['history_requests']} /messages requests, {r['older_requests']} with before=)", flush=True)
                if i:
                    opens.append(r)
            out["first_page"] = {**summary([r["ms"] for r in opens]), "warmup_excluded": True,
                                 "longtasks_per_open": [r["longtasks"] for r in opens],
                                 "items_after_open": [r["count"] for r in opens],
                                 "history_requests_per_open": [r["history_requests"] for r in opens],
                                 "older_requests_per_open": [r["older_requests"] for r in opens],
                                 "longtask_max_ms": [round(r["longtask_max"], 1) for r in opens]}
            older = []
            for i in range(args.older_pages):
                await asyncio.sleep(0.3)
                r = await page.evaluate(OLDER_JS, [50])
                assert "error" not in r, r
                print(f"  older page {i + 1}: {r['ms']:.0f} ms (now {r['count']} items)", flush=True)
                older.append(r)
            out["older_pages"] = {**summary([r["ms"] for r in older]), "items_after": older[-1]["count"] if older else None}

            # 2. streaming in the big conversation (re-opened: first page only), then in an empty one
            out["streaming"] = {}
            await page.evaluate(OPEN_JS, [convs["small"], "m00003", 4])
            await page.evaluate(OPEN_JS, [convs["big"], last_id, 50])
            await asyncio.sleep(1)
            for label, conv in (("big", convs["big"]), ("empty", convs["empty"])):
                if label == "empty":
                    await page.locator(f'#conversations button[data-id="{conv}"]').click()
                    await page.wait_for_selector('#message-list[data-loaded="1"]', state="attached")
                    await asyncio.sleep(1)
                print(f"  streaming /stream {args.words} in the {label} conversation; load {load()}", flush=True)
                s = await stream_once(page, args.words, args.stream_timeout)
                s["load_after"] = load()
                out["streaming"][label] = s
                print("   ", json.dumps(s), flush=True)
            # 3. the UI alone at exactly 50 chunks/s: frames injected at the page's WebSocket
            out["injected"] = {}
            for label, conv in (("big", convs["big"]), ("empty", convs["empty"])):
                await page.evaluate(OPEN_JS, [convs["small"], "m00003", 4])
                await page.locator(f'#conversations button[data-id="{conv}"]').click()
                await page.wait_for_selector('#message-list[data-loaded="1"]', state="attached")
                await asyncio.sleep(1)
                r = await inject_once(page, conv, args.words, args.inject_words_per_chunk, 1000 / args.inject_rate)
                out["injected"][label] = r
                print(f"  injected in the {label} conversation:", json.dumps(r), flush=True)
            out["markdown_parse_ms_median"] = await page.evaluate(MARKDOWN_COST_JS, [100, 500, 1000, 2000])
            print("  marked+DOMPurify per render:", out["markdown_parse_ms_median"], flush=True)
            out["page_errors"] = errors
        finally:
            await browser.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--runs", type=int, default=7, help="timed openings of the big conversation (after a warm-up)")
    p.add_argument("--older-pages", type=int, default=5)
    p.add_argument("--words", type=int, default=2000, help="/stream N")
    p.add_argument("--token-ms", default="4", help="OFFLINE_TOKEN_DELAY_MS of the benchmark's ai_stream function")
    p.add_argument("--chunk-ms", default="20", help="CHUNK_INTERVAL_MS (20 = 50 chunks/s)")
    p.add_argument("--inject-rate", type=float, default=50, help="chunks/s of the injected stream")
    p.add_argument("--inject-words-per-chunk", type=int, default=2)
    p.add_argument("--stream-timeout", type=float, default=120)
    p.add_argument("--max-minutes", type=float, default=12)
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM_PATH") or "/usr/bin/chromium")
    args = p.parse_args()

    def body(stack: Stack, out: dict) -> None:
        out["settings"] = {"CHUNK_INTERVAL_MS": args.chunk_ms, "OFFLINE_TOKEN_DELAY_MS": args.token_ms,
                           "viewport": "1200x800", "page_size": 50}
        print(json.dumps(out["machine"]), "load", out["load_start"], flush=True)
        stack.start_ai_function(stack.ports.ai, OFFLINE_TOKEN_DELAY_MS=args.token_ms, CHUNK_INTERVAL_MS=args.chunk_ms)
        stack.start_socket_service(stack.ports.chat, name="socket-ui", **QUOTAS)
        out["load_stack_up"] = load()
        asyncio.run(asyncio.wait_for(bench(stack, args, out), args.max_minutes * 60))

    return run_on_stack("ui_perf", body, machine=chromium_info(args.chromium))


if __name__ == "__main__":
    sys.exit(main())
