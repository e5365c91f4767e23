"""Per-recipient instrumentation: the open pixel and wrapped links, and nothing else.

A pure module: ``parse(raw)`` walks the MIME tree once (byte offsets, no re-serialization) and
scans each HTML body part; ``render(parsed, plan)`` then produces one recipient's copy by splicing
new ``href`` values, the pixel and the removals into the original text of those parts and the new
part bodies into the original bytes. Every other byte — other parts, headers, boundaries,
preambles — stays as it came. Anything unexpected (malformed MIME, bad base64, an unknown charset,
signed or encrypted mail) leaves the whole message untouched, with the reason in the result.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import quopri
import re
from dataclasses import dataclass, field
from email.message import Message as _HeaderParser
from typing import NamedTuple

from relay import message as m
from relay.html_scan import AMBIGUOUS, has_visible_content, looks_like_url, scan, visible_text
from core.links import Keyring, is_http_url, pixel_url, representable

MAX_DEPTH = 30
MAX_PARTS = 500


class Untouched(Exception):
    """The message is delivered as it came; str() says why."""


@dataclass(frozen=True)
class Plan:
    """What one recipient's copy gets."""

    token: str | None
    opens: bool
    clicks: bool
    public_url: str
    keyring: Keyring | None
    pixel_position: str = "top"
    skip_url_text_links: bool = True


class Candidate(NamedTuple):
    """A link that may be wrapped: its href value span, target, and what could still skip it.
    (A NamedTuple: a frozen dataclass's __init__ cost more than the rest of a link's preparation.)"""

    start: int
    end: int
    target: str
    target_b64: str
    url_text: bool  # its visible text is a URL or domain (skipped under skip_url_text_links)


@dataclass
class HtmlPart:
    headers_start: int  # the part's header block in the raw message
    body_start: int
    body_end: int
    cte: str
    charset: str
    text: str  # the decoded HTML
    visible: bool  # has visible content (else no pixel)
    candidates: list[Candidate]
    opt_out_removals: list[tuple[int, int]]  # attribute spans (with leading space), removed
    opt_out_links: int
    old_pixels: list[tuple[int, int]]
    top: int  # pixel offsets
    bottom: int
    untouched_links: list[str] = field(default_factory=list)  # why http links were left untouched
    #: Copies' templates by (clicks, skip_url_text_links, where the pixel goes): built by the second
    #: copy of that kind, so every further copy only signs its URLs and joins bytes.
    templates: dict = field(default_factory=dict, repr=False, compare=False)


_b64 = binascii.b2a_base64  # ``links.encode_target`` as _prepare spells it (fewer calls per link)


def _prepare(text: str, public_url: str, charset: str = "utf-8") -> tuple[
        bool, list[Candidate], list[tuple[int, int]], int, list[tuple[int, int]], int, int, list[str]]:
    """Everything a copy needs that does not depend on the recipient: computed once per message."""
    public = public_url.rstrip("/")
    sc = scan(text, f"{public}/o/")
    candidates, removals, opted, untouched = [], [], 0, []
    for link in sc.links:
        if link.reason is not None:  # the scan cannot be sure a browser reads this link the same way
            if is_http_url(link.target) and not link.target.startswith(public + "/"):
                untouched.append(link.reason)
            continue
        if link.opt_out:
            opted += 1
            for opt in link.opt_out:
                s = opt.start
                while s > 0 and text[s - 1] in " \t\r\n":
                    s -= 1
                removals.append((s, opt.end))
            continue
        if not is_http_url(link.target) or link.target.startswith(public + "/"):
            continue  # other schemes; ours already (quoted text): never wrapped twice
        why = representable(link.target, charset)
        if why is not None:  # no redirect could open what the link says: left as it is
            untouched.append(why)
            continue
        inner = text[link.text_start:link.text_end] if link.text_start >= 0 else ""
        url_text = "." in inner and looks_like_url(visible_text(inner))  # a URL or domain has a dot
        candidates.append(Candidate(link.href.value_start, link.href.value_end, link.target,
                                    _b64(link.target.encode("utf-8", "surrogatepass"), newline=False)
                                    .translate(_TO_URLSAFE).rstrip(b"=").decode("ascii"), url_text))
    if sc.ambiguous_from is not None and AMBIGUOUS not in untouched:
        untouched.append(AMBIGUOUS)  # said even when the links after it cannot be told apart
    top = sc.body_open_end if sc.body_open_end is not None else 0
    bottom = sc.body_close_start if sc.body_close_start is not None else len(text)
    return has_visible_content(text, sc), candidates, removals, opted, sc.old_pixels, top, bottom, untouched


@dataclass
class Parsed:
    raw: bytes
    parts: list[HtmlPart] = field(default_factory=list)
    untouched: str | None = None  # why the whole message stays as it came


@dataclass
class Result:
    data: bytes
    pixel: bool = False
    links: list[tuple[int, str]] = field(default_factory=list)  # (index, target) wrapped
    skipped: list[str] = field(default_factory=list)  # why links or the pixel were skipped
    note: str | None = None  # why nothing changed, when nothing did


def _content_type(fs: list[m.Field]) -> tuple[str, dict[str, str]]:
    value = m.get(fs, "content-type")
    if not value:
        return "text/plain", {}
    h = _HeaderParser()
    h["Content-Type"] = value
    ctype = h.get_content_type()
    params = {k.lower(): v for k, v in (h.get_params() or [])[1:]}
    return ctype, params


def _disposition(fs: list[m.Field]) -> str:
    value = m.get(fs, "content-disposition") or ""
    return value.split(";")[0].strip().lower()


def parse(raw: bytes, public_url: str) -> Parsed:
    """Locate and scan every HTML body part. Never raises."""
    parsed = Parsed(raw)
    try:
        if b"\x00" in raw:
            raise Untouched("NUL bytes")
        _walk(raw, 0, len(raw), parsed, depth=0, top=True, public_url=public_url)
    except Untouched as e:
        parsed.parts = []
        parsed.untouched = str(e)
    except Exception as e:  # fail open: anything unexpected leaves the message as it came
        parsed.parts = []
        parsed.untouched = f"parse error: {type(e).__name__}"
    if parsed.untouched is None and not parsed.parts:
        parsed.untouched = "no html part"
    return parsed


def _walk(raw: bytes, start: int, end: int, parsed: Parsed, depth: int, top: bool, public_url: str) -> None:
    if depth > MAX_DEPTH:
        raise Untouched("MIME nesting too deep")
    entity = raw[start:end]
    fs = m.fields(entity)
    body_off = m.header_end(entity)
    if not entity[:body_off].isascii():
        raise Untouched("8-bit headers")
    ctype, params = _content_type(fs)
    if ctype in ("multipart/signed", "multipart/encrypted") or ctype in (
            "application/pkcs7-mime", "application/x-pkcs7-mime"):
        raise Untouched(f"signed or encrypted ({ctype})")
    if ctype.startswith("multipart/"):
        boundary = params.get("boundary")
        if not boundary:
            raise Untouched("multipart without boundary")
        for s, e in _split_multipart(entity, body_off, boundary.encode("latin-1", "replace")):
            if len(parsed.parts) > MAX_PARTS:
                raise Untouched("too many parts")
            _walk(raw, start + s, start + e, parsed, depth + 1, False, public_url)
        return
    if ctype != "text/html" or _disposition(fs) == "attachment":
        return
    cte = (m.get(fs, "content-transfer-encoding") or "7bit").strip().lower()
    charset = (params.get("charset") or "us-ascii").strip().strip('"').lower()
    body = entity[body_off:]
    decoded = _decode_body(body, cte)
    try:
        codecs.lookup(charset)
    except LookupError:
        raise Untouched(f"unknown charset {charset}") from None
    try:
        text = decoded.decode(charset)
    except UnicodeDecodeError:
        if charset in ("us-ascii", "ascii"):
            try:
                text, charset = decoded.decode("utf-8"), "utf-8-as-ascii"
            except UnicodeDecodeError:
                raise Untouched(f"body is not {charset}") from None
        else:
            raise Untouched(f"body is not {charset}") from None
    parsed.parts.append(HtmlPart(start, start + body_off, end, cte, charset, text,
                                 *_prepare(text, public_url, "utf-8" if charset == "utf-8-as-ascii" else charset)))


def _split_multipart(entity: bytes, body_off: int, boundary: bytes) -> list[tuple[int, int]]:
    """Offsets (within entity) of each body part between the delimiters. Missing end → Untouched."""
    delim = re.compile(rb"(?:^|(?<=\r\n))--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r\n|$)")
    parts: list[tuple[int, int]] = []
    cur: int | None = None
    for mt in delim.finditer(entity, body_off):
        if cur is not None:
            # The CRLF before a delimiter belongs to the delimiter.
            end = mt.start() - 2 if entity[mt.start() - 2:mt.start()] == b"\r\n" else mt.start()
            parts.append((cur, max(cur, end)))
        if mt.group(1):
            return parts
        cur = mt.end()
    raise Untouched("missing end boundary")


def _decode_body(body: bytes, cte: str) -> bytes:
    if cte in ("7bit", "8bit", "binary", ""):
        return body
    if cte == "quoted-printable":
        return quopri.decodestring(body)
    if cte == "base64":
        compact = re.sub(rb"\s+", b"", body)
        try:
            return base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise Untouched("bad base64") from None
    raise Untouched(f"unknown transfer encoding {cte}")


def _encode_body(data: bytes, cte: str, tail: bytes) -> tuple[bytes, str]:
    """Encode a changed body like the original (``tail``: the CRLF it ended with, if it did);
    7bit/8bit with lines over 998 octets → QP."""
    if cte == "base64":
        enc = base64.encodebytes(data).replace(b"\n", b"\r\n")
        return (enc if tail else enc.rstrip(b"\r\n")), cte
    if cte == "quoted-printable":
        return _qp(data, tail), cte
    if len(data) > 998 and max(map(len, data.split(b"\r\n"))) > 998:
        return _qp(data, tail), "quoted-printable"
    return data, cte


def _qp(data: bytes, tail: bytes) -> bytes:
    """Quoted-printable that decodes to exactly ``data``: each CRLF stays a line break, a bare CR or
    LF is encoded (=0D, =0A), and every encoded line fits in 76 octets."""
    enc = b"\r\n".join(binascii.b2a_qp(line, quotetabs=False, istext=False).replace(b"\n", b"\r\n")
                        for line in data.split(b"\r\n"))
    if tail and not enc.endswith(b"\r\n"):
        enc += b"\r\n"
    return enc


def _pixel_tag(src: str) -> str:
    return (f'<img src="{src}" width="1" height="1" alt="" '
            f'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0" />')


#: Codecs that encode a string piece by piece to the same bytes as whole (no state, no BOM): a
#: copy's part is then joined from bytes encoded once per message.
_STATELESS = re.compile(r"(utf-8|ascii|latin-1|iso8859-\d+|cp\d+|koi8-[a-z]+|mac-[a-z]+|gb2312|gbk|gb18030|"
                        r"big5|big5hkscs|shift_jis|euc_jp|euc_kr|tis-620)$")
_LINK, _PIXEL = 0, 1


@dataclass
class _Template:
    """One part's copy as bytes between the per-recipient slots (a signed link, the pixel)."""

    segments: list[bytes]  # len(slots) + 1 pieces of the encoded part text
    slots: list[tuple]  # (_LINK, local index, target_b64) or (_PIXEL,)
    links: list[tuple[int, str]]  # (local index, target)
    skipped: list[str]
    cte: str  # the part's transfer encoding as it came
    charset: str
    #: For 7bit/8bit parts: the longest line without a slot, and each line with slots as (its
    #: length without them, the slots on it): a copy's longest line is then a sum, not a split.
    static_max: int = 0
    slot_lines: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    slot_worst: list[tuple[int, int]] = field(default_factory=list)  # (slots on a line, its longest length)
    #: Per first link index of the part: each slot's signed tail (``index.target_b64``), None for the pixel.
    tails: dict[int, list[bytes | None]] = field(default_factory=dict)


def _edits(part: HtmlPart, clicks: bool, skip_url_text: bool, pixel_at: int | None):
    """The part's edits in the order the copy applies them; a slot stands where a value is per copy."""
    edits: list[tuple[int, int, object]] = [(a, b, "") for a, b in part.old_pixels]
    skipped: list[str] = []
    links: list[tuple[int, str]] = []
    if clicks:
        edits += [(a, b, "") for a, b in part.opt_out_removals]
        skipped += ["opt_out"] * part.opt_out_links
        skipped += part.untouched_links
        for c in part.candidates:
            if skip_url_text and c.url_text:
                skipped.append("url_text")
                continue
            edits.append((c.start, c.end, (_LINK, len(links), c.target_b64, c.target_b64.encode("ascii"))))
            links.append((len(links), c.target))
    if pixel_at is not None:
        edits.append((pixel_at, pixel_at, (_PIXEL,)))
    return edits, links, skipped


_PROBE = ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_./:?=&%#" +
          _pixel_tag("https://x/o/.gif"))
_compatible: dict[str, bool] = {}


def _ascii_compatible(charset: str, part: HtmlPart) -> bool:
    """Whether what a copy inserts (ASCII URLs, the pixel tag) encodes in ``charset`` to its ASCII
    bytes and the codec has no state (so the text may be encoded in pieces)."""
    ok = _compatible.get(charset)
    if ok is None:
        try:
            ok = (_STATELESS.match(codecs.lookup(charset).name) is not None
                  and _PROBE.encode(charset) == _PROBE.encode("ascii"))
        except (LookupError, UnicodeError):
            ok = False
        _compatible[charset] = ok
    return ok


def _measure_lines(t: _Template) -> None:
    if t.cte not in ("7bit", "8bit", "binary", ""):
        return
    length, on_line = 0, []
    for k, segment in enumerate(t.segments):
        lines = segment.split(b"\r\n")
        length += len(lines[0])
        if len(lines) > 1:
            if on_line:
                t.slot_lines.append((length, tuple(on_line)))
            else:
                t.static_max = max(t.static_max, length)
            t.static_max = max([t.static_max, *map(len, lines[1:-1])])
            length, on_line = len(lines[-1]), []
        if k < len(t.slots):
            on_line.append(k)
    if on_line:
        t.slot_lines.append((length, tuple(on_line)))
    else:
        t.static_max = max(t.static_max, length)
    worst: dict[int, int] = {}
    for length, on_line in t.slot_lines:
        worst[len(on_line)] = max(worst.get(len(on_line), 0), length)
    t.slot_worst = sorted(worst.items())


_UNSEEN, _SEEN = object(), object()


def _template(part: HtmlPart, clicks: bool, skip_url_text: bool, pixel_at: int | None) -> _Template | None:
    key = (clicks, skip_url_text, pixel_at)
    template = part.templates.get(key, _UNSEEN)
    if template is _UNSEEN:  # the first copy of its kind: most messages have only one
        part.templates[key] = _SEEN
        return None
    if template is not _SEEN:
        return template
    template = None
    charset = "utf-8" if part.charset == "utf-8-as-ascii" else part.charset
    if _ascii_compatible(charset, part):
        edits, links, skipped = _edits(part, clicks, skip_url_text, pixel_at)
        segments: list[bytes] = []
        slots: list[tuple] = []
        text, pos, pending = part.text, 0, []
        try:
            for a, b, new in sorted(edits, key=lambda e: (e[0], e[1])):
                if a < pos:  # overlapping edit (cannot happen with a sane scan): keep the first
                    continue
                pending.append(text[pos:a])
                if isinstance(new, tuple):
                    segments.append("".join(pending).encode(charset))
                    slots.append(new)
                    pending = []
                pos = b
            pending.append(text[pos:])
            segments.append("".join(pending).encode(charset))
            template = _Template(segments, slots, links, skipped, part.cte, charset)
            _measure_lines(template)
        except UnicodeError:
            template = None
    part.templates[key] = template
    return template


def render(parsed: Parsed, plan: Plan) -> Result:
    """One recipient's copy. Without a token, or when the message is untouched: the original.

    The second copy of a kind builds each part's template (its text encoded once, in pieces between
    the per-recipient values; the first is made the plain way, as most messages have one copy);
    every further copy then signs its own URLs and joins bytes."""
    if parsed.untouched is not None:
        return Result(parsed.raw, note=parsed.untouched)
    if not plan.token or not (plan.opens or plan.clicks) or plan.keyring is None:
        return Result(parsed.raw, note="not tracked")
    result = Result(parsed.raw)
    raw = memoryview(parsed.raw)
    pieces: list = []
    pos = 0
    pixel_done = False
    link_index = 0
    public = plan.public_url.rstrip("/")
    pixel_tag = signer = None
    for part in parsed.parts:
        pixel_at = None
        if plan.opens and not pixel_done and part.visible:
            pixel_at = part.bottom if plan.pixel_position == "bottom" else part.top
            pixel_done = True
        template = _template(part, plan.clicks, plan.skip_url_text_links, pixel_at)
        if template is None:  # the first copy, or a stateful charset: the text edited and encoded whole
            edits, links, skipped = _edits(part, plan.clicks, plan.skip_url_text_links, pixel_at)
            if not edits:
                result.skipped += skipped
                continue
            if signer is None and plan.clicks:
                signer = _Signer(plan, public)
            values = []
            signed = iter(signer.strings(edits, link_index)) if signer is not None else None
            for a, b, new in edits:
                if isinstance(new, tuple):
                    if new[0] == _LINK:
                        new = next(signed)
                    else:
                        new = _pixel_tag(pixel_url(public, plan.token))
                values.append((a, b, new))
            charset = "utf-8" if part.charset == "utf-8-as-ascii" else part.charset
            data = _apply(part.text, values).encode(charset)
        else:
            links, skipped = template.links, template.skipped
            if len(template.segments) == 1 and not (part.old_pixels or plan.clicks and part.opt_out_removals):
                result.skipped += skipped
                continue  # nothing to change in this part
            if pixel_at is not None and pixel_tag is None:
                pixel_tag = _pixel_tag(pixel_url(public, plan.token)).encode(template.charset)
            if signer is None and plan.clicks:
                signer = _Signer(plan, public)
            values = signer.fill(template, link_index, pixel_tag) if signer is not None else \
                [pixel_tag] * len(template.slots)
            out = [b""] * (2 * len(values) + 1)
            out[::2] = template.segments
            out[1::2] = values
            data = b"".join(out)
            if template.cte in ("7bit", "8bit", "binary", ""):
                widest = max(map(len, values), default=0)
                long = template.static_max > 998 or any(  # a bound first, the exact sum only if it fails
                    length + n * widest > 998 for n, length in template.slot_worst) and any(
                    length + sum(len(values[k]) for k in on_line) > 998 for length, on_line in template.slot_lines)
                result.skipped += skipped
                result.links += [(link_index + i, target) for i, target in links]
                link_index += len(links)
                body, cte = (_qp(data, _tail(parsed.raw, part)), "quoted-printable") if long else (data, part.cte)
                pieces.append(raw[pos:part.headers_start])
                head = parsed.raw[part.headers_start:part.body_start]
                pieces.append(_set_cte(head, cte) if cte != part.cte else head)
                pieces.append(body)
                pos = part.body_end
                continue
        result.skipped += skipped
        result.links += [(link_index + i, target) for i, target in links]
        link_index += len(links)
        body, cte = _encode_body(data, part.cte, _tail(parsed.raw, part))
        pieces.append(raw[pos:part.headers_start])
        head = parsed.raw[part.headers_start:part.body_start]
        pieces.append(_set_cte(head, cte) if cte != part.cte else head)
        pieces.append(body)
        pos = part.body_end
    if plan.opens and not pixel_done:
        result.skipped.append("no visible html for the pixel")
    result.pixel = pixel_done
    if not pieces:
        result.note = "nothing to change"
        return result
    pieces.append(raw[pos:])
    result.data = b"".join(pieces)
    return result


def _tail(raw: bytes, part: HtmlPart) -> bytes:
    return b"\r\n" if raw.endswith(b"\r\n", part.body_start, part.body_end) else b""


class _Signer:
    """``links.signed_click`` for one copy, as bytes: the HMAC's inner state after the key id and
    the token is computed once per copy, so each link hashes only its index and target."""

    def __init__(self, plan: Plan, public: str):
        kid = plan.keyring.signing_id
        self.inner, self.outer = plan.keyring.pads[kid]
        self.head = f"{kid}.{plan.token}.".encode("ascii")
        self.prefix = f"{public}/c/".encode("ascii") + self.head
        self.inner = self.inner.copy()
        self.inner.update(self.head)
        self.prefix_str = self.prefix.decode("ascii")

    def strings(self, edits: list[tuple], base: int) -> list[str]:
        """The plain path's signed URLs (str) of the link slots among ``edits``, in their order."""
        inner, outer = self.inner, self.outer
        tails, sigs = [], []
        for _, _, slot in edits:
            if slot.__class__ is tuple and slot[0] == _LINK:
                tail = f"{base + slot[1]}.{slot[2]}"
                h = inner.copy()
                h.update(tail.encode("ascii"))
                o = outer.copy()
                o.update(h.digest())
                sigs.append(o.digest()[:16] + b"\0\0")
                tails.append(tail)
        if not sigs:
            return []
        encoded = binascii.b2a_base64(b"".join(sigs), newline=False).translate(_TO_URLSAFE).decode("ascii")
        prefix = self.prefix_str
        return [f"{prefix}{tail}.{encoded[24 * k:24 * k + 22]}" for k, tail in enumerate(tails)]

    def fill(self, template: _Template, base: int, pixel_tag: bytes | None) -> list[bytes]:
        """The values of a part's slots: each link signed (its index is ``base`` + its own), the pixel."""
        tails = template.tails.get(base)
        if tails is None:
            tails = template.tails[base] = [b"%d.%s" % (base + slot[1], slot[3]) if slot[0] == _LINK else None
                                            for slot in template.slots]
        inner, outer, prefix = self.inner, self.outer, self.prefix
        sigs = bytearray()
        for rest in tails:
            if rest is not None:
                h = inner.copy()
                h.update(rest)
                o = outer.copy()
                o.update(h.digest())
                sigs += o.digest()[:16]
                sigs += b"\0\0"
        # One base64 pass for all of them: each MAC's 16 octets and two zero octets are 24
        # characters (a multiple of 3 octets, so the MACs do not run into each other), of which
        # the first 22 are the MAC's own unpadded base64 (the zeros fill its last character's
        # low bits as padding would).
        encoded = binascii.b2a_base64(sigs, newline=False).translate(_TO_URLSAFE) if sigs else b""
        k = -24
        return [pixel_tag if rest is None else b"%b%b.%b" % (prefix, rest, encoded[(k := k + 24):k + 22])
                for rest in tails]


_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _apply(text: str, edits: list[tuple[int, int, str]]) -> str:
    out = []
    pos = 0
    for a, b, new in sorted(edits, key=lambda e: (e[0], e[1])):
        if a < pos:  # overlapping edit (cannot happen with a sane scan): keep the first
            continue
        out.append(text[pos:a])
        out.append(new)
        pos = b
    out.append(text[pos:])
    return "".join(out)


def _set_cte(head: bytes, cte: str) -> bytes:
    line = f"Content-Transfer-Encoding: {cte}".encode()
    fs = m.fields(head)
    for f in fs:
        if f.name == "content-transfer-encoding":
            return head[:f.start] + line + b"\r\n" + head[f.end:]
    return m.insert_after_head(head, line)
