"""The fast paths of tracked and logged mail (issue 22) do what the plain ones did, and cost what
they should: counted in Python function calls (``sys.setprofile``), never in time.

- A copy is joined from a per-message template (the part's text encoded once, in pieces between
  the per-recipient values); the plain path (edit the text, encode it whole) still serves charsets
  with state and is the reference: both give the same bytes, links, skipped reasons and pixel.
- The CRM's ``parse_email`` memoizes header objects; it gives what ``policy.default`` gives.
"""

from __future__ import annotations

import dataclasses
import email.policy
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import crm, instrument
from core.links import Keyring, encode_target, signed_click, verify_click

DATA = Path(__file__).parent / "data"
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
PUBLIC = "http://127.0.0.1:8080"
KEYS = Keyring.from_strings(["perf-key-0123456789abcdef"])
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"the real-world corpus is absent ({CORPUS})")


def plan(token: str, **kw) -> instrument.Plan:
    return instrument.Plan(token=token, opens=kw.get("opens", True), clicks=kw.get("clicks", True),
                           public_url=PUBLIC, keyring=KEYS, pixel_position=kw.get("pixel_position", "top"),
                           skip_url_text_links=kw.get("skip_url_text_links", True))


def html_message(html: str, cte: str = "7bit") -> bytes:
    return (f"From: a@example.com\r\nTo: b@ext.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: {cte}\r\n\r\n{html}").encode()


def marketing(links: int = 24) -> bytes:
    row = '<tr><td><a href="https://shop.example.com/p/%d?utm_source=mail&amp;x=1">Product %d</a></td></tr>\r\n'
    return html_message("<html><body><table>\r\n" + "".join(row % (i, i) for i in range(links)) +
                        "</table></body></html>\r\n")


def calls(fn) -> int:
    """Python and C function calls made by fn(): repeatable on any machine."""
    n = 0

    def count(frame, event, arg):
        nonlocal n
        if event in ("call", "c_call"):
            n += 1
    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n


def plain(parsed: instrument.Parsed, p: instrument.Plan, monkeypatch) -> instrument.Result:
    """The copy by the plain path (no templates): the reference."""
    fresh = dataclasses.replace(parsed, parts=[dataclasses.replace(part, templates={}) for part in parsed.parts])
    with monkeypatch.context() as mp:
        mp.setattr(instrument, "_ascii_compatible", lambda charset, part: False)
        return instrument.render(fresh, p)


def same(a: instrument.Result, b: instrument.Result) -> None:
    assert a.data == b.data
    assert (a.links, a.skipped, a.pixel, a.note) == (b.links, b.skipped, b.pixel, b.note)


def test_the_hundredth_copy_costs_under_a_tenth_of_the_first():
    raw = marketing(24)  # the marketing message: 24 links
    first = calls(lambda: instrument.render(instrument.parse(raw, PUBLIC), plan("A" * 27)))
    parsed = instrument.parse(raw, PUBLIC)
    for i in range(99):
        instrument.render(parsed, plan(f"{i:027d}"))
    hundredth = calls(lambda: instrument.render(parsed, plan("Z" * 27)))
    assert hundredth < first / 10, (first, hundredth)


def test_a_copy_signs_each_link_once_and_scans_nothing(monkeypatch):
    raw = marketing(24)
    parsed = instrument.parse(raw, PUBLIC)
    instrument.render(parsed, plan("A" * 27))
    scans = []
    monkeypatch.setattr(instrument, "scan", lambda *a: scans.append(a))
    result = instrument.render(parsed, plan("B" * 27))
    assert not scans and len(result.links) == 24
    text = result.data.decode()
    for i in range(24):
        url = signed_click(PUBLIC, KEYS, "B" * 27, i, encode_target(f"https://shop.example.com/p/{i}?utm_source=mail&x=1"))
        assert f'href="{url}"' in text
        assert verify_click(KEYS, url.split("/c/", 1)[1]).target == f"https://shop.example.com/p/{i}?utm_source=mail&x=1"


@pytest.mark.parametrize("kw", [{}, {"opens": False}, {"clicks": False}, {"pixel_position": "bottom"},
                                {"skip_url_text_links": False}])
def test_templated_copies_equal_the_plain_path_on_the_test_corpus(kw, monkeypatch):
    files = sorted(DATA.glob("*.eml"))
    assert files
    for path in files:
        raw = path.read_bytes()
        parsed = instrument.parse(raw, PUBLIC)
        for token in ("A" * 27, "B" * 27):  # the second copy comes from the templates the first built
            same(instrument.render(parsed, plan(token, **kw)), plain(parsed, plan(token, **kw), monkeypatch))


def test_a_link_lengthening_a_line_past_998_octets_makes_the_copy_quoted_printable(monkeypatch):
    line = "x" * 900 + '<a href="https://example.com/long">a</a>'
    raw = html_message(f"<html><body>{line}<br>\r\n</body></html>\r\n")
    parsed = instrument.parse(raw, PUBLIC)
    for token in ("A" * 27, "B" * 27):
        result = instrument.render(parsed, plan(token))
        same(result, plain(parsed, plan(token), monkeypatch))
        assert b"Content-Transfer-Encoding: quoted-printable" in result.data


@needs_corpus
def test_templated_copies_equal_the_plain_path_on_the_real_corpus(monkeypatch):
    raws = [p.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for p in sorted((CORPUS / "eml").iterdir())]
    raws += [html_message(p.read_bytes().decode("utf-8", "replace")) for p in sorted((CORPUS / "html").iterdir())]
    for raw in raws:
        parsed = instrument.parse(raw, PUBLIC)
        for token in ("A" * 27, "B" * 27):
            same(instrument.render(parsed, plan(token)), plain(parsed, plan(token), monkeypatch))


def _fields(raw: bytes):
    """What parse_email gives, or the exception it raises (a few broken corpus messages do)."""
    try:
        return dataclasses.asdict(crm.parse_email(raw))
    except Exception as e:
        return type(e).__name__


@needs_corpus
def test_parse_email_with_memoized_headers_equals_policy_default(monkeypatch):
    files = sorted((CORPUS / "eml").iterdir()) + sorted(DATA.glob("*.eml"))
    for path in files:
        raw = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        fast = [_fields(raw) for _ in range(2)]  # the second from the memo
        with monkeypatch.context() as mp:
            mp.setattr(crm, "_POLICY", email.policy.default)
            reference = _fields(raw)
        assert fast[0] == reference == fast[1], path.name


def test_parse_email_parses_each_header_once():
    raw = marketing(3)
    crm._HEADERS.clear()
    crm.parse_email(raw)
    assert calls(lambda: crm.parse_email(raw)) < calls(lambda: _reference_parse(raw)) / 2


def _reference_parse(raw: bytes):
    saved = crm._POLICY
    crm._POLICY = email.policy.default
    try:
        return crm.parse_email(raw)
    finally:
        crm._POLICY = saved


_WORDS = ["Alice", "O'Brien", "Q.", "Smith,", "\"Quoted\"", "(comment)", "=?utf-8?q?Gr=C3=BC=C3=9Fe?=", "Grüße",
          "a@b.c", "<a@b.c>", "carol1@ext.test", "<m1@relay.test>", "<a@b@c.d>", "<a.@b>", "<a..b@c>", "x-y_z", "\\", ";", ":", "[x]", "@", "<", ">",
          ",", "  ", "\t", "Re:", "bench", "1", "\x7f", "\x01", ""]
_NAMES = ["subject", "from", "to", "cc", "message-id", "in-reply-to", "references", "x-mailer", "x-autoreply",
          "auto-submitted", "precedence", "delivered-to", "date"]


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(_NAMES),
       value=st.one_of(
           st.lists(st.sampled_from(_WORDS), max_size=6).map(" ".join),
           st.lists(st.sampled_from(_WORDS), max_size=6).map("".join),
           st.lists(st.sampled_from(["Alice <alice@example.com>", "carol1@ext.test", "John Q. Public <j@x.org>",
                                     "O'Brien <o@x.org>", "D E <d@e.f>", " a@b.c ", "x@[127.0.0.1]",
                                     "\"a b\"@c.d", "Undisclosed:;", "a@b", "-@x-.y"]),
                    min_size=1, max_size=3).map(lambda xs: ",".join(xs)),
           st.text(alphabet=st.characters(max_codepoint=0x7f), max_size=40)))
def test_header_values_read_without_a_parse_are_what_policy_default_gives(name, value):
    """parse_email's plain-value readings (crm._simple_value) against the email package's own."""
    crm._HEADERS.clear()
    try:
        expected = str(email.policy.default.header_fetch_parse(name, value))
    except Exception as e:  # the package cannot read it: ours must not read it either
        expected = type(e).__name__
    simple = crm._simple_value(name, value)
    if simple is not None:
        assert simple == expected, (name, value)
    try:
        got = str(crm._POLICY.header_fetch_parse(name, value))
    except Exception as e:
        got = type(e).__name__
    assert got == expected, (name, value)


def test_plain_header_values_are_read_without_the_email_packages_parse():
    assert crm._simple_value("to", "carol1@ext.test,  Alice <alice@example.com>") == \
        "carol1@ext.test, Alice <alice@example.com>"
    assert crm._simple_value("subject", "bench 7") == "bench 7"
    assert crm._simple_value("message-id", "<m1@relay.test>") == "<m1@relay.test>"
    for name, value in (("to", "John Q. Public <j@x.org>"), ("subject", "=?utf-8?q?x?="), ("subject", "Grüße"),
                        ("date", "Mon, 07 Dec 2026 10:00:00 +0000"), ("content-type", "text/plain")):
        assert crm._simple_value(name, value) is None  # parsed as before
