"""Hypothesis property tests over generated MIME trees and HTML."""

from __future__ import annotations

import base64
import email
import quopri
import re
from email import policy
from html.parser import HTMLParser

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from html_forms import html_text
from relay import instrument
from relay.html_scan import decode_attribute, scan, url_of
from test_instrument import KEYS, PUBLIC, hrefs, other_parts, plan
from core.links import pixel_url, verify_click

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyzĄąłżź &;<>\"'", min_size=1, max_size=12).map(
    lambda t: t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))
targets = st.sampled_from([
    "https://example.com/a", "http://EXAMPLE.org/b?x=1&amp;y=2", "HTTPS://ex.test/c#frag", "mailto:a@b.test",
    "tel:+481234", "#top", "https://bücher.example/ä?q=ł", "https://example.com/a,b", "javascript:void(0)",
    PUBLIC + "/c/aaaa.bbbbbbbbbbbbbbbbbbbbbb.0.cXE.sig",
])


@st.composite
def anchor(draw):
    target = draw(targets)
    quote = draw(st.sampled_from(['"', "'", ""]))
    if not quote and any(c in target for c in " '\"=<>`"):
        quote = '"'
    eq = draw(st.sampled_from(["=", " = ", "\n=\n"]))
    name = draw(st.sampled_from(["a", "A", "area"]))
    opt = draw(st.sampled_from(["", " data-notrack", ' clicktracking="off"', ' class="btn"']))
    text = draw(words)
    if name == "area":
        return f'<area shape="rect" href{eq}{quote}{target}{quote}{opt}>'
    return f"<{name} href{eq}{quote}{target}{quote}{opt}>{text}</{name}>"


fragment = st.one_of(
    words,
    anchor(),
    st.just("<br>"), st.just("<p>"), st.just("</p>"), st.just("&nbsp;"),
    st.just('<img src="https://cdn.example.com/x.png" alt="">'),
    st.just(f'<img src="{PUBLIC}/o/OLDoldOLDoldOLDoldOLDold01.gif" width="1" height="1">'),
    st.just('<!--[if mso]><a href="https://mso.example/x">mso</a><![endif]-->'),
    st.just("<!-- a comment with <a href=\"https://c.example\">x</a> -->"),
    st.just("<style>a{color:red}</style>"),
)


@st.composite
def html_doc(draw):
    # Fragments on their own lines: a 7bit/8bit line over 998 octets is re-encoded (corpus test).
    body = "\r\n".join(draw(st.lists(fragment, min_size=1, max_size=25)))
    wrapper = draw(st.sampled_from(["<html><body>{}</body></html>", "<HTML><BODY bgcolor=#fff>{}</BODY></HTML>", "{}"]))
    return wrapper.format(body)


@st.composite
def leaf(draw):
    kind = draw(st.sampled_from(["html", "html", "text", "binary"]))
    if kind == "html":
        doc = draw(html_doc()).encode("utf-8")
        cte = draw(st.sampled_from(["8bit", "quoted-printable", "base64"]))
        if cte == "base64":
            body = base64.encodebytes(doc).replace(b"\n", b"\r\n")
        elif cte == "quoted-printable":
            body = quopri.encodestring(doc).replace(b"\n", b"\r\n")
        else:
            body = doc
        return b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: " + cte.encode() + \
            b"\r\n\r\n" + body
    if kind == "text":
        t = draw(st.text(max_size=80)).replace("\r", "").replace("\n", "\r\n")
        return b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + t.encode()
    data = draw(st.binary(max_size=60))
    return (b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=\"x.bin\"\r\n\r\n" + base64.encodebytes(data).replace(b"\n", b"\r\n"))


def tree(depth: int = 0):
    if depth >= 3:
        return leaf()
    return st.one_of(leaf(), multipart(depth))


@st.composite
def multipart(draw, depth):
    sub = draw(st.sampled_from(["mixed", "alternative", "related"]))
    boundary = f"b{depth}_{draw(st.integers(0, 9999))}"
    parts = draw(st.lists(tree(depth + 1), min_size=1, max_size=3))
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary.encode() + b"--\r\n"
    return f'Content-Type: multipart/{sub}; boundary="{boundary}"\r\n\r\n'.encode() + body


@st.composite
def message(draw):
    return b"From: a@example.com\r\nTo: c@ext.test\r\nSubject: p\r\nMIME-Version: 1.0\r\n" + draw(tree())


class _Text(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("style", "script"):
            self.skip += 1

    def handle_endtag(self, tag):
        if tag in ("style", "script"):
            self.skip = max(0, self.skip - 1)

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)


def visible(html: str) -> str:
    p = _Text()
    p.feed(html)
    p.close()
    return "".join(p.out)


def html_bodies(raw: bytes) -> list[str]:
    msg = email.message_from_bytes(raw, policy=policy.compat32)
    return [p.get_payload(decode=True).decode("utf-8") for p in msg.walk()
            if p.get_content_type() == "text/html"]


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(message())
def test_generated_messages_keep_everything_but_hrefs_and_pixel(raw):
    parsed = instrument.parse(raw, PUBLIC)
    result = instrument.render(parsed, plan())
    out = result.data
    # Output parses, with the same MIME structure.
    before = email.message_from_bytes(raw, policy=policy.compat32)
    after = email.message_from_bytes(out, policy=policy.compat32)
    assert [p.get_content_type() for p in before.walk()] == [p.get_content_type() for p in after.walk()]
    # Non-HTML parts and every header byte-identical.
    assert other_parts(out) == other_parts(raw)
    # Visible text unchanged; wrapped links verify to their original targets, never wrapped twice.
    wrapped = iter(result.links)
    for b, a in zip(html_bodies(raw), html_bodies(out)):
        assert visible(a) == visible(b)
        for old, new in zip(hrefs(b), hrefs(a)):
            if new != old:
                click = verify_click(KEYS, new.split("/c/", 1)[1])
                assert click is not None and click.target == old
                assert not old.startswith(PUBLIC + "/c/")
                assert next(wrapped)[1] == old


@SETTINGS
@given(message())
def test_instrumenting_twice_keeps_wrapped_links_and_one_new_pixel(raw):
    first = instrument.render(instrument.parse(raw, PUBLIC), plan(token="FIRSTfirstFIRSTfirstFIRST01")).data
    result = instrument.render(instrument.parse(first, PUBLIC), plan(token="SECONDsecondSECONDsecond01"))
    second = result.data
    if second == first:
        return  # untouched the second time (e.g. malformed): nothing to compare
    h1, h2 = "".join(html_bodies(first)), "".join(html_bodies(second))
    # Every link wrapped the first time is still there, exactly, in the same order.
    wrapped_first = [h for h in hrefs(h1) if h.startswith(PUBLIC + "/c/")]
    remaining = iter(hrefs(h2))
    assert all(any(h == w for h in remaining) for w in wrapped_first)
    # Exactly one pixel, the new one.
    assert "FIRSTfirstFIRSTfirstFIRST01.gif" not in h2
    assert h2.count(f"{PUBLIC}/o/") == (1 if result.pixel else 0)
    if result.pixel:
        assert f"{PUBLIC}/o/SECONDsecondSECONDsecond01.gif" in h2


# --- the forms the HTML standard's tokenizer has rules for (issue 17) -----------------------------

_SIGNED = re.compile(re.escape(PUBLIC) + r"/c/([A-Za-z0-9_.-]+)")


@SETTINGS
@given(html_text(), st.sampled_from(["8bit", "quoted-printable", "base64"]), st.booleans())
def test_standard_forms_change_only_wrapped_href_values_and_the_pixel(doc, cte, body):
    """Byte-exact outside the replaced href values, the pixel and removed opt-out attributes; each
    replaced value decodes (by the standard's rules) to the target its signed URL opens."""
    doc = ("<html><body>" if body else "") + doc
    data = doc.encode("utf-8")
    if cte == "base64":
        enc = base64.encodebytes(data).replace(b"\n", b"\r\n")
    elif cte == "quoted-printable":
        enc = quopri.encodestring(data, quotetabs=True)
    else:
        enc = data
    raw = (b"From: a@example.com\r\nTo: c@ext.test\r\nSubject: p\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: " + cte.encode() + b"\r\n\r\n" + enc)
    parsed = instrument.parse(raw, PUBLIC)
    result = instrument.render(parsed, plan(skip_url_text_links=False))
    if parsed.untouched is not None or result.note is not None:  # nothing changed
        assert result.data == raw
        return
    part = parsed.parts[0]
    text = part.text  # the HTML as decoded from the message (QP/base64 round trip)
    delivered = html_bodies(result.data)[0]
    # Outside the replaced spans, the pixel and the opt-out removals: identical.
    edits = sorted([(c.start, c.end, "\0URL\0") for c in part.candidates] +
                   [(a, b, "") for a, b in part.opt_out_removals] + [(a, b, "") for a, b in part.old_pixels])
    expected, pos = [], 0
    for a, b, new in edits:
        expected += [text[pos:a], new]
        pos = b
    expected.append(text[pos:])
    pixel = instrument._pixel_tag(pixel_url(PUBLIC, plan().token)) if result.pixel else ""
    assert not pixel or delivered.count(pixel) == 1
    assert _SIGNED.sub("\0URL\0", delivered.replace(pixel, "", 1) if pixel else delivered) == "".join(expected)
    # Each replaced value, decoded as the standard decodes it, is what its signed URL opens.
    sc = scan(text, PUBLIC + "/o/")
    by_span = {link.href.value_start: link for link in sc.links}
    signed = _SIGNED.findall(delivered)
    assert len(signed) == len(part.candidates) == len(result.links)
    for c, path, (_, target) in zip(part.candidates, signed, result.links):
        link = by_span[c.start]
        assert link.reason is None
        assert url_of(decode_attribute(text[c.start:c.end])) == link.target == target
        click = verify_click(KEYS, path)
        assert click is not None and click.target == target
