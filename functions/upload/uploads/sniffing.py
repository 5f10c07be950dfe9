"""Does an object's first bytes match the content type its uploader declared?

Only the first ``SNIFF_BYTES`` are read (a range request), so checking a
200 MB file costs the same as checking a 1 KB one. Images and PDFs must
start with their format's signature; text types must be UTF-8 without NUL
bytes (JSON must also start like a JSON value); any other allowed type must
at least not look like a web page or a program.
"""

from __future__ import annotations

import codecs

SNIFF_BYTES = 4096

_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "application/pdf": (b"%PDF-",),
}
_TEXT_TYPES = ("text/", "application/json")
_JSON_STARTS = frozenset('{["-0123456789tfn')
# Files a browser would run or render as a page, or a machine would execute.
_EXECUTABLE_MAGIC = (b"MZ", b"\x7fELF", b"\xca\xfe\xba\xbe", b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf",
                     b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe", b"#!", b"\x00asm")
_MARKUP_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<script", b"<iframe", b"<svg", b"<?xml")


def looks_dangerous(head: bytes) -> bool:
    if head.startswith(_EXECUTABLE_MAGIC):
        return True
    start = head.lstrip(b"\xef\xbb\xbf").lstrip().lower()
    return start.startswith(_MARKUP_STARTS)


def _text_problem(head: bytes, complete: bool) -> str | None:
    if b"\x00" in head:
        return "contains NUL bytes"
    try:
        # A multi-byte character cut by the end of the sample is fine unless the file ends there.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=complete)
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    return None


def content_problem(content_type: str, head: bytes, complete: bool) -> str | None:
    """Why ``head`` (the first bytes; ``complete`` if it is the whole file) is not ``content_type``, or None."""
    signatures = _SIGNATURES.get(content_type)
    if signatures is not None:
        return None if head.startswith(signatures) else f"does not start like {content_type}"
    if content_type == "image/webp":
        return None if head[:4] == b"RIFF" and head[8:12] == b"WEBP" else "does not start like image/webp"
    if content_type.startswith(_TEXT_TYPES):
        problem = _text_problem(head, complete)
        if problem is None and content_type == "application/json":
            first = head.decode("utf-8", "ignore").lstrip("\ufeff \t\r\n")[:1]
            if first and first not in _JSON_STARTS:
                return "does not start like JSON"
        return problem
    return "looks like a web page or a program" if looks_dangerous(head) else None
