"""Internationalised domains and click targets: IDNA 2008 with the UTS #46 non-transitional mapping
wherever a domain is compared or converted, and every redirect going exactly where a browser would
have gone from the link — or the link refused as one no Location can carry.

References: the ``idna`` package (IDNA 2008, UTS #46) for domain conversion; ada (``ada-url``, the
WHATWG URL parser Node.js uses) and, when Debian's chromium is there, the browser itself for
what the link and the Location open.
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import re

import idna
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import client
from test_tracker import browser, public
from core import idn, neverlog
from core.links import Keyring, Unrepresentable, click_url, is_http_url, representable, to_uri

KEY = "test-key-0123456789abcdef"  # tests/helpers.py's base config signs with it

#: (the link as written, what the tracker's Location must be; None: no Location can carry it).
CASES = [
    ("https://straße.de/angebot", "https://xn--strae-oqa.de/angebot"),
    ("https://faß.de/", "https://xn--fa-hia.de/"),
    ("https://ÖBB.at/fahrplan?von=Wien&nach=Graz", "https://xn--bb-eka.at/fahrplan?von=Wien&nach=Graz"),
    ("https://STRAẞE.de/", "https://xn--strae-oqa.de/"),  # the capital sharp s is ß (UTS #46 of Unicode 15.1 on)
    ("https://straße。de/", "https://xn--strae-oqa.de/"),  # an ideographic full stop is a dot
    ("https://straße.de./x", "https://xn--strae-oqa.de./x"),  # a trailing dot is another host
    ("https://日本語.jp/パス", "https://xn--wgv71a119e.jp/%E3%83%91%E3%82%B9"),
    ("https://pаypal.com/", "https://xn--pypal-4ve.com/"),  # mixed script (Cyrillic а): the link said so
    ("https://שלום.example/", "https://xn--9dbne9b.example/"),
    ("http://[2001:db8::1]/ä", "http://[2001:db8::1]/%C3%A4"),
    ("http://[2001:DB8::1]:8080/ä?ö#ü", "http://[2001:DB8::1]:8080/%C3%A4?%C3%B6#%C3%BC"),
    ("https://straße.de:443/x", "https://xn--strae-oqa.de:443/x"),  # the port as written
    ("https://straße.de:08080/x", "https://xn--strae-oqa.de:08080/x"),
    ("https://jürgen:pässwört@straße.de/", "https://j%C3%BCrgen:p%C3%A4ssw%C3%B6rt@xn--strae-oqa.de/"),
    ("https://a@b@straße.de/", "https://a@b@xn--strae-oqa.de/"),  # userinfo runs to the last @
    ("https://stra%C3%9Fe.de/%C3%A4?q=%20ä&r=%zz#%C3%BC", "https://xn--strae-oqa.de/%C3%A4?q=%20%C3%A4&r=%zz#%C3%BC"),
    ("https://bücher.example/a b?c d#e f", "https://xn--bcher-kva.example/a b?c d#e f"),  # ASCII left as written
    ("https://bücher.example/^{}|`?'^{}`#^{}`", "https://xn--bcher-kva.example/^{}|`?'^{}`#^{}`"),
    ("https://bücher.example\\pfad\\ä", "https://xn--bcher-kva.example\\pfad\\%C3%A4"),
    ("https://１２７.０.０.１/ä", "https://127.0.0.1/%C3%A4"),
    ("  https://bücher.example/ä\u00a0 ", "https://xn--bcher-kva.example/%C3%A4%C2%A0"),  # only C0 and space strip
    ("https://example.com/\x01", "https://example.com/"),  # a trailing C0 control strips too
    # Already ASCII: byte for byte, whatever a browser would normalise.
    ("https://Example.COM:8443/a/./../b?c=d e&f=%41#G", "https://Example.COM:8443/a/./../b?c=d e&f=%41#G"),
    ("https://stra%C3%9Fe.de/", "https://stra%C3%9Fe.de/"),
    ("https://xn--strae-oqa.de/", "https://xn--strae-oqa.de/"),
    ("http://0x7f.1/", "http://0x7f.1/"),
    ("https://my_host.example.com/", "https://my_host.example.com/"),
    # Cannot be carried: no Location would open what the link said.
    ("http://example.com:99999/", None),
    ("https://straße.de:99999/angebot", None),
    ("https://example.com:8o/", None),
    ("https://💩.la/", None),  # emoji: not IDNA 2008 (browsers would open xn--ls8h.la)
    ("https://xn--ls8h.la/", None),  # the same, as an A-label
    ("https://☃.net/", None),
    ("https://aש.com/", None),  # mixed direction in one label: the bidi rule
    ("https://ab--c.straße.de/", None),  # hyphens in the 3rd and 4th position of a label
    ("https://a\u200db.de/", None),  # a joiner out of context
    ("https://℀.de/", None),  # UTS #46 maps it to "a/c"
    ("https://ex%2Fample.com/", None),  # a percent-encoded slash in the host
    ("https://xn--a.de/", None),  # not Punycode
    ("http://[2001:db8::zz]/ä", None),
    ("http://[2001:db8::1/", None),
    ("http://[fe80::1%25eth0]/", None),
    ("http://[::1]x/", None),
    ("http://1.2.3.256/", None),
    ("http://example.1/", None),
    ("https://exa mple.com/", None),
    ("https://@/x", None),
    ("https://example.com/a\tb", None),  # a tab: browsers drop it; no header can carry it as written
    ("https://example.com/\x01x", None),
    ("https://example.com/\x7f", None),
    ("https://example.com/\ud800", None),
]

CARRIED = [(a, b) for a, b in CASES if b is not None]
REFUSED = [a for a, b in CASES if b is None]


@pytest.mark.parametrize("target,expected", CASES)
def test_to_uri_gives_what_a_browser_opens_or_refuses(target, expected):
    if expected is None:
        assert representable(target), target
        with pytest.raises(Unrepresentable):
            to_uri(target)
    else:
        assert representable(target) is None
        assert to_uri(target) == expected


def test_a_non_ascii_query_is_refused_in_a_part_whose_charset_is_not_utf8():
    iri = "https://bücher.example/ä?q=ö#ü"
    assert representable(iri) is None and representable(iri, "UTF-8") is None and representable(iri, "utf-16le") is None
    assert "windows-1252" in representable(iri, "windows-1252")
    assert "iso-8859-2" in representable(iri, "iso-8859-2")
    assert representable("https://bücher.example/ä?q=o#ü", "iso-8859-2") is None  # only the query
    assert representable("https://example.com/?q=%C3%B6", "windows-1252") is None  # ASCII as it is


def test_reasons_say_what_is_wrong():
    assert representable("http://example.com:99999/") == "port 99999 is out of range"
    assert "IDNA 2008" in representable("https://💩.la/") and "U+1F4A9" in representable("https://💩.la/")
    assert representable("http://[2001:db8::zz]/") == "not a valid IPv6 address"
    assert representable("mailto:x@example.com") == "not an http(s) address"


def _ada():
    return pytest.importorskip("ada_url", reason="ada-url (the WHATWG URL parser) is not installed: "
                               "pip install '.[test]'")


@pytest.mark.parametrize("target,expected", CARRIED)
def test_the_location_parses_as_the_link_does_by_the_url_standard(target, expected):
    ada = _ada()
    assert ada.URL(expected).href == ada.URL(target).href


# Not the control characters and the lone surrogate, which a browser drops, encodes or replaces:
# refused because no header carries them as written. Not IDNA's refusals: there browsers are laxer.
@pytest.mark.parametrize("target", [t for t in REFUSED if "IDNA" not in representable(t)
                                    and t.isprintable() and "\ud800" not in t])
def test_what_is_refused_for_its_syntax_the_url_standard_refuses_too(target):
    ada = _ada()
    with pytest.raises(ValueError):
        ada.URL(target)


# --- Domain conversion against the idna package -------------------------------------------------

_CHARS = st.sampled_from(list("abcxyzABZ0189-_") + list("ßöÖäüẞςσΣабвгаеіשלוםمرحبا日本語中文한국ï"
                                                       "\u200c\u200d\u0301\u00ad。．｡／＃ⅷ①ﬁ💩☃✓"))
_LABEL = st.text(_CHARS, min_size=1, max_size=12)
_DOMAIN = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)
_TLD = st.sampled_from(["de", "at", "com", "example", "XN--P1AI", "рф", "中国", "1", "0x7f"])


def _reference(domain: str) -> str | None:
    try:
        return idna.encode(domain, uts46=True, transitional=False).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_DOMAIN, _TLD)
def test_to_ascii_is_the_idna_package_with_uts46_non_transitional(name, tld):
    domain = f"{name}.{tld}"
    ref = _reference(domain)
    if domain.isascii() and "xn--" not in domain.lower():
        assert idn.to_ascii(domain) == domain.lower()  # ASCII is only lower-cased
        return
    if ref is None:
        with pytest.raises(idn.DomainError):
            idn.to_ascii(domain)
        assert idn.to_ascii_or_none(domain) is None
    else:
        assert idn.to_ascii(domain) == ref.rstrip(".")
        assert idn.host_to_ascii(domain) == ref
        assert idn.to_ascii(idn.to_ascii(domain)) == idn.to_ascii(domain)  # an A-label converts to itself


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_DOMAIN, _TLD, st.lists(st.sampled_from(list("/?#%=&ab ä€😀'^{}`|\\.") + ["%C3%A4", "%2e", "%zz"]),
                              max_size=12).map("".join))
def test_a_link_converts_its_host_with_idna_and_parses_as_the_url_standard_says(name, tld, tail):
    target = f"https://{name}.{tld}/{tail}"
    got = representable(target)
    ref = _reference(f"{name}.{tld}")
    if got is None:
        loc = to_uri(target)
        assert loc.isascii() and loc.isprintable()
        host = re.match(r"https://([^/?#\\]*)", loc).group(1)
        if not (name.isascii() and tld.isascii()):
            assert host == ref  # the host in the Location is the idna package's conversion
        try:
            import ada_url
        except ImportError:
            return
        assert ada_url.URL(loc).href == ada_url.URL(target).href
    elif not (name.isascii() and tld.isascii()) and "IDNA" in got:
        assert ref is None


_IPV6 = st.builds(lambda n, form: form(ipaddress.IPv6Address(n)), st.integers(0, 2 ** 128 - 1),
                  st.sampled_from([lambda a: a.compressed, lambda a: a.exploded, lambda a: a.compressed.upper()]))
_HOSTS = st.one_of(
    st.builds(lambda n, t: f"{n}.{t}", _DOMAIN, _TLD),
    _IPV6.map(lambda a: f"[{a}]"),
    st.sampled_from(["[::1", "[::1]x", "[1:2:3:4:5:6:7:8:9]", "[::ffff:1.2.3.4]", "[::1.2.3.04]", "[fe80::1%25lo]",
                     "1.2.3.4", "1.2.3.256", "0x7f.1", "0x100.1", "08.1", "1.2.3.4.5", "１２７.０.０.１", "a.0x", "",
                     "ex%41mple.com", "stra%C3%9Fe.de", "%F0%9F%92%A9.la", "%FF.de", "a%2Fb.de", "xn--strae-oqa.de"]))
_USERINFO = st.sampled_from(["", "user@", "user:pass@", "jürgen:pä:ss@", "a@b@", ":@", "%40@", "us er@", "@"])
_PORTS = st.sampled_from(["", ":", ":0", ":080", ":443", ":65535", ":65536", ":99999", ":8a", ":-1", ":١٢"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["http://", "HTTPS://", "https:/\\", "http:\\\\"]), _USERINFO, _HOSTS, _PORTS,
       st.lists(st.sampled_from(list("/\\?#%=&a äß€😀'^{}`|.") + ["%C3%A4", "%2e", "%zz"]), max_size=10).map("".join))
def test_whole_links_against_the_url_standard(scheme, userinfo, host, port, tail):
    """Hosts, IPv6 literals, IPv4 forms, userinfo and ports, assembled: what to_uri carries parses
    as the link does (ada); what it refuses for its syntax, the URL standard refuses too."""
    ada = _ada()
    target = f"{scheme}{userinfo}{host}{port}/{tail}"
    if not is_http_url(target):
        return  # the relay wraps only these (an empty host, a third slash)
    why = representable(target)
    if why is None:
        loc = to_uri(target)
        assert loc.isascii() and loc.isprintable()
        assert ada.URL(loc).href == ada.URL(target).href, (target, loc)
        if target.isascii():
            # byte for byte, but for C0 controls and spaces at the ends
            assert loc == target.strip("".join(map(chr, range(0x21))))
    elif "IDNA 2008" not in why:
        with pytest.raises(ValueError):
            ada.URL(target)


_ASCII_LABEL = st.one_of(st.text(st.sampled_from("aZ09_-x"), min_size=1, max_size=5),
                         st.sampled_from(["xn--strae-oqa", "XN--ls8h", "0x", "0x7f", "08", "255", "256"]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["http://", "HTTPS://"]), st.lists(_ASCII_LABEL, min_size=1, max_size=4).map(".".join),
       st.sampled_from(["", "."]), st.sampled_from(["", ":", ":0", ":80", ":65535", ":65536", ":99999", ":123456"]),
       st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=12))
def test_the_shortcut_for_plain_ascii_links_agrees_with_the_full_parse(scheme, host, dot, port, tail):
    from core import links
    for target in (f"{scheme}{host}{dot}{port}", f"{scheme}{host}{dot}{port}/{tail}", f"{scheme}{host}{port}?{tail}"):
        if links._plain(target):
            assert links._rebuild(target) == target


# --- Over real HTTP: the relay wraps, the tracker redirects -----------------------------------

def _message(targets: list[str], charset: str = "utf-8") -> bytes:
    links = "".join(f'<p><a href="{html.escape(t, quote=True)}">link {i}</a></p>\r\n'
                    for i, t in enumerate(targets))
    head = ("From: Alice <alice@example.com>\r\nTo: carol@ext.test\r\nSubject: IDN\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/html; charset={charset}\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
    return head.encode("ascii") + f"<html><body>\r\n{links}</body></html>\r\n".encode(charset)


async def _send(relay, msg: bytes, rcpt: str = "carol@ext.test") -> bytes:
    c = await client(relay.port, user="alice", source="127.0.0.2")
    await c.sendmail("alice@example.com", [rcpt], msg)
    await c.quit()
    (got,) = await relay.sink.wait_for(1)
    return got.data


def _clicks(copy: bytes) -> list[str]:
    return [u.decode() for u in re.findall(rb'href="(http://[^"]+/c/[^"]+)"', copy)]


# The control characters and the surrogate cannot go through SMTP and the HTML as written.
_MAILABLE = [(a, b) for a, b in CARRIED if a.strip() == a and a.isprintable()]


async def test_every_redirect_over_http_is_the_exact_location(relay, sink):
    await relay.start(tracking={"scanner_window_seconds": 0})
    copy = await _send(relay, _message([a for a, _ in _MAILABLE]))
    clicks = _clicks(copy)
    assert len(clicks) == len(_MAILABLE)
    async with browser() as s:
        for url, (target, expected) in zip(clicks, _MAILABLE):
            async with s.get(url, allow_redirects=False) as r:
                assert r.status == 302, target
                assert r.headers["Location"] == expected, target


async def test_a_signed_target_that_cannot_be_carried_gets_404_never_500(relay, sink):
    # Mail signed before the relay knew (or by another version) may hold such targets.
    await relay.start(tracking={"scanner_window_seconds": 0})
    copy = await _send(relay, _message(["https://example.com/ok"]))
    token = _clicks(copy)[0].split("/c/")[1].split(".")[1]
    ring = Keyring.from_strings([KEY])
    async with browser() as s:
        for target in REFUSED:
            url = click_url(public(relay), ring, token, 0, target)
            for method in ("GET", "HEAD"):
                async with s.request(method, url, allow_redirects=False) as r:
                    assert r.status == 404 and "Location" not in r.headers, (target, r.status)
        async with s.get(click_url(public(relay), ring, token, 0, "https://straße.de/angebot"),
                         allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "https://xn--strae-oqa.de/angebot"


async def test_the_relay_leaves_a_link_it_cannot_carry_unwrapped_with_its_reason(relay, sink):
    await relay.start(tracking={"scanner_window_seconds": 0})
    refused = ["http://example.com:99999/", "https://💩.la/", "http://[2001:db8::zz]/ä"]
    copy = await _send(relay, _message(refused + ["https://straße.de/angebot"]))
    for target in refused:
        assert f'href="{html.escape(target, quote=True)}"'.encode() in copy, target
    assert len(_clicks(copy)) == 1
    await relay.wait_status({"sent"}, 1)
    (note,) = [n for (n,) in await relay.rows("SELECT render_note FROM recipients")]
    for target in refused:
        assert representable(target) in (note or ""), note


async def test_in_a_windows_1252_part_a_non_ascii_query_stays_unwrapped(relay, sink):
    # A browser encodes the query in the document's charset (%F6 for ö here), the path in UTF-8.
    await relay.start(tracking={"scanner_window_seconds": 0})
    query, path = "https://bücher.example/ä?q=ö", "https://bücher.example/ä"
    copy = await _send(relay, _message([query, path], "windows-1252"))
    assert f'href="{query}"'.encode("windows-1252") in copy
    (url,) = _clicks(copy)
    async with browser() as s:
        async with s.get(url, allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "https://xn--bcher-kva.example/%C3%A4"
    await relay.wait_status({"sent"}, 1)
    (note,) = [n for (n,) in await relay.rows("SELECT render_note FROM recipients")]
    assert representable(query, "windows-1252") in (note or ""), note


# --- In the browser: the link and the tracker's redirect open the same URL ---------------------

class _Proxy:
    """Where the browser sends every request that is not for the tracker on loopback: records the
    request's absolute URL and answers a small page, so nothing leaves the machine. It also serves
    the pages holding the links, as UTF-8 documents (as a mail client shows a UTF-8 message: in a
    document of another charset a browser percent-encodes a link's query in that charset)."""

    PAGES = "http://pages.test/"

    def __init__(self):
        self.seen: list[str] = []
        self.pages: dict[str, bytes] = {}

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    def page(self, href: str, charset: str = "utf-8") -> str:
        url = f"{self.PAGES}{len(self.pages)}"
        self.pages[url] = (f'<!doctype html><html><head><meta charset="{charset}"></head><body>'
                           f'<a id="l" href="{html.escape(href, quote=True)}">x</a></body></html>').encode(charset)
        return url

    async def _serve(self, reader, writer):
        try:
            line = await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            method, target, _ = line.decode("latin-1").split(" ", 2)
            body = self.pages.get(target)
            if body is None:
                self.seen.append(target if method != "CONNECT" else "CONNECT " + target)
                body = b"<html><body>proxied</body></html>"
            status = b"403 Forbidden" if method == "CONNECT" else b"200 OK"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/html\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (ValueError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()


def _browser_noise(url: str) -> bool:
    """What Chromium asks for of its own accord (updates, sign-in, favicons), not the page."""
    from urllib.parse import urlsplit
    if url.startswith("CONNECT ") or url.endswith("/favicon.ico"):
        return True
    host = urlsplit(url).hostname or ""
    return host.endswith((".google.com", ".googleapis.com", ".gstatic.com", ".gvt1.com"))


@pytest.mark.browser
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the database plays no part here
async def test_chromium_opens_the_same_url_from_the_link_and_from_the_redirect(relay, sink):
    from browser import CHROMIUM, READER_UA, require_chromium
    require_chromium()
    from playwright.async_api import async_playwright
    # http:// so that the proxy sees the whole URL (of https it would see only CONNECT host:port)
    cases = [("http://" + a.split("://", 1)[1], b) for a, b in _MAILABLE if a.startswith("http")]
    await relay.start(tracking={"scanner_window_seconds": 0})
    copy = await _send(relay, _message([a for a, _ in cases]))
    clicks = _clicks(copy)
    assert len(clicks) == len(cases)
    proxy = _Proxy()
    port = await proxy.start()
    try:
        async with async_playwright() as p:
            b = await p.chromium.launch(
                executable_path=CHROMIUM, headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync",
                      "--disable-default-apps", "--disable-client-side-phishing-detection",
                      f"--proxy-server=http://127.0.0.1:{port}",
                      # only the tracker direct: a link to 127.0.0.1 itself goes to the proxy too
                      f"--proxy-bypass-list=<-loopback>;{relay.config.tracker.listen}"])
            try:
                page = await (await b.new_context(user_agent=READER_UA)).new_page()

                async def follow(href: str, charset: str = "utf-8") -> tuple[str, str]:
                    await page.goto(proxy.page(href, charset), wait_until="domcontentloaded")
                    before = len(proxy.seen)
                    async with page.expect_navigation(wait_until="commit"):
                        await page.click("#l", no_wait_after=True)
                    (opened,) = [u for u in proxy.seen[before:] if not _browser_noise(u)]
                    return opened, page.url

                for (target, _), wrapped in zip(cases, clicks):
                    direct = await follow(target)
                    via_tracker = await follow(wrapped)
                    assert via_tracker == direct, target
                # Why representable() takes the part's charset: in a windows-1252 document the
                # browser encodes the query in windows-1252, where the Location's would be UTF-8.
                iri = "http://bücher.example/ä?q=ö"
                assert (await follow(iri, "windows-1252"))[0] == "http://xn--bcher-kva.example/%C3%A4?q=%F6"
                assert (await follow(iri))[0] == to_uri(iri) == "http://xn--bcher-kva.example/%C3%A4?q=%C3%B6"
                assert representable(iri, "windows-1252") and representable(iri, "utf-8") is None
            finally:
                await b.close()
    finally:
        await proxy.stop()


# --- Never Log and internal domains -------------------------------------------------------------

def test_never_log_entry_for_an_idn_domain_matches_both_forms_and_not_another_domain():
    entry = neverlog.normalise_entry("*@straße.de")
    assert entry == "*@xn--strae-oqa.de"
    entries = {entry, neverlog.normalise_entry("Anna@ÖBB.at")}
    assert neverlog.matches("x@xn--strae-oqa.de", entries)
    assert neverlog.matches("x@straße.de", entries)
    assert neverlog.matches("X@STRAßE.DE", entries)
    assert not neverlog.matches("x@strasse.de", entries)
    assert neverlog.matches("anna@xn--bb-eka.at", entries) and neverlog.matches("ANNA@öbb.at", entries)
    assert not neverlog.matches("anna@obb.at", entries)
    # and the other way round: an entry for strasse.de is not straße.de
    other = {neverlog.normalise_entry("*@strasse.de")}
    assert not neverlog.matches("x@straße.de", other) and not neverlog.matches("x@xn--strae-oqa.de", other)
    for bad in ("*@💩.la", "*@xn--ls8h.la", "*@ab--c.straße.de"):
        with pytest.raises(neverlog.EntryError):
            neverlog.normalise_entry(bad)


def _facts(config, **kw):
    from relay.policy import MessageFacts
    return MessageFacts(user_addresses=config.user_addresses, internal_domains=config.internal_domains,
                        x_track=None, x_log=None, log_bcc=False, sender="alice@example.com", **kw)


def test_internal_domains_and_own_addresses_compare_in_ascii(tmp_path):
    from helpers import base_config, make_config
    from relay.policy import decide
    data = base_config(db_url="sqlite+aiosqlite:///x.db", relay_port=1, upstream_url="smtp://127.0.0.1:1",
                       tmp=tmp_path, tracking={"internal_domains": ["Straße.de", "xn--bb-eka.at"]})
    data["users"][0]["addresses"].append("jörg@bücher.example")
    config = make_config(data)
    assert config.internal_domains == {"xn--strae-oqa.de", "xn--bb-eka.at"}
    facts = _facts(config)
    for address in ("x@xn--strae-oqa.de", "x@straße.de", "x@STRAßE.de", "y@öbb.at", "y@XN--BB-EKA.AT"):
        assert "internal" in decide(config, facts, address).reasons, address
    for address in ("x@strasse.de", "y@obb.at"):
        assert "internal" not in decide(config, facts, address).reasons, address
    assert "own_address" in decide(config, facts, "jörg@xn--bcher-kva.example").reasons
    assert "own_address" in decide(config, facts, "Jörg@Bücher.example").reasons
    del data["tracking"]["internal_domains"]
    config = make_config(data)  # the default: the users' domains
    assert "xn--bcher-kva.example" in config.internal_domains
    assert "internal" in decide(config, _facts(config), "someone@bücher.example").reasons


async def test_never_log_and_internal_domains_through_the_relay(relay, sink):
    await relay.start(tracking={"scanner_window_seconds": 0, "internal_domains": ["example.com", "bücher.example"]},
                      never_log={"team": ["*@straße.de"]})
    rcpts = ["x@xn--strae-oqa.de", "y@straße.de", "z@strasse.de", "w@xn--bcher-kva.example"]
    c = await client(relay.port, user="alice", source="127.0.0.2")
    await c.sendmail("alice@example.com", rcpts, _message(["https://example.com/"]), mail_options=["SMTPUTF8"])
    await c.quit()
    await sink.wait_for(len(rcpts))
    reasons = {a: r for a, r in await relay.rows("SELECT address, reasons FROM recipients")}
    never = {a: bool(n) for a, n in await relay.rows("SELECT address, never_log FROM recipients")}
    assert never == {"x@xn--strae-oqa.de": True, "y@straße.de": True, "z@strasse.de": False,
                     "w@xn--bcher-kva.example": False}
    assert "never_log" in str(reasons["y@straße.de"]) and "never_log" not in str(reasons["z@strasse.de"])
    assert "internal" in str(reasons["w@xn--bcher-kva.example"])
    assert "internal" not in str(reasons["z@strasse.de"])
