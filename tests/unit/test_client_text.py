"""The one validator of client strings (``chatcore.protocol.client_text``) and the parsers that use it."""

from __future__ import annotations

import json

import pytest

from chatcore import protocol
from chatcore.errors import InvalidArgument, TooLarge, Unauthenticated
from chatcore.identity.auth import AuthConfig, TokenVerifier, handshake_token, issue_token

LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff", "ok \ud83d", "\ude00 ok"]
CONTROLS = ["\x00", "\x01", "\x08", "\x0b", "\x0c", "\x1b", "\x1f", "\x7f", "\x80", "\x85", "\x9f"]
ORDINARY = ["plain", "\u05e9\u05dc\u05d5\u05dd \u200f", "\u202eevil\u202c", "\u2066isolate\u2069", "\U0001f600",
            "\U0001f469\u200d\U0001f4bb", "e\u0301", "\ufeffbom", "\U0010fffd", "\u00a0nbsp", "\u2028"]


@pytest.mark.parametrize("text", LONE_SURROGATES)
def test_lone_surrogates_are_refused_naming_the_field(text):
    with pytest.raises(InvalidArgument) as info:
        protocol.client_text(text, "title", multiline=True)
    assert "title" in info.value.message and "lone surrogate" in info.value.message


def test_a_surrogate_pair_written_as_one_character_is_fine():
    assert protocol.client_text("\U0001f600", "message") == "\U0001f600"


@pytest.mark.parametrize("char", CONTROLS)
@pytest.mark.parametrize("multiline", [False, True])
def test_control_characters_are_refused(char, multiline):
    with pytest.raises(InvalidArgument) as info:
        protocol.client_text(f"a{char}b", "message", multiline=multiline)
    assert f"U+{ord(char):04X}" in info.value.message


@pytest.mark.parametrize("char", ["\t", "\n", "\r"])
def test_tab_and_line_breaks_only_in_multiline_text(char):
    assert protocol.client_text(f"a{char}b", "message", multiline=True) == f"a{char}b"
    with pytest.raises(InvalidArgument):
        protocol.client_text(f"a{char}b", "name")


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_unicode_passes(text):
    assert protocol.client_text(text, "message") == text


@pytest.mark.parametrize("value", [None, 1, 1.5, [], {}, b"\xff", True])
def test_other_types_pass_through_for_the_callers_type_check(value):
    assert protocol.client_text(value, "x") is value


def test_message_length_counts_characters_after_trimming():
    assert protocol.parse_message_text("  " + "\U0001f600" * 10 + "\n", 10) == "\U0001f600" * 10
    assert protocol.parse_message_text("e\u0301" * 5, 10) == "e\u0301" * 5
    with pytest.raises(TooLarge):
        protocol.parse_message_text("\U0001f600" * 11, 10)
    with pytest.raises(TooLarge):
        protocol.parse_message_text("e\u0301" * 5 + "e", 10)


@pytest.mark.parametrize("value, error", [
    ("", InvalidArgument), (" \n\t ", InvalidArgument), (7, InvalidArgument), (None, InvalidArgument),
    ("a\x00", InvalidArgument), ("\ud800", InvalidArgument),
])
def test_message_refusals(value, error):
    with pytest.raises(error):
        protocol.parse_message_text(value, 100)


def test_client_message_id():
    assert protocol.parse_client_message_id(None) is None
    assert protocol.parse_client_message_id("c-1 \U0001f600") == "c-1 \U0001f600"
    for bad in ("", "x" * 129, 5, "\ud800", "a\tb", "a\x00"):
        with pytest.raises(InvalidArgument):
            protocol.parse_client_message_id(bad)


def test_ids_are_fully_matched():
    assert protocol.parse_conversation_id("abc_-9") == "abc_-9"
    assert protocol.parse_message_id("uabc-r") == "uabc-r"
    for bad in ("abc\n", "abc\ud800", "a/b", "", "x" * 129, "é", "__proto__", "____"):  # Firestore reserves __x__
        with pytest.raises(InvalidArgument):
            protocol.parse_conversation_id(bad)
        with pytest.raises(InvalidArgument):
            protocol.parse_message_id(bad)


def test_user_ids_and_names():
    assert protocol.parse_user_id("ada \U0001f600") == "ada \U0001f600"
    for bad in ("\ud800", "a\x00", "a\nb", " ", "a/b", "x" * 257, ".", "..", "__proto__"):
        with pytest.raises(InvalidArgument):
            protocol.parse_user_id(bad)
    assert protocol.parse_user_id("__") == "__" and protocol.parse_user_id("...") == "..."
    assert protocol.parse_display_name(None) is None
    assert protocol.parse_display_name("Ada \u200f") == "Ada \u200f"
    for bad in ("\ud800", "Ada\nLovelace", "x" * 101, 3):
        with pytest.raises(InvalidArgument):
            protocol.parse_display_name(bad)


def test_titles_keep_their_type_for_the_store():
    assert protocol.parse_title(None) is None and protocol.parse_title(5) == 5
    assert protocol.parse_title("a\tb") == "a\tb"
    with pytest.raises(InvalidArgument):
        protocol.parse_title("a\x00")


# -- tokens -------------------------------------------------------------------------
SECRET = "s" * 40
VERIFIER = TokenVerifier(AuthConfig.from_env({"JWT_SECRET": SECRET}))


def test_handshake_token_that_is_not_ascii_is_unauthenticated():
    for token in ("\ud800", "é" * 10):
        with pytest.raises(Unauthenticated):
            VERIFIER.verify(handshake_token({"token": token}, {}))
        assert VERIFIER.uses_network(token) is False


def test_token_subject_must_be_a_usable_user_id():
    for sub in ("a\x00", "\ud800x", "a/b"):
        with pytest.raises(Unauthenticated):
            VERIFIER.verify(issue_token(SECRET, sub))


@pytest.mark.parametrize("name", ["Ada \ud800", "Ada\x00", "\n"])
def test_token_name_the_chat_cannot_show_falls_back_to_the_subject(name):
    assert VERIFIER.verify(issue_token(SECRET, "ada", name=name)).name == "ada"


def test_token_name_with_ordinary_unicode_is_kept():
    assert VERIFIER.verify(issue_token(SECRET, "ada", name="\u05e9\u05dc\u05d5\u05dd \U0001f600")).name == \
        "\u05e9\u05dc\u05d5\u05dd \U0001f600"


# -- the upload function's body ------------------------------------------------------------
def test_upload_caption_and_nesting_are_checked():
    from uploads.requesting import parse_body
    from uploads.settings import Settings

    settings = Settings.from_env({"GOOGLE_CLOUD_PROJECT": "p", "JWT_SECRET": SECRET})
    body = {"conversation_id": "c1", "filename": "a.png", "content_type": "image/png", "size": 10}
    for caption in ("\ud800", "a\x00b"):
        with pytest.raises(InvalidArgument):
            parse_body(json.dumps({**body, "message": caption}).encode(), settings)
    assert parse_body(json.dumps({**body, "message": "two\nlines \U0001f600"}).encode(), settings).caption == \
        "two\nlines \U0001f600"
    with pytest.raises(InvalidArgument):
        parse_body(b"[" * 5000, settings)
