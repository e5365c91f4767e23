"""Find what instrumentation changes in an HTML text, without building a tree.

The scan follows the WHATWG HTML tokenizer for everything it relies on, and records offsets in the
original text: the opening ``<body>`` tag, the last ``</body>``, each ``<a>``/``<area>`` href value
span with its decoded value, opt-out attributes and visible text, and our own old pixels. Nothing
is re-serialized: the caller replaces spans in the original text.

Tokenization, as the standard does it:

- Every ``<`` that starts a tag (``<`` + ASCII letter, ``</`` + letter) is tokenized to its real
  end: attribute names and values in all three forms decide where it ends (a quoted value may hold
  ``>`` or ``<a href``; an unquoted value runs to whitespace or ``>``, keeping ``=``, quotes, ``<``
  and backticks). Attributes are read in order; of a duplicate, the first wins. A tag still open at
  the end of the text is dropped, as the standard drops it.
- Comments end at ``-->`` or ``--!>``, or are ``<!-->`` / ``<!--->``; ``<!...>``, ``<?...>`` and
  ``</`` + non-letter are bogus comments to the next ``>``; ``<!DOCTYPE ...>`` likewise; ``</>`` is
  nothing. ``<![CDATA[...]]>`` is a CDATA section inside ``<svg>``/``<math>`` and a bogus comment
  elsewhere.
- Raw text, as the tree builder switches the tokenizer: ``<script>`` (script data, with its
  ``<!--`` escape states), ``<style>``, ``<xmp>``, ``<iframe>``, ``<noembed>``, ``<noframes>``
  (RAWTEXT), ``<title>``, ``<textarea>`` (RCDATA), ``<plaintext>`` (the rest). Each ends at the
  first ``</name`` followed by whitespace, ``/`` or ``>``, and that end tag is itself tokenized.
- ``<noscript>`` is parsed as a mail client parses it, with scripting disabled: its content is
  markup (its links are real links there). A browser with scripting enabled reads it as raw text to
  the first ``</noscript``; when the two readings end it at different places, everything after is
  left untouched.
- ``<template>`` content is ordinary markup to the tokenizer, and the tree builder inserts its
  ``<a>`` elements like any other (into the template's content; html5lib likewise): its links are
  wrapped like any other (they are inert until a script clones them). A ``<body>`` tag inside a
  template is ignored, as the tree builder ignores it (the pixel never goes there).
- Character references in attribute values are decoded by the standard's rules: numeric ones with
  its replacements (0, surrogates, > U+10FFFF → U+FFFD; 0x80-0x9F by the windows-1252 table), the
  longest named match, and a legacy name without ``;`` followed by ``=`` or an ASCII alphanumeric
  left as written (``?a=1&copy=2`` stays ``&copy=2``). CR and CRLF read as LF, NUL as U+FFFD.

Where a standard parse depends on the tree builder in ways this scan does not follow, the links
concerned carry a ``reason`` and are left untouched by the caller: links inside ``<select>`` (the
2025 parser change and older parsers disagree), and everything after markup whose meaning depends on
a state the scan cannot know for sure (a raw-text element or CDATA after ``<svg>``/``<math>``
content the scan lost track of, inside ``<select>``, a ``<noscript>`` read two ways, ``<frameset>``).

Links inside ``<svg>``/``<math>`` (an SVG ``<a href>`` is a link too) are found and wrapped while the
scan is sure of the foreign content's extent; the differential test (tests/test_html_scan_standard.py)
checks all of this against html5lib.

Linear time: every character is consumed once, the regular expressions are possessive (no
backtracking into another reading), and text, uninteresting tags and comments are skipped inside
the regex engine, one step per interesting tag; a link's first ``href`` is found by one regex.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from html.entities import html5 as _ENTITIES

_F = re.I | re.A
_WS = "\t\n\f\r "
_W, _NW = r"[\t\n\f\r ]", r"\t\n\f\r "
# The attribute area of a tag, as the tokenizer's attribute states read it (before/after attribute
# name, attribute name, before attribute value, the three value states, self-closing start tag):
# each attribute with the whitespace or '/' before it, then what is left before '>'. Possessive
# throughout, so it matches one way only; a quoted value left open runs to the end of the text,
# where '>' then fails, as the standard drops a tag still open at the end.
_ATTRS = (rf"(?:[{_NW}/]*+[^{_NW}/>][^{_NW}/>=]*+{_W}*+"
          rf"(?:={_W}*+(?:\"[^\"]*+(?:\"|\Z)|'[^']*+(?:'|\Z)|[^{_NW}>\"'][^{_NW}>]*+)?+)?+)*+[{_NW}/]*+")
_TAG = re.compile(r"<(/?+)([A-Za-z][^\t\n\f\r />]*+)(" + _ATTRS + ")>")
# One attribute (groups: name, then the value: double-quoted, single-quoted, unquoted, missing).
_ATTR = re.compile(rf"[{_NW}/]*+([^{_NW}/>][^{_NW}/>=]*+)"
                   rf"(?>{_W}*+(?:={_W}*+(?>\"([^\"]*+)\"|'([^']*+)'|([^{_NW}>\"'][^{_NW}>]*+)|(?=>()))|(?!=)))")


def _first_attr(name: str) -> re.Pattern:
    """A regex matching a tag's attribute area up to and including its first attribute ``name``
    (groups as _ATTR's); the attributes before it are skipped inside the regex engine."""
    value = rf"(?:={_W}*+(?:\"[^\"]*+\"|'[^']*+'|[^{_NW}>\"'][^{_NW}>]*+)?+)?+"
    return re.compile(rf"(?:[{_NW}/]*+(?!{name}[{_NW}/>=])[^{_NW}/>][^{_NW}/>=]*+{_W}*+{value})*+[{_NW}/]*+"
                      rf"({name})(?>{_W}*+(?:={_W}*+(?>\"([^\"]*+)\"|'([^']*+)'|([^{_NW}>\"'][^{_NW}>]*+)|(?=>()))"
                      r"|(?!=)))", _F)


_HREF = _first_attr("href")
_SRC = _first_attr("src")

_RAW = ("script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes", "noscript", "plaintext")
_INTERESTING = ("a", "area", "img", "body", "svg", "math", "select", "frameset", "template") + _RAW
# One step of the scan: runs of text and of uninteresting tags (each tokenized to its real end) are
# skipped inside the regex engine, up to an interesting tag (matched too; groups: '/', name,
# attribute area), other markup the caller handles, or the end. In HTML content, comments (every
# form: '<!-->', '<!--->', '-->', '--!>'), bogus comments, DOCTYPE and CDATA (a bogus comment
# there) are skipped too; in foreign content every tag is interesting.
_TEXT = r"[^<]++|<(?![A-Za-z/!?])"
_OTHER_TAG = r"</?+(?!(?:" + "|".join(_INTERESTING) + rf")[{_NW}/>])[A-Za-z][^{_NW}/>]*+(?:>|" + _ATTRS + ">)"
_DECLARATIONS = (r"<!--(?:-?>|(?:[^-]++|-(?!-!?>))*+(?:--!?>|\Z))|<!(?!--)[^>]*+(?:>|\Z)|<\?[^>]*+(?:>|\Z)"
                 r"|</(?![A-Za-z>])[^>]++(?:>|\Z)|</>")
_TAG_AFTER = rf"(?:<(/?+)([A-Za-z][^{_NW}/>]*+)(" + _ATTRS + ")>)?"
_STEP_HTML = re.compile(rf"(?:{_TEXT}|{_OTHER_TAG}|{_DECLARATIONS})*+" + _TAG_AFTER, _F)
_STEP_UNSURE = re.compile(rf"(?:{_TEXT}|{_OTHER_TAG})*+" + _TAG_AFTER, _F)
_STEP_FOREIGN = re.compile(rf"(?:{_TEXT})*+" + _TAG_AFTER)
_COMMENT_CLOSE = re.compile(r"--!?>")
_RAW_CLOSE = {name: re.compile(rf"</{name}[\t\n\f\r />]", _F) for name in _RAW}
_SCRIPT_DATA = re.compile(r"<!--|</script[\t\n\f\r />]", _F)
_SCRIPT_ESCAPED = re.compile(r"-->|</?script[\t\n\f\r />]", _F)
_SCRIPT_DOUBLE = re.compile(r"-->|</script[\t\n\f\r />]", _F)

# Tree construction in foreign content: start tags that leave it, and integration points whose
# content is parsed as HTML.
_BREAKOUT = frozenset("b big blockquote body br center code dd div dl dt em embed h1 h2 h3 h4 h5 h6 head hr i "
                      "img li listing menu meta nobr ol p pre ruby s small span strong strike sub sup table tt "
                      "u ul var".split())
_INTEGRATION = frozenset("foreignobject desc title mi mo mn ms mtext annotation-xml".split())

_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

#: Attributes that opt a link out of click tracking (removed from the delivered copy).
OPT_OUT = {"data-notrack", "clicktracking", "disable-tracking", "data-pm-no-track", "ses:no-track"}
assert all("track" in name for name in OPT_OUT)  # _link's quick test before it reads every attribute

#: Why a link is left untouched (Result.skipped carries these).
IN_SELECT = "html: link inside <select>, which parsers read differently"
AMBIGUOUS = "html: link after markup that parsers may read differently"

_URLISH = re.compile(r"^(?:(?:https?|ftp)://|www\.)\S+$|^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9-]+)*"
                     r"\.[a-z]{2,63}(?:[/:?#]\S*)?$", re.IGNORECASE)
# Comments, raw-text elements and tags, each consumed to its end (or the end of the text when it
# is unterminated) in one linear pass.
_INVISIBLE = re.compile(r"<!--.*?(?:-->|\Z)|<(script|style|title)\b.*?(?:</\1\s*>|\Z)|<[A-Za-z/!?][^<>]*>",
                        re.S | re.I)


@dataclass(slots=True)
class Attr:
    name: str  # ASCII lower-case
    start: int  # span of the whole attribute (name=value) in the text
    end: int
    value: str | None  # raw (entity-encoded) value; "" for a name without a value
    value_start: int = -1  # span of the value inside its quotes
    value_end: int = -1


@dataclass(slots=True)
class Link:
    tag_start: int
    href: Attr
    target: str  # the decoded href as a browser's URL parser takes it (outer C0/space, tab, LF removed)
    opt_out: list[Attr] = field(default_factory=list)
    text_start: int = -1  # span of the link's content (for <a>), to read its visible text
    text_end: int = -1
    tag: str = "a"  # "a" or "area"
    value: str = ""  # the decoded attribute value, exactly as the tokenizer produces it
    reason: str | None = None  # set: leave the link untouched, for this reason


@dataclass
class Scan:
    body_open_end: int | None = None  # offset just after the first <body ...>
    body_close_start: int | None = None  # offset of the last </body>
    links: list[Link] = field(default_factory=list)
    old_pixels: list[tuple[int, int]] = field(default_factory=list)
    images: int = 0  # <img> other than our old pixels
    ambiguous_from: int | None = None  # offset from which every link is left untouched (AMBIGUOUS)


# --- character references in attribute values ----------------------------------------------------

_CHARREF = re.compile(r"&(?:#(?:[xX]([0-9A-Fa-f]+)|([0-9]+));?|([A-Za-z][A-Za-z0-9]*;?))")
_C1 = {}
for _n in range(0x80, 0xA0):
    try:
        _C1[_n] = bytes([_n]).decode("cp1252")
    except UnicodeDecodeError:
        pass  # 0x81, 0x8D, 0x8F, 0x90, 0x9D: kept as the code point
_LONGEST_ENTITY = max(map(len, _ENTITIES))


def _numeric(digits: str, base: int) -> str:
    digits = digits.lstrip("0")
    n = 0x110000 if len(digits) > 8 else int(digits or "0", base)
    if n == 0 or n > 0x10FFFF or 0xD800 <= n <= 0xDFFF:
        return "\ufffd"
    return _C1.get(n) or chr(n)


def _ref(mt: re.Match) -> str:
    cand = mt.group(3)
    if cand is None:
        return _numeric(mt.group(1), 16) if mt.group(1) is not None else _numeric(mt.group(2), 10)
    if cand[-1] == ";" and cand in _ENTITIES:
        return _ENTITIES[cand]
    k = len(cand) if len(cand) < _LONGEST_ENTITY else _LONGEST_ENTITY
    while k:
        name = cand[:k]
        if name in _ENTITIES:
            break
        k -= 1
    else:
        return mt.group(0)  # no such reference: kept as written
    if not name.endswith(";"):
        nxt = cand[k] if k < len(cand) else mt.string[mt.end():mt.end() + 1]
        if nxt == "=" or (nxt.isascii() and nxt.isalnum()):
            return mt.group(0)  # a legacy name without ';' before '=' or alphanumeric: as written
    return _ENTITIES[name] + cand[k:]


def decode_attribute(raw: str) -> str:
    """An attribute value as the tokenizer produces it from its source text."""
    if "\r" in raw:
        raw = raw.replace("\r\n", "\n").replace("\r", "\n")
    if "\0" in raw:
        raw = raw.replace("\0", "\ufffd")
    if "&" not in raw:
        return raw
    if raw.count("&") == raw.count("&amp;"):
        return raw.replace("&amp;", "&")
    return _CHARREF.sub(_ref, raw)


_URL_STRIP = "".join(map(chr, range(0x21)))
_URL_TAB_NL = re.compile(r"[\t\n\r]")


def url_of(value: str) -> str:
    """What a browser's URL parser takes from an href value (before resolving it)."""
    if value and value[0] > " " and value[-1] > " " and "\t" not in value and "\n" not in value \
            and "\r" not in value:
        return value
    return _URL_TAB_NL.sub("", value).strip(_URL_STRIP)


# --- the scan --------------------------------------------------------------------------------------

def _attrs(text: str, start: int, end: int) -> list[Attr]:
    """Every attribute of a tag whose attribute area is text[start:end] (end: just before '>')."""
    out = []
    for mt in _ATTR.finditer(text, start, end + 1):
        g = mt.lastindex  # the value's group (2-5: double, single quoted, unquoted, missing), or 1
        if g > 1:
            out.append(Attr(mt.group(1).translate(_LOWER), mt.start(1), mt.end(), mt.group(g), mt.start(g), mt.end(g)))
        else:
            e = mt.end(1)
            out.append(Attr(mt.group(1).translate(_LOWER), mt.start(1), e, "", e, e))
    return out


def _self_closing(text: str, start: int, end: int) -> bool:
    """A tag's attribute area text[start:end] ends with the self-closing '/'."""
    if end <= start or text[end - 1] != "/":
        return False
    last = None
    for last in _ATTR.finditer(text, start, end + 1):
        pass
    return last is None or last.end() < end  # the '/' is not the end of an unquoted value


def _opted_out(a: Attr) -> bool:
    if a.name not in OPT_OUT:
        return False
    value = decode_attribute(a.value or "").strip(_WS).lower()
    if a.name == "clicktracking":
        return value == "off"
    if a.name == "disable-tracking":
        return value in ("", "true", "1", "yes")
    return True


def _script_end(text: str, pos: int) -> int:
    """Offset of the '</script' that ends script data starting at pos (len(text) if none)."""
    state = 0  # script data, escaped, double escaped
    while True:
        if state == 0:
            mt = _SCRIPT_DATA.search(text, pos)
            if mt is None:
                return len(text)
            if mt.group(0)[1] == "/":
                return mt.start()
            state, pos = 1, mt.start() + 2  # '<!--': its dashes count towards a '-->'
        elif state == 1:
            mt = _SCRIPT_ESCAPED.search(text, pos)
            if mt is None:
                return len(text)
            g = mt.group(0)
            if g == "-->":
                state = 0
            elif g[1] == "/":
                return mt.start()
            else:
                state = 2
            pos = mt.end()
        else:
            mt = _SCRIPT_DOUBLE.search(text, pos)
            if mt is None:
                return len(text)
            state = 0 if mt.group(0) == "-->" else 1
            pos = mt.end()


def _comment_end(text: str, lt: int) -> int:
    """End offset of the comment whose '<!--' is at lt."""
    p = lt + 4
    if text.startswith(">", p):
        return p + 1
    if text.startswith("->", p):
        return p + 2
    mt = _COMMENT_CLOSE.search(text, p)
    return len(text) if mt is None else mt.end()


_HTML, _FOREIGN, _UNSURE = 0, 1, 2


def scan(text: str, pixel_prefix: str) -> Scan:
    """Scan ``text``; ``pixel_prefix`` is ``{public_url}/o/`` (old pixels of ours to remove)."""
    s = Scan()
    n = len(text)
    pos = 0
    mode = _HTML  # _FOREIGN: inside <svg>/<math>, tracked; _UNSURE: lost track of foreign content
    foreign: list[str] = []  # the open foreign elements (lower-case names)
    in_select = False
    templates = 0  # open <template> elements: a <body> tag inside one is ignored
    noscript_end: int | None = None  # where a scripting browser ends the open <noscript>
    open_link: Link | None = None

    def ambiguous(at: int) -> None:
        if s.ambiguous_from is None:
            s.ambiguous_from = at

    while True:
        mt = (_STEP_HTML if mode == _HTML else _STEP_FOREIGN if mode == _FOREIGN else _STEP_UNSURE).match(text, pos)
        raw_name = mt.group(2)
        if raw_name is None:  # no tag here: other markup, a tag left open at the end, or the end
            pos = mt.end()
            if noscript_end is not None and pos > noscript_end:
                ambiguous(noscript_end)
                noscript_end = None
            if pos >= n:
                break
            c = text[pos + 1] if pos + 1 < n else ""
            if c == "!":
                if text.startswith("--", pos + 2):
                    pos = _comment_end(text, pos)
                    continue
                if mode != _HTML and text.startswith("[CDATA[", pos + 2):
                    if mode == _UNSURE:
                        ambiguous(pos)
                    end = text.find("]]>", pos + 9)
                    pos = n if end < 0 else end + 3
                    continue
                end = text.find(">", pos + 2)  # DOCTYPE, bogus comment, CDATA in HTML content
                pos = n if end < 0 else end + 1
            elif c == "?":
                end = text.find(">", pos + 2)  # bogus comment
                pos = n if end < 0 else end + 1
            elif c == "/":
                c = text[pos + 2] if pos + 2 < n else ""
                if c == "":
                    break  # '</' at the end: text
                if c.isascii() and c.isalpha():
                    break  # an end tag left open at the end: dropped, as the standard drops it
                if c == ">":
                    pos += 3  # '</>': nothing
                    continue
                end = text.find(">", pos + 2)  # bogus comment
                pos = n if end < 0 else end + 1
            elif c.isascii() and c.isalpha():
                break  # a start tag left open at the end: dropped, as the standard drops it
            else:
                pos += 1  # a '<' that is text
            continue

        lt = mt.start(1) - 1
        pos = end = mt.end()
        if noscript_end is not None and lt > noscript_end:
            ambiguous(noscript_end)
            noscript_end = None
        closing = mt.group(1)
        name = raw_name if raw_name.islower() else raw_name.translate(_LOWER)
        a_start, a_end = mt.start(3), mt.end(3)

        if mode == _FOREIGN:
            if closing:
                i = len(foreign) - 1 if name != "br" and name != "p" else -1
                while i >= 0 and foreign[i] != name:  # from the current node down (amortized linear)
                    i -= 1
                if i >= 0:
                    del foreign[i:]
                    if not foreign:
                        mode = _HTML
                else:  # handed to the HTML rules, which may or may not close the foreign elements
                    mode = _UNSURE
                    foreign.clear()
                if name == "a" and open_link is not None:
                    open_link.text_end = lt
                    open_link = None
                continue
            if foreign[-1] in _INTEGRATION:  # this start tag is parsed as HTML: lose track
                mode = _UNSURE
                foreign.clear()
            elif name in _BREAKOUT or (name == "font" and any(
                    a.name in ("color", "face", "size") for a in _attrs(text, a_start, a_end))):
                mode = _HTML
                foreign.clear()
            else:
                if not _self_closing(text, a_start, a_end):
                    foreign.append(name)
                if name == "a" or name == "area":
                    open_link = _link(s, text, lt, end, name, a_start, a_end, open_link, None)
                continue

        # HTML content (or _UNSURE: HTML, but maybe inside foreign content)
        if name == "a":
            if closing:
                if open_link is not None:
                    open_link.text_end = lt
                    open_link = None
            else:
                open_link = _link(s, text, lt, end, name, a_start, a_end, open_link,
                                  IN_SELECT if in_select else None)
        elif closing:
            if name == "body":
                if not templates:
                    s.body_close_start = lt
            elif name == "template":
                templates -= templates > 0
            elif name == "select":
                in_select = False
            elif name == "noscript" and noscript_end == lt:
                noscript_end = None
        elif name == "area":
            open_link = _link(s, text, lt, end, name, a_start, a_end, open_link, IN_SELECT if in_select else None)
        elif name == "img":
            src = _SRC.match(text, a_start, a_end + 1)
            if src is not None and url_of(decode_attribute(src.group(src.lastindex) if src.lastindex > 1 else "")
                                          ).startswith(pixel_prefix):
                s.old_pixels.append((lt, end))
            else:
                s.images += 1
        elif name == "body":
            if s.body_open_end is None and not templates:
                s.body_open_end = end
        elif name == "template":
            templates += 1
        elif name == "svg" or name == "math":
            if in_select:
                ambiguous(lt)
            if mode == _HTML and not _self_closing(text, a_start, a_end):
                mode = _FOREIGN
                foreign.append(name)
        elif name == "select":
            in_select = True
        elif name == "frameset":
            ambiguous(lt)
        elif name == "noscript":
            if mode == _UNSURE or in_select:
                ambiguous(lt)
            elif noscript_end is None:
                close = _RAW_CLOSE["noscript"].search(text, end)
                noscript_end = n if close is None else close.start()
        elif name in _RAW:
            if mode == _UNSURE or (in_select and name != "script"):
                ambiguous(lt)
            if name == "plaintext":
                break
            if name == "script":
                close = _script_end(text, end)
            else:
                close = _RAW_CLOSE[name].search(text, end)
                close = n if close is None else close.start()
            pos = close  # its end tag is tokenized next, as a tag (a <noscript> end inside: see above)
            if close < n:
                mt = _TAG.match(text, close)
                if mt is None:
                    break
                pos = mt.end()
    if open_link is not None:
        open_link.text_end = n
    if s.ambiguous_from is not None:
        for link in s.links:
            if link.tag_start >= s.ambiguous_from and link.reason is None:
                link.reason = AMBIGUOUS
    return s


def _link(s: Scan, text: str, lt: int, end: int, name: str, a_start: int, a_end: int,
          open_link: Link | None, reason: str | None) -> Link | None:
    """Record an <a>/<area> start tag; returns the <a> whose content is open after it."""
    if name == "a" and open_link is not None:  # an unclosed <a>: the new one closes it
        open_link.text_end = lt
        open_link = None
    hm = _HREF.match(text, a_start, a_end + 1)
    if hm is None:
        return open_link
    g = hm.lastindex
    if g > 1:
        href = Attr("href", hm.start(1), hm.end(), hm.group(g), hm.start(g), hm.end(g))
    else:
        e = hm.end(1)
        href = Attr("href", hm.start(1), e, "", e, e)
    opt_out = []
    if "track" in text[a_start:a_end].lower():  # every opt-out name has it; rare: read every attribute
        attrs = _attrs(text, a_start, a_end)
        seen: set[str] = set()
        for a in attrs:
            if a.name in OPT_OUT and a.name not in seen:
                seen.add(a.name)
                if _opted_out(a):  # the first of a name decides; every one of that name is removed
                    opt_out += [b for b in attrs if b.name == a.name]
    value = decode_attribute(href.value)
    if name == "a":
        link = Link(lt, href, url_of(value), opt_out, end, -1, name, value, reason)
        s.links.append(link)
        return link
    s.links.append(Link(lt, href, url_of(value), opt_out, -1, -1, name, value, reason))
    return open_link


def visible_text(fragment: str) -> str:
    """The text a reader sees in a piece of HTML (tags and comments removed, entities decoded)."""
    return html.unescape(_INVISIBLE.sub("", fragment)).replace("\xa0", " ").strip()


#: Text up to the last character after which no character reference of ``html.unescape`` goes on
#: (its named form never holds one of them, ';' ends it): text cut there unescapes as its two
#: halves would.
_UP_TO_REF_END = re.compile(r".*[\t\n\f <;]", re.S)


def has_visible_content(text: str, sc: Scan) -> bool:
    """``bool(visible_text(body))``, mostly without reading the whole body: the text outside the
    invisible pieces is gathered in order and, after a stretch that is not blank, what it holds up
    to where no character reference can go on (``_UP_TO_REF_END``) is unescaped alone — if that
    shows, so does the whole (the rest only adds). Tested again only as it doubles (linear)."""
    if sc.images:
        return True
    body = text[sc.body_open_end or 0: sc.body_close_start if sc.body_close_start is not None else len(text)]
    pieces: list[str] = []
    pos = length = tested = 0
    for mt in _INVISIBLE.finditer(body):
        start = mt.start()
        if start > pos:
            gap = body[pos:start]
            pieces.append(gap)
            length += len(gap)
            if length >= 2 * tested and not gap.isspace():
                tested = length
                head = _UP_TO_REF_END.match("".join(pieces))
                if head is not None and html.unescape(head.group()).replace("\xa0", " ").strip():
                    return True
        pos = mt.end()
    pieces.append(body[pos:])
    return bool(html.unescape("".join(pieces)).replace("\xa0", " ").strip())


def looks_like_url(text: str) -> bool:
    """Visible link text that is itself a URL or a domain (wrapping it would look like phishing)."""
    t = text.strip().strip("<>").strip()
    return bool(t) and " " not in t and bool(_URLISH.match(t))
