"""Find what instrumentation changes in an HTML text, without building a tree.

One regular-expression pass jumps from one interesting place to the next — comments, ``<a>``,
``<area>``, ``<img>``, ``<body>``, ``</body>``, ``</a>`` and raw-text elements — and records
offsets: the opening ``<body>`` tag, the last ``</body>``, each link's href value span with its
decoded target, opt-out attributes and visible text, and our own old pixels. Every other tag is
skipped inside the regex engine. Comments — conditional comments with everything inside them —
and the contents of ``<script>``/``<style>`` are skipped whole. Nothing is re-serialized: the
caller replaces spans in the original text. Linear time; quoted values are bounded so hostile
input cannot make it quadratic.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

_NEXT = re.compile(r"<!--|<(/?)(a|area|img|body|script|style|textarea|title|xmp)(?=[\s/>])", re.I)
# The attribute area of a start tag up to its '>' (quotes respected, bounded).
_TAG_REST = re.compile(r"""((?:[^<>"']|"[^"]{0,8192}"|'[^']{0,8192}')*)>""", re.S)
_HREF = re.compile(r"""(?:^|(?<=[\s"'/]))href\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+))""", re.I)
_ATTR = re.compile(r"""([^\s"'>/=]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+)))?""", re.S)
# Comments, raw-text elements and tags, each consumed to its end (or the end of the text when it
# is unterminated) in one linear pass.
_INVISIBLE = re.compile(r"<!--.*?(?:-->|\Z)|<(script|style|title)\b.*?(?:</\1\s*>|\Z)|<[A-Za-z/!?][^<>]*>",
                        re.S | re.I)
_RAW_CLOSE = {name: re.compile(rf"</{name}\s*>", re.I) for name in ("script", "style", "textarea", "title", "xmp")}

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
    text_start: int = -1  # span of the link's content (for <a>), to read its visible text
    text_end: int = -1


@dataclass
class Scan:
    body_open_end: int | None = None  # offset just after the first <body ...>
    body_close_start: int | None = None  # offset of the last </body>
    links: list[Link] = field(default_factory=list)
    old_pixels: list[tuple[int, int]] = field(default_factory=list)
    images: int = 0  # <img> other than our old pixels


def _attrs(tag_text: str, offset: int) -> list[Attr]:
    out = []
    for m in _ATTR.finditer(tag_text):
        name = m.group(1).lower()
        for g in (2, 3, 4):
            if m.group(g) is not None:
                v, vs = m.group(g), m.start(g)
                break
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
    while pos < n:
        m = _NEXT.search(text, pos)
        if m is None:
            break
        lt = m.start()
        if m.group(2) is None:  # a comment: skipped whole, conditional comments included
            end = text.find("-->", lt + 4)
            pos = n if end < 0 else end + 3
            continue
        closing, name = m.group(1) == "/", m.group(2).lower()
        rest = _TAG_REST.match(text, m.end())
        if rest is None:
            pos = m.end()
            continue
        pos = rest.end()
        if closing:
            if name == "body":
                s.body_close_start = lt
            elif name == "a" and open_link is not None:
                open_link.text_end = lt
                open_link = None
            continue
        if name == "body":
            if s.body_open_end is None:
                s.body_open_end = pos
        elif name in ("a", "area"):
            area = rest.group(1)
            if name == "a" and open_link is not None:  # an unclosed <a>: the new one closes it
                open_link.text_end = lt
                open_link = None
            low = area.lower()
            if any(o in low for o in OPT_OUT):  # rare: parse every attribute
                attrs = _attrs(area, rest.start(1))
                href = next((a for a in attrs if a.name == "href"), None)
                opt_out = [a for a in attrs if _opted_out(a)]
            else:
                hm = _HREF.search(area)
                href = None
                if hm:
                    g = 1 if hm.group(1) is not None else 2 if hm.group(2) is not None else 3
                    off = rest.start(1)
                    href = Attr("href", off + hm.start(), off + hm.end(), hm.group(g),
                                off + hm.start(g), off + hm.end(g))
                opt_out = []
            if href is not None and href.value is not None:
                value = href.value
                target = (html.unescape(value) if "&" in value else value).strip()
                link = Link(lt, href, target, opt_out)
                s.links.append(link)
                if name == "a" and not rest.group(1).rstrip().endswith("/"):
                    link.text_start = pos
                    open_link = link
        elif name == "img":
            attrs = _attrs(rest.group(1), rest.start(1))
            src = next((a for a in attrs if a.name == "src"), None)
            if src is not None and src.value is not None and \
                    html.unescape(src.value).strip().startswith(pixel_prefix):
                s.old_pixels.append((lt, pos))
            else:
                s.images += 1
        else:  # raw text: its content is not markup
            close = _RAW_CLOSE[name].search(text, pos)
            pos = n if close is None else close.start()
    if open_link is not None:
        open_link.text_end = n
    return s


def visible_text(fragment: str) -> str:
    """The text a reader sees in a piece of HTML (tags and comments removed, entities decoded)."""
    return html.unescape(_INVISIBLE.sub("", fragment)).replace("\xa0", " ").strip()


def has_visible_content(text: str, sc: Scan) -> bool:
    if sc.images:
        return True
    body = text[sc.body_open_end or 0: sc.body_close_start if sc.body_close_start is not None else len(text)]
    return bool(visible_text(body))


def looks_like_url(text: str) -> bool:
    """Visible link text that is itself a URL or a domain (wrapping it would look like phishing)."""
    t = text.strip().strip("<>").strip()
    return bool(t) and " " not in t and bool(_URLISH.match(t))
