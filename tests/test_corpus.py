"""Real-world mail through the real relay: every message and HTML template of ../shared/corpus
(public MIME test suites and email templates that no one here wrote), sent over SMTP as a user.

Every one is accepted, or refused with a 5xx whose reason the test names. Each delivered copy is
compared with what was sent by the email package's own reading (``policy.compat32``, independent
of the relay's MIME walk): the same tree, the same headers and raw payloads outside HTML parts;
each HTML part differs only by one pixel and by wrapped href values, and each wrapped value's
original (decoded as html5lib decodes an attribute) is the signed target. Every wrapped link is
followed over real HTTP and must redirect exactly there.
"""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path

import aiohttp
import pytest

from helpers import Sink, client
from core.links import to_uri, verify_click

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CORPUS.is_dir(), reason=f"the real-world corpus is absent ({CORPUS})")]

#: Refusals the relay gives on purpose, by corpus file: (reply code, what it says).
EXPECTED_REFUSALS: dict[str, tuple[int, str]] = {}


@pytest.fixture
def db_url(tmp_path: Path) -> str:  # the corpus runs on SQLite only: it tests mail, not storage
    return f"sqlite+aiosqlite:///{tmp_path}/trackrelay.db"


@pytest.fixture
async def sink():
    s = Sink()
    s.behaviour.line_length_limit = 1 << 20  # as Postfix, which takes long lines (in pieces)
    await s.start()
    yield s
    await s.stop()


_FROM_OR_SENDER = re.compile(rb"^(?:from|sender|resent-from|resent-sender)[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*",
                             re.I | re.M)


def as_users_mail(raw: bytes, n: int) -> bytes:
    """The corpus file as alice sends it: CRLF line ends, her From:, a Message-ID."""
    raw = re.sub(rb"\r?\n", b"\r\n", raw.replace(b"\r\n", b"\n"))
    cut = raw.find(b"\r\n\r\n")
    head, body = (raw, b"") if cut < 0 else (raw[:cut + 2], raw[cut + 2:])
    head = _FROM_OR_SENDER.sub(b"", head)
    if not re.search(rb"^message-id[ \t]*:", head, re.I | re.M):
        head = f"Message-ID: <corpus-{n}@example.com>\r\n".encode() + head
    body = body if body.endswith(b"\r\n") else body + b"\r\n"  # SMTP's data ends with a line end
    return b"From: Alice <alice@example.com>\r\nX-Corpus-Case: %d\r\n" % n + head + body


def template_mail(html: bytes, n: int) -> bytes:
    body = re.sub(rb"\r?\n", b"\r\n", html)
    return (b"From: Alice <alice@example.com>\r\nX-Corpus-Case: %d\r\nTo: carol@ext.test\r\nSubject: template\r\n" % n +
            b"Message-ID: <template-%d@example.com>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" % n + body +
            (b"" if body.endswith(b"\r\n") else b"\r\n"))


def corpus_files(kind: str) -> list[Path]:
    return sorted((CORPUS / kind).iterdir()) if CORPUS.is_dir() else []


def _strip_received(data: bytes) -> bytes:
    """The copy less what the relay puts on top: our Received: and the signed X-Trackrelay-Ref:."""
    assert data.startswith(b"Received: from ")
    m = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*(?:X-Trackrelay-Ref: [^\r\n]*\r\n)?", data)
    return data[m.end():]


def _html_text(part) -> str:
    payload = part.get_payload(decode=True) or b""
    charset = part.get_content_charset() or "us-ascii"
    try:
        return payload.decode(charset)
    except (LookupError, UnicodeDecodeError):
        return payload.decode("utf-8", "surrogateescape")


def _attribute_value(raw_value: str) -> str:
    """An attribute value decoded as the standard's tokenizer (html5lib's) decodes it."""
    import html5lib
    frag = html5lib.parseFragment(f'<a href="{raw_value}"></a>', namespaceHTMLElements=False)
    return frag.find("a").get("href")


def _unwrap(original: str, delivered: str, public: str) -> list[str]:
    """Walk both HTML texts in step; outside our pixel and the wrapped href values they must be
    equal. Returns the click URLs in order, each checked to stand where its original value was."""
    pixel = re.compile(r'<img src="' + re.escape(public) + r'/o/[A-Za-z0-9_-]+\.gif" width="1" height="1" alt="" '
                       r'style="[^"]*" />')
    pixels = pixel.findall(delivered)
    assert len(pixels) <= 1, pixels
    delivered = pixel.sub("", delivered, count=1)
    clicks = []
    pos_o = pos_d = 0
    for mt in re.finditer(re.escape(public) + r"/c/[A-Za-z0-9._-]+", delivered):
        literal = delivered[pos_d:mt.start()]
        assert original[pos_o:pos_o + len(literal)] == literal, (original[pos_o:pos_o + 200], literal[:200])
        value_start = pos_o + len(literal)
        quote = delivered[mt.start() - 1]
        if quote in "\"'":
            value_end = original.index(quote, value_start)
        else:
            end = re.compile(r"[\t\n\f\r >]").search(original, value_start)
            value_end = end.start() if end else len(original)
        clicks.append((mt.group(0), original[value_start:value_end]))
        pos_o, pos_d = value_end, mt.end()
    assert original[pos_o:] == delivered[pos_d:]
    return clicks


def compare(sent: bytes, delivered: bytes, public: str) -> list[tuple[str, str]]:
    """Assert the delivered copy is the sent message but for our changes; the wrapped links."""
    got = _strip_received(delivered)
    if got == sent:
        return []
    a = email.message_from_bytes(sent, policy=email.policy.compat32)
    b = email.message_from_bytes(got, policy=email.policy.compat32)
    pa, pb = list(a.walk()), list(b.walk())
    assert [p.get_content_type() for p in pa] == [p.get_content_type() for p in pb]
    clicks: list[tuple[str, str]] = []
    # Documented changes to headers: an instrumented part may change its transfer encoding (only
    # where a line would pass 998 octets), and a changed body drops the DKIM signatures it broke.
    changed = {"content-transfer-encoding", "dkim-signature"}
    for x, y in zip(pa, pb):
        hx = [(k.lower(), v) for k, v in x.raw_items() if k.lower() not in changed]
        hy = [(k.lower(), v) for k, v in y.raw_items() if k.lower() not in changed]
        assert hx == hy
        assert x.preamble == y.preamble and x.epilogue == y.epilogue
        if x.is_multipart():
            continue
        if x.get_content_type() == "text/html" and x.get_payload() != y.get_payload():
            clicks += _unwrap(_html_text(x), _html_text(y), public)
        else:
            assert x.get_payload() == y.get_payload()
    return clicks


async def _send_all(relay, messages: list[tuple[str, bytes]]) -> dict[str, tuple[int, str]]:
    replies = {}
    c = await client(relay.port)
    for name, msg in messages:
        try:
            _, reply = await c.sendmail("alice@example.com", ["carol@ext.test"], msg)
            replies[name] = (250, reply)
        except Exception as e:  # the reply the user's client would show
            code = getattr(e, "code", None)
            assert code is not None, (name, e)
            replies[name] = (code, getattr(e, "message", str(e)))
            await c.rset()
    await c.quit()
    return replies


async def _check(relay, sink, messages: list[tuple[str, bytes]]) -> int:
    await relay.start()
    replies = await _send_all(relay, messages)
    refused = {n: r for n, r in replies.items() if r[0] != 250}
    assert all(r[0] >= 500 for r in refused.values()), refused  # never a 4xx: it would fail again
    assert refused == {n: r for n, r in EXPECTED_REFUSALS.items() if n in replies}, refused
    accepted = [(n, m) for n, m in messages if n not in refused]
    await sink.wait_for(len(accepted), timeout=120)
    by_id = {}
    for r in sink.received:
        case = re.search(rb"^X-Corpus-Case: (\d+)\r\n", _strip_received(r.data), re.M)
        by_id[case.group(1) if case else None] = r.data
    public = relay.config.tracker.public_url.rstrip("/")
    wrapped = 0
    async with aiohttp.ClientSession() as http:
        for name, sent in accepted:
            mid = re.search(rb"^X-Corpus-Case: (\d+)\r\n", sent, re.M).group(1)
            assert mid in by_id, name
            try:
                clicks = compare(sent, by_id[mid], public)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None
            for url, raw_value in clicks:
                click = verify_click(relay.service.render.keyring, url[len(public) + 3:])
                assert click is not None, (name, url)
                assert click.target == _attribute_value(raw_value).strip(), (name, raw_value, click.target)
                async with http.get(url, allow_redirects=False) as resp:
                    assert resp.status == 302, (name, url, resp.status)
                    assert resp.headers["Location"] == to_uri(click.target), (name, raw_value)
                wrapped += 1
    return wrapped


async def test_every_corpus_message_is_accepted_and_delivered_as_it_came_but_for_our_changes(relay, sink):
    files = corpus_files("eml")
    assert len(files) > 100
    await _check(relay, sink, [(f.name, as_users_mail(f.read_bytes(), n)) for n, f in enumerate(files)])


async def test_every_corpus_template_is_tracked_without_breaking_a_link(relay, sink):
    files = corpus_files("html")
    assert len(files) > 100
    wrapped = await _check(relay, sink, [(f.name, template_mail(f.read_bytes(), n)) for n, f in enumerate(files)])
    # The links were wrapped, not left alone: nearly every http(s) link html5lib finds (the rest are
    # links whose text is a URL, kept as they are on purpose).
    import html5lib
    links = 0
    for f in files:
        for el in html5lib.parse(f.read_bytes(), namespaceHTMLElements=False).iter():
            links += el.tag in ("a", "area") and (el.get("href") or "").strip().lower().startswith(("http://", "https://"))
    assert links > 200 and wrapped >= 0.95 * links, (wrapped, links)
