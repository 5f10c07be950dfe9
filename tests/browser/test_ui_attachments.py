"""Issue 16, attachments: attach first (preview, remove), caption, then send; the picker offers only the
allowed types; refusals in plain words; the "checking…" row goes when the file message arrives."""

from __future__ import annotations

import pytest
from playwright.async_api import expect

from tests.browser.test_chat_ui import png


@pytest.mark.usefixtures("upload_functions")
async def test_attach_preview_remove_caption_then_send(api, conversation_tab, make_token):
    token = make_token(name="Sender")
    tab, cid = await conversation_tab(token, "attachments")
    page = tab.page
    allowed = await page.evaluate("fetch('/config.json').then((r) => r.json()).then((c) => c.allowed_content_types)")
    await expect(page.locator("#file-input")).to_have_attribute("accept", ",".join(allowed))

    await page.get_by_label("Attach files").set_input_files([
        {"name": "chart.png", "mimeType": "image/png", "buffer": png(64, 48)},
        {"name": "draft.txt", "mimeType": "text/plain", "buffer": b"not this one\n"},
        {"name": "setup.exe", "mimeType": "application/x-msdownload", "buffer": b"MZ" + b"\0" * 10},
    ])
    refused = page.locator('#uploads li[data-filename="setup.exe"]')
    await expect(refused.get_by_role("alert")).to_have_text(
        "File type not allowed: application/x-msdownload. You can send " + ", ".join(
            {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WebP", "application/pdf": "PDF",
             "text/plain": "text", "text/markdown": "Markdown", "text/csv": "CSV", "application/json": "JSON"}.get(t, t)
            for t in allowed) + " files.")
    await expect(page.get_by_role("img", name="Preview of chart.png")).to_be_visible()
    await expect(page.locator("#attach-hint")).to_be_visible()
    await page.get_by_role("button", name="Remove draft.txt").click()
    await expect(page.locator('#uploads li[data-filename="draft.txt"]')).to_have_count(0)
    await tab.screenshot("attachments-before-send")
    assert await tab.user_messages().count() == 0  # nothing sent yet

    await page.get_by_label("Message", exact=True).fill("the **latest** chart")
    await page.get_by_role("button", name="Send 1 file").click()
    message = tab.user_messages("the latest chart")
    await expect(message.locator("img.thumb[alt='chart.png']")).to_have_js_property("naturalWidth", 64)
    await expect(message.locator(".content strong")).to_have_text("latest")  # the caption, as Markdown
    await expect(page.locator('#uploads li[data-filename="chart.png"]')).to_have_count(0)  # "checking…" is gone
    await expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    await expect(page.get_by_label("Message", exact=True)).to_have_value("")
    status, history = await api.request("GET", f"/api/conversations/{cid}/messages", token)
    files = [f["filename"] for m in history["items"] for f in m.get("files") or []]
    assert files == ["chart.png"]
