"""Find what instrumentation changes in an HTML text, without building a tree.

The scanner walks the text once and records offsets: the opening ``<body>`` tag, the last
``</body>``, each ``<a>``/``<area>`` href (value span, decoded target, opt-out attributes, the
visible text of the link) and our own old pixels. Comments — conditional comments with everything
inside them included — and the contents of ``<script>``/``<style>`` are skipped whole. Nothing is
re-serialized: the caller replaces spans in the original text. Runs in linear time.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

# A start or end tag: name, then the attribute area up to the closing '>' (quotes respected).
# Quoted values are bounded and '<' ends an unquoted attribute area, so hostile input (unclosed
# quotes, runs of '<a') costs linear time, not quadratic.
_TAG = re.compile(r"""<(/?)([A-Za-z][A-Za-z0-9:-]*)((?:[^<>"']|"[^"]{0,8192}"|'[^']{0,8192}')*)>""", re.S)
_ATTR = re.compile(r"""([^\s"'>/=]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+)))?""", re.S)
_RAWTEXT = {"script", "style", "textarea", "title", "xmp"}

#: Attributes that opt a link out of click tracking (removed from the delivered copy).
OPT_OUT = {"data-notrack", "clicktracking", "disable-tracking", "data-pm-no-track", "ses:no-track"}

_URLISH = re.compile(r"^(?:(?:https?|ftp)://|www\.)\S+$|^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9-]+)*"
                     r"\.[a-z]{2,63}(?:[/:?#]\S*)?$", re.IGNORECASE)


@dataclass
class Attr:
    name: str  # lower-case
    start: int  # span of the whole attribute (name=value) in the text
    end: int
    value: str | None  # raw (entity-encoded) value
    value_start: int = -1  # span of the value inside its quotes
    value_end: int = -1


@dataclass
class Link:
    tag_start: int
    href: Attr
    target: str  # decoded href
    opt_out: list[Attr] = field(default_factory=list)
    text: str = ""  # visible text (filled when the closing tag is found)


@dataclass
class Scan:
    body_open_end: int | None = None  # offset just after the first <body ...>
    body_close_start: int | None = None  # offset of the last </body>
    links: list[Link] = field(default_factory=list)
    old_pixels: list[tuple[int, int]] = field(default_factory=list)
    visible: bool = False  # any visible text or image


def _attrs(tag_text: str, offset: int) -> list[Attr]:
    out = []
    for m in _ATTR.finditer(tag_text):
        name = m.group(1).lower()
        if m.group(2) is not None:
            v, vs = m.group(2), m.start(2)
        elif m.group(3) is not None:
            v, vs = m.group(3), m.start(3)
        elif m.group(4) is not None:
            v, vs = m.group(4), m.start(4)
        else:
            v, vs = None, -1
        out.append(Attr(name, offset + m.start(), offset + m.end(), v,
                        offset + vs if v is not None else -1,
                        offset + vs + len(v) if v is not None else -1))
    return out


def _opted_out(a: Attr) -> bool:
    if a.name not in OPT_OUT:
        return False
    value = html.unescape(a.value or "").strip().lower()
    if a.name == "clicktracking":
        return value == "off"
    if a.name == "disable-tracking":
        return value in ("", "true", "1", "yes")
    return True


def scan(text: str, pixel_prefix: str) -> Scan:
    """Scan ``text``; ``pixel_prefix`` is ``{public_url}/o/`` (old pixels of ours to remove)."""
    s = Scan()
    pos = 0
    n = len(text)
    open_link: Link | None = None
    link_text: list[str] = []
    while pos < n:
        lt = text.find("<", pos)
        chunk = text[pos:lt if lt >= 0 else n]
        if chunk:
            if not s.visible and html.unescape(chunk).replace("\xa0", " ").strip():
                s.visible = True
            if open_link is not None:
                link_text.append(chunk)
        if lt < 0:
            break
        if text.startswith("<!--", lt):
            end = text.find("-->", lt + 4)
            pos = n if end < 0 else end + 3
            continue
        if text.startswith("<!", lt) or text.startswith("<?", lt):
            end = text.find(">", lt)
            pos = n if end < 0 else end + 1
            continue
        m = _TAG.match(text, lt)
        if not m:
            if open_link is not None:
                link_text.append("<")
            pos = lt + 1
            continue
        closing, name, rest = m.group(1) == "/", m.group(2).lower(), m.group(3)
        pos = m.end()
        if closing:
            if name == "body":
                s.body_close_start = lt
            elif name in ("a",) and open_link is not None:
                open_link.text = html.unescape("".join(link_text)).replace("\xa0", " ").strip()
                open_link = None
            continue
        if name == "body" and s.body_open_end is None:
            s.body_open_end = m.end()
        elif name in ("a", "area"):
            attrs = _attrs(rest, m.start(3))
            href = next((a for a in attrs if a.name == "href"), None)
            if name == "a":
                if open_link is not None:  # an unclosed <a>: the new one closes it
                    open_link.text = html.unescape("".join(link_text)).strip()
                open_link = None
                link_text = []
            if href is not None and href.value is not None:
                link = Link(lt, href, html.unescape(href.value).strip(),
                            [a for a in attrs if _opted_out(a)])
                s.links.append(link)
                if name == "a" and not rest.rstrip().endswith("/"):
                    open_link = link
                    link_text = []
        elif name == "img":
            attrs = _attrs(rest, m.start(3))
            src = next((a for a in attrs if a.name == "src"), None)
            if src is not None and src.value is not None and \
                    html.unescape(src.value).strip().startswith(pixel_prefix):
                s.old_pixels.append((lt, m.end()))
            else:
                s.visible = True
        elif name in _RAWTEXT:
            close = re.compile(rf"</{name}\s*>", re.IGNORECASE).search(text, pos)
            pos = n if close is None else close.start()
            if name == "title":
                continue
    if open_link is not None:
        open_link.text = html.unescape("".join(link_text)).strip()
    return s


def looks_like_url(text: str) -> bool:
    """Visible link text that is itself a URL or a domain (wrapping it would look like phishing)."""
    t = text.strip().strip("<>").strip()
    return bool(t) and " " not in t and bool(_URLISH.match(t))
