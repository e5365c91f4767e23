"""The instrumentation corpus: one .eml per case in tests/data, each with its exact expected changes.

For every case: headers and every non-HTML part byte-identical; the decoded HTML differs only in
wrapped href values, the one pixel, removed opt-out attributes and removed old pixels; every
wrapped URL verifies and yields its original target.
"""

from __future__ import annotations

import email
import html as htmlmod
import re
from email import policy
from pathlib import Path

import pytest

from relay import instrument
from relay import message as m
from core.links import Keyring, verify_click

DATA = Path(__file__).parent / "data"
PUBLIC = "http://127.0.0.1:8080"
KEYS = Keyring.from_strings(["corpus-key-0123456789abcdef"])
TOKEN = "TOKENtokenTOKENtoken0123456"

#: file -> (pixel inserted?, wrapped targets in order, or None when the message stays untouched)
CASES: dict[str, tuple[bool, list[str] | None]] = {
    "outlook_mso_conditionals_vml": (True, ["https://example.com/demo"]),
    "gmail_reply_quoted_history_old_pixel": (True, ["https://example.com/pricing"]),
    "apple_mail_reply_quoted_old_pixel": (True, ["https://example.com/details"]),
    "table_marketing_template": (True, [f"https://shop.example.com/p/{i}?utm_source=mail&utm_medium=email"
                                        for i in range(6)]),
    "nested_mixed_related_alternative": (True, ["https://example.com/a"]),
    "html_attachment_untouched": (False, None),
    "multipart_signed_untouched": (False, None),
    "smime_pkcs7_mime_untouched": (False, None),
    "plain_text_only_untouched": (False, None),
    "html_quoted_printable": (True, ["https://example.com/qp?a=1&b=2"]),
    "html_base64": (True, ["https://example.com/b64"]),
    "charset_utf8_polish": (True, ["https://example.pl/oferta?id=5&źródło=mail"]),
    "charset_iso_8859_2_polish": (True, ["https://example.pl/oferta?id=5"]),
    "charset_windows_1250_polish": (True, ["https://example.pl/oferta?id=6"]),
    "uppercase_tags_and_schemes": (True, ["HTTPS://EXAMPLE.COM/UP", "Http://Example.com/mixed"]),
    "unquoted_and_single_quoted_hrefs": (True, ["https://example.com/unq", "https://example.com/sq?x=1"]),
    "href_spaces_around_equals": (True, ["https://example.com/sp1", "https://example.com/sp2"]),
    "amp_in_query_strings": (True, ["https://example.com/q?a=1&b=2&c=%20x", "https://example.com/r?x=1&y=2"]),
    "iri_links": (True, ["https://bücher.example/straße?q=zażółć", "https://example.com/a,b,c"]),
    "mailto_tel_fragment_links": (True, ["https://example.com/ok"]),
    "opt_out_attributes": (True, ["https://example.com/6"]),
    "link_text_is_url": (True, ["https://example.com/z"]),
    "thousand_links": (True, [f"https://example.com/l/{i}" for i in range(1000)]),
    "empty_body": (False, []),
    "lines_near_998_octets": (True, ["https://example.com/near998"]),
    "malformed_missing_end_boundary": (False, None),
    "malformed_bad_base64": (False, None),
    "malformed_unknown_charset": (False, None),
    "malformed_nul_bytes_and_8bit_headers": (False, None),
    "malformed_deep_nesting": (False, None),
}

_PIXEL = re.compile(r"<img\b[^>]*\bsrc\s*=\s*[\"']?" + re.escape(PUBLIC) + r"/o/[^>]*>", re.I)
_OPT_OUT = re.compile(r"""\s+(?:data-notrack|clicktracking\s*=\s*"off"|disable-tracking\s*=\s*"true"|"""
                      r"""data-pm-no-track|ses:no-track)(?=[\s>/])""", re.I)
_HREF = re.compile(r"""(<(?:a|area)\b[^>]*?\bhref\s*=\s*)("[^"]*"|'[^']*'|[^\s>]+)""", re.I | re.S)


def plan(**kw) -> instrument.Plan:
    base = dict(token=TOKEN, opens=True, clicks=True, public_url=PUBLIC, keyring=KEYS)
    base.update(kw)
    return instrument.Plan(**base)


def html_parts(raw: bytes) -> list[str]:
    msg = email.message_from_bytes(raw, policy=policy.compat32)
    out = []
    for part in msg.walk():
        if part.get_content_type() == "text/html" and part.get_content_disposition() != "attachment":
            out.append(part.get_payload(decode=True).decode(part.get_content_charset() or "ascii"))
    return out


def other_parts(raw: bytes) -> list[bytes]:
    """Everything but the HTML body parts' bodies, as byte strings, for byte-identity checks."""
    parsed = instrument.parse(raw, PUBLIC)
    pieces, pos = [], 0
    for p in parsed.parts:
        pieces.append(raw[pos:p.body_start])
        pos = p.body_end
    pieces.append(raw[pos:])
    return pieces


def normalise(text: str) -> str:
    text = _PIXEL.sub("", text)
    text = _OPT_OUT.sub("", text)
    return _HREF.sub(lambda mt: mt.group(1) + "HREF", text)


def hrefs(text: str) -> list[str]:
    return [htmlmod.unescape(v.strip("\"'")) for _, v in _HREF.findall(text)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_case_changes_exactly_what_it_should(name):
    raw = (DATA / f"{name}.eml").read_bytes()
    pixel, wrapped = CASES[name]
    parsed = instrument.parse(raw, PUBLIC)
    result = instrument.render(parsed, plan())
    if wrapped is None:
        assert result.data == raw, "must be delivered byte-identical"
        assert not result.pixel and not result.links and result.note
        return
    out = result.data
    # Headers of the message byte-identical (but a CTE made true to a re-encoded top-level body).
    strip = {"content-transfer-encoding"} if _cte_switched(raw, out) else set()
    assert m.remove(out[:m.header_end(out)], strip) == m.remove(raw[:m.header_end(raw)], strip)
    # Every non-HTML part, boundary, preamble and epilogue byte-identical.
    assert other_parts(out) == other_parts(raw) or _cte_switched(raw, out)
    assert result.pixel is pixel
    assert [t for _, t in result.links] == wrapped
    before, after = html_parts(raw), html_parts(out)
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert normalise(a) == normalise(b)
        # Links that were not wrapped keep their href exactly.
        for old, new in zip(hrefs(b), hrefs(a)):
            if not new.startswith(PUBLIC + "/c/"):
                assert old == new
    new_all = "".join(after)
    assert len(_PIXEL.findall(new_all)) == (1 if pixel else 0)
    if pixel:
        assert f"{PUBLIC}/o/{TOKEN}.gif" in new_all
    wrapped_urls = [h for h in hrefs(new_all) if h.startswith(PUBLIC + "/c/")]
    ours = [u for u in wrapped_urls if f".{TOKEN}." in u]
    assert [verify_click(KEYS, u.split("/c/", 1)[1]).target for u in ours] == wrapped
    # Every line of the delivered copy fits in 998 octets.
    assert max(len(line) for line in out.split(b"\r\n")) <= 998


def _cte_switched(raw: bytes, out: bytes) -> bool:
    """A 7bit part whose new lines would exceed 998 octets is re-encoded as QP (its header changes)."""
    return b"Content-Transfer-Encoding: quoted-printable" in out and \
        b"Content-Transfer-Encoding: quoted-printable" not in raw


def test_conditional_comment_and_its_links_are_left_exactly():
    raw = (DATA / "outlook_mso_conditionals_vml.eml").read_bytes()
    out = instrument.render(instrument.parse(raw, PUBLIC), plan()).data
    # Downlevel-hidden blocks (seen by Outlook alone) stay exactly, links and VML included.
    blocks = re.findall(rb"<!--\[if [^\]]*\]>(?!<!--).*?<!\[endif\]-->", raw, re.S)
    assert len(blocks) == 2
    for block in blocks:
        assert block in out
    assert b'<link href="https://fonts.example.com/css?family=Lato" rel="stylesheet">' in out


def test_old_pixels_removed_and_old_wrapped_links_left_as_they_are():
    raw = (DATA / "gmail_reply_quoted_history_old_pixel.eml").read_bytes()
    out = instrument.render(instrument.parse(raw, PUBLIC), plan()).data
    assert b"OLDPIXELoldpixelOLDPIXEL01" not in out
    assert b"/c/abc.OLDTOKENoldtokenOLD1.0.aHR0cHM6Ly9leGFtcGxlLmNvbS9vbGQ.sig" in out


def test_opt_out_attributes_are_removed_from_the_copy():
    raw = (DATA / "opt_out_attributes.eml").read_bytes()
    html = html_parts(instrument.render(instrument.parse(raw, PUBLIC), plan()).data)[0]
    for attr in ("data-notrack", 'clicktracking="off"', "disable-tracking", "data-pm-no-track", "ses:no-track"):
        assert attr not in html
    assert 'clicktracking="on"' in html
    for i in range(1, 6):
        assert f'href="https://example.com/{i}"' in html


@pytest.mark.parametrize("position, check", [("top", lambda h, px: h.index(px) == h.index("<body>") + 6),
                                             ("bottom", lambda h, px: h.index(px) + len(px) == h.rindex("</body>"))])
def test_pixel_position(position, check):
    raw = (DATA / "html_base64.eml").read_bytes()
    html = html_parts(instrument.render(instrument.parse(raw, PUBLIC), plan(pixel_position=position)).data)[0]
    px = _PIXEL.search(html).group(0)
    assert check(html, px)


def test_opens_only_and_clicks_only():
    raw = (DATA / "html_base64.eml").read_bytes()
    parsed = instrument.parse(raw, PUBLIC)
    r = instrument.render(parsed, plan(clicks=False))
    assert r.pixel and not r.links
    r = instrument.render(parsed, plan(opens=False))
    assert not r.pixel and len(r.links) == 1


def test_without_a_token_the_copy_is_the_original():
    raw = (DATA / "table_marketing_template.eml").read_bytes()
    assert instrument.render(instrument.parse(raw, PUBLIC), plan(token=None)).data == raw


def test_two_recipients_get_different_tokens_from_one_parse():
    raw = (DATA / "table_marketing_template.eml").read_bytes()
    parsed = instrument.parse(raw, PUBLIC)
    a = instrument.render(parsed, plan(token="A" * 27)).data
    b = instrument.render(parsed, plan(token="B" * 27)).data
    assert a != b and b"A" * 27 in a and b"B" * 27 not in a and b"B" * 27 in b


def test_changed_byte_in_wrapped_url_fails_verification():
    raw = (DATA / "html_base64.eml").read_bytes()
    out = instrument.render(instrument.parse(raw, PUBLIC), plan()).data
    url = [h for h in hrefs(html_parts(out)[0]) if "/c/" in h][0].split("/c/", 1)[1]
    assert verify_click(KEYS, url).target == "https://example.com/b64"
    for i in range(len(url)):
        if url[i] == ".":
            continue
        changed = url[:i] + ("A" if url[i] != "A" else "B") + url[i + 1:]
        assert verify_click(KEYS, changed) is None, i


def test_key_rotation_old_key_still_verifies():
    old = Keyring.from_strings(["old-key-0123456789abcdef"])
    raw = (DATA / "html_base64.eml").read_bytes()
    out = instrument.render(instrument.parse(raw, PUBLIC), plan(keyring=old)).data
    url = [h for h in hrefs(html_parts(out)[0]) if "/c/" in h][0].split("/c/", 1)[1]
    rotated = Keyring.from_strings(["new-key-0123456789abcdef", "old-key-0123456789abcdef"])
    assert verify_click(rotated, url).target == "https://example.com/b64"
    assert verify_click(Keyring.from_strings(["new-key-0123456789abcdef"]), url) is None


def test_click_signature_is_hmac_sha256_truncated_to_128_bits():
    import hmac
    from core.links import _b64e
    for key in ("k", "corpus-key-0123456789abcdef", "x" * 64, "y" * 200):
        ring = Keyring.from_strings([key])
        for payload in ("a.b.0.c", "0123abcd.TOKENTOKENTOKENTOKEN.12.aHR0cHM6Ly9leGFtcGxlLmNvbQ"):
            expected = _b64e(hmac.digest(key.encode(), payload.encode(), "sha256")[:16])
            assert ring.sign(payload) == expected


def test_iri_goes_into_location_in_uri_form():
    from core.links import to_uri
    assert to_uri("https://bücher.example/straße?q=zażółć") == \
        "https://xn--bcher-kva.example/stra%C3%9Fe?q=za%C5%BC%C3%B3%C5%82%C4%87"
    assert to_uri("https://example.com/a?b=1&c=%20") == "https://example.com/a?b=1&c=%20"


def test_hostile_html_parses_in_bounded_time():
    import time
    hostile = ("<a href=\"" + "x" * 100000 + "<a " * 20000 + "<!--" + "<" * 50000).encode()
    raw = b"Content-Type: text/html\r\n\r\n" + hostile
    t0 = time.perf_counter()
    instrument.render(instrument.parse(raw, PUBLIC), plan())
    assert time.perf_counter() - t0 < 2.0


# --- the scanner follows the HTML standard's tokenizer (issue 17) ---------------------------------

_SIGNED = re.compile(re.escape(PUBLIC) + r"/c/([A-Za-z0-9_.-]+)")


def _html_message(html: str, cte: str = "8bit") -> bytes:
    return ("From: a@example.com\r\nTo: c@ext.test\r\nSubject: t\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: {cte}\r\n\r\n").encode() + \
        html.encode("utf-8")


def _deliver(html: str, **kw) -> tuple[instrument.Result, str]:
    result = instrument.render(instrument.parse(_html_message(html), PUBLIC), plan(**kw))
    return result, html_parts(result.data)[0]


def _targets(delivered: str) -> list[str]:
    """The target each signed URL in the delivered HTML opens (it must verify)."""
    out = []
    for path in _SIGNED.findall(delivered):
        click = verify_click(KEYS, path)
        assert click is not None, path
        out.append(click.target)
    return out


def _unwrapped(delivered: str) -> str:
    """The delivered HTML with each signed URL put back as a placeholder, the pixel removed."""
    return _PIXEL.sub("", _SIGNED.sub("URL", delivered))


def test_unquoted_href_with_equals_is_wrapped_whole():
    html = "<html><body><a href=https://docs.example.com/start?x=1&y=2>Docs</a></body></html>"
    result, out = _deliver(html)
    assert _targets(out) == ["https://docs.example.com/start?x=1&y=2"]
    assert _unwrapped(out) == "<html><body><a href=URL>Docs</a></body></html>"
    # '=', quotes, '<' and backticks inside an unquoted value are part of it (parse errors, kept).
    html = "<body><a href=https://x.example/a=b'c\"d`e<f>x</a></body>"
    assert _targets(_deliver(html)[1]) == ["https://x.example/a=b'c\"d`e<f"]


def test_href_inside_another_attribute_is_not_a_link():
    html = '<body><a title="see href=https://decoy.example/" href="https://real.example/">x</a></body>'
    result, out = _deliver(html)
    assert _targets(out) == ["https://real.example/"]
    assert 'title="see href=https://decoy.example/"' in out
    # In an uninteresting tag too, and a quoted '>' does not end the tag.
    html = ('<body><div data-x="<a href=https://decoy.example/>" class=\'a > b\'>'
            '<a class="x>y" href=\'https://real.example/2\'>x</a></div></body>')
    assert _targets(_deliver(html)[1]) == ["https://real.example/2"]


def test_duplicate_href_the_first_wins():
    result, out = _deliver('<body><a href="https://first.example/" href="https://second.example/">x</a></body>')
    assert _targets(out) == ["https://first.example/"]
    assert 'href="https://second.example/"' in out


@pytest.mark.parametrize("comment", ["<!-->", "<!--->", "<!---->", "<!-- x --!>", "<!-- x -->", "<!foo>",
                                     "<?xml version=\"1.0\"?>", "</ 3>", "</>", "<!DOCTYPE html>", "<!DOCTYPE>",
                                     "<![CDATA[ x ]]>", "<!-- <!-- nested -->"])
def test_every_comment_form_is_closed_where_the_standard_closes_it(comment):
    html = f'<body>{comment}<a href="https://after.example/">x</a></body>'
    assert _targets(_deliver(html)[1]) == ["https://after.example/"]


@pytest.mark.parametrize("opened", ['<!--!><a href="https://in.example/">x</a>',  # '--!>' needs its dashes
                                    '<!-- <a href="https://in.example/">x</a> --!->',
                                    '<?x <a href="https://in.example/">x</a> ?>',
                                    '<!x <a href="https://in.example/">x</a> !>'])
def test_links_inside_comments_are_not_wrapped(opened):
    html = f'<body>{opened}<a href="https://after.example/">y</a> -->ok</body>'
    assert "https://in.example/" not in _targets(_deliver(html)[1])


def test_cdata_is_a_section_in_svg_and_a_bogus_comment_elsewhere():
    html = '<body><svg><![CDATA[ > <a href="https://cdata.example/"> ]]></svg><a href="https://after.example/">x</a>'
    assert _targets(_deliver(html)[1]) == ["https://after.example/"]
    html = '<body><![CDATA[ > <a href="https://html.example/">x</a> ]]></body>'
    assert _targets(_deliver(html)[1]) == ["https://html.example/"]


@pytest.mark.parametrize("name", ["script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes"])
def test_raw_text_elements_hide_links_and_end_at_their_end_tag(name):
    html = (f'<body><{name}><a href="https://in.example/">x</a></{name}x></{name} data-x=">">'
            f'<a href="https://after.example/">y</a></body>')
    assert _targets(_deliver(html)[1]) == ["https://after.example/"]


def test_script_data_escapes_and_plaintext():
    # '<!--<script>': double escaped, where '</script>' does not end the script; '-->' ends the escape.
    html = ('<body><script><!--<script></script><a href="https://in.example/">--><a href="https://in2.example/">'
            '</script><a href="https://after.example/">y</a></body>')
    assert _targets(_deliver(html)[1]) == ["https://after.example/"]
    html = ('<body><script><!--<script></script><a href="https://in.example/"></script>'
            '<a href="https://after.example/">y</a></body>')  # escaped only: its '</script>' ends it
    assert _targets(_deliver(html)[1]) == ["https://after.example/"]
    html = '<body><a href="https://before.example/">b</a><plaintext><a href="https://in.example/">x</a>'
    assert _targets(_deliver(html)[1]) == ["https://before.example/"]


def test_noscript_and_template_content_is_markup():
    html = ('<body><noscript><a href="https://noscript.example/">n</a></noscript>'
            '<template><a href="https://template.example/">t</a></template></body>')
    assert _targets(_deliver(html)[1]) == ["https://noscript.example/", "https://template.example/"]


@pytest.mark.parametrize("href, target", [
    ("https://x.example/?a=1&copy=2", "https://x.example/?a=1&copy=2"),
    ("https://x.example/?a=1&amp;copy=2", "https://x.example/?a=1&copy=2"),
    ("https://x.example/?a=1&copyx=2", "https://x.example/?a=1&copyx=2"),
    ("https://x.example/?a=1&reg", "https://x.example/?a=1\u00ae"),
    ("https://x.example/?a=1&not;b", "https://x.example/?a=1\u00acb"),
    ("https://x.example/?a=1&ampb=2", "https://x.example/?a=1&ampb=2"),
    ("https://x.example/&#x41;&#66;&#x80;", "https://x.example/AB\u20ac"),
    (" https://x.example/a\r\n b ", "https://x.example/a b"),
])
def test_character_references_decode_as_a_browser_decodes_them(href, target):
    result, out = _deliver(f'<body><a href="{href}">x</a></body>')
    assert _targets(out) == [target]


def test_a_body_tag_inside_a_template_is_not_where_the_pixel_goes():
    html = '<html><head><template><body><p>t</p></body></template></head><body class="b"><p>hi</p></body></html>'
    result, out = _deliver(html)
    assert result.pixel and out.index(f"{PUBLIC}/o/") > out.index('<body class="b">')
    result, out = _deliver(html, pixel_position="bottom")
    assert out.index(f"{PUBLIC}/o/") > out.index("hi</p>")


def test_links_the_scan_cannot_be_sure_of_are_left_untouched_with_a_reason():
    from relay.html_scan import AMBIGUOUS, IN_SELECT
    html = ('<body><a href="https://first.example/">a</a><select><option><a href="https://sel.example/">s</a>'
            '</select><svg></p><style><a href="https://in.example/"></style><a href="https://after.example/">z</a>'
            '</body>')
    result, out = _deliver(html)
    assert _targets(out) == ["https://first.example/"]
    assert result.skipped.count(IN_SELECT) == 1 and result.skipped.count(AMBIGUOUS) == 1
    assert 'href="https://sel.example/"' in out and 'href="https://after.example/"' in out
    # Said even when no link can be told apart after the ambiguous markup.
    result, out = _deliver('<body><svg></p><![CDATA[ > <a href="https://x.example/"> ]]></body>')
    assert AMBIGUOUS in result.skipped and not result.links


def test_an_unterminated_tag_hides_the_rest_as_the_standard_does():
    html = '<body><a href="https://ok.example/">x</a><div title="unterminated><a href="https://no.example/">'
    assert _targets(_deliver(html)[1]) == ["https://ok.example/"]


# --- long lines -----------------------------------------------------------------------------------

def _multipart(*parts: bytes) -> bytes:
    body = b"".join(b"--B\r\n" + p + b"\r\n" for p in parts) + b"--B--\r\n"
    return (b"From: a@example.com\r\nTo: c@ext.test\r\nSubject: t\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n') + body


def test_parts_with_64_kib_lines_untouched_as_they_came_instrumented_re_encoded():
    long_line = "<p>" + "w\u00f3rd " * 12000 + "</p>"  # ~ 84 KB of UTF-8 on one line
    assert len(long_line.encode()) > 65536
    html = f'<html><body>\r\n{long_line}\r\n<a href="https://example.com/long?a=1&amp;b=2">x</a>\r\n</body></html>\r\n'
    html_part = b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + html.encode()
    text_part = (b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                 + long_line.encode())
    plain_html = (b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                  + f"<p>{long_line}</p>".encode())  # no link, and the pixel goes into the first part
    raw = _multipart(html_part, text_part, plain_html)
    result = instrument.render(instrument.parse(raw, PUBLIC), plan())
    out = result.data
    assert result.pixel and [t for _, t in result.links] == ["https://example.com/long?a=1&b=2"]
    # The untouched parts exactly as they came, long lines and all.
    assert text_part in out and plain_html in out
    # The instrumented part re-encoded as quoted-printable; decoded, only the href and pixel changed.
    msg = email.message_from_bytes(out, policy=policy.compat32)
    first = [p for p in msg.walk() if p.get_content_type() == "text/html"][0]
    assert first["Content-Transfer-Encoding"] == "quoted-printable"
    assert max(len(line) for line in first.get_payload().split("\n")) <= 998
    delivered = first.get_payload(decode=True).decode("utf-8")
    assert _targets(delivered) == ["https://example.com/long?a=1&b=2"]
    assert _unwrapped(delivered) == html.replace("https://example.com/long?a=1&amp;b=2", "URL")


def test_instrumented_part_is_not_re_encoded_when_its_lines_still_fit():
    html = "<html><body>\r\n<p>" + "x" * 900 + "</p>\r\n" + '<a href="https://example.com/f">x</a></body></html>'
    raw = _html_message(html)
    out = instrument.render(instrument.parse(raw, PUBLIC), plan()).data
    assert b"Content-Transfer-Encoding: 8bit" in out and b"quoted-printable" not in out
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    # A link near the end of a 990-octet line: the longer signed URL pushes it over, so QP.
    html = "<html><body>\r\n<p>" + "x" * (990 - 60) + '<a href="https://example.com/f">x</a></p></body></html>'
    out = instrument.render(instrument.parse(_html_message(html), PUBLIC), plan()).data
    assert b"Content-Transfer-Encoding: quoted-printable" in out
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    assert _targets(html_parts(out)[0]) == ["https://example.com/f"]
