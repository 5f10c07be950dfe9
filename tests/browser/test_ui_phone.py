"""Issue 16, the phone layout at 390x844 with a touch screen: two screens with a back button, a compact
header, the participant form behind a button, Enter for new lines and a Send button, room for messages."""

from __future__ import annotations

from playwright.async_api import expect

from tests.browser.conftest import PHONE, Tab
from tests.conftest import new_user


async def test_the_phone_layout_has_two_screens_and_sends_with_the_button(service, api, browser, make_token):
    user = new_user("phone")
    token = make_token(user, name="Pat")
    conv = await api.create_conversation(token, "On the go")
    context = await browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    try:
        tab = await Tab(await context.new_page()).open(service, token)
        page = tab.page
        # The list first, alone.
        await expect(page.locator(".sidebar")).to_be_visible()
        await expect(page.locator("#chat")).to_be_hidden()
        await expect(page.locator(".topbar h1")).to_be_hidden()  # compact header
        await page.locator(f'#conversations button[data-id="{conv["id"]}"]').tap()
        await expect(page.locator("#message-list")).to_have_attribute("data-loaded", "1")
        await expect(page.locator(".sidebar")).to_be_hidden()
        await expect(page.get_by_role("button", name="Back to the conversations")).to_be_visible()
        await expect(page.locator("#add-participant-form")).to_be_hidden()
        await page.get_by_role("button", name="Add people").tap()
        await expect(page.get_by_label("Handle or user id")).to_be_visible()
        await page.get_by_role("button", name="Add people").tap()
        await expect(page.locator("#add-participant-form")).to_be_hidden()

        # Enter makes a new line on a touch screen; the Send button sends.
        box = page.get_by_label("Message", exact=True)
        await box.tap()
        await page.keyboard.type("first line")
        await page.keyboard.press("Enter")
        await page.keyboard.type("second line")
        await expect(box).to_have_value("first line\nsecond line")
        await expect(tab.user_messages()).to_have_count(0)
        await page.get_by_role("button", name="Send", exact=True).tap()
        await expect(tab.user_messages()).to_have_count(1)
        await expect(tab.assistant()).to_have_attribute("data-status", "complete")

        # The messages get most of the screen; everything fits its width.
        messages = await page.locator("#messages").bounding_box()
        assert messages["height"] > PHONE["height"] * 0.5, messages
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], width
        await tab.screenshot("phone-chat")

        await page.get_by_role("button", name="Back to the conversations").tap()
        await expect(page.locator(".sidebar")).to_be_visible()
        await expect(page.locator("#chat")).to_be_hidden()
        await tab.screenshot("phone-list")
        assert tab.unexpected_errors() == []
    finally:
        await context.close()
