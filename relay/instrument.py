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

from relay import message as m
from relay.html_scan import AMBIGUOUS, has_visible_content, looks_like_url, scan, visible_text
from trackrelay.links import Keyring, encode_target, is_http_url, pixel_url, representable, signed_click

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


@dataclass(frozen=True)
class Candidate:
    """A link that may be wrapped: its href value span, target, and what could still skip it."""

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
                                    encode_target(link.target), url_text))
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


def _encode_body(data: bytes, cte: str, original: bytes) -> tuple[bytes, str]:
    """Encode a changed body like the original; 7bit/8bit with lines over 998 octets → QP."""
    tail = b"\r\n" if original.endswith(b"\r\n") else b""
    if cte == "base64":
        enc = base64.encodebytes(data).replace(b"\n", b"\r\n")
        return (enc if tail else enc.rstrip(b"\r\n")), cte
    if cte == "quoted-printable":
        return _qp(data, tail), cte
    if any(len(line) > 998 for line in data.split(b"\r\n")):
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


def render(parsed: Parsed, plan: Plan) -> Result:
    """One recipient's copy. Without a token, or when the message is untouched: the original."""
    if parsed.untouched is not None:
        return Result(parsed.raw, note=parsed.untouched)
    if not plan.token or not (plan.opens or plan.clicks) or plan.keyring is None:
        return Result(parsed.raw, note="not tracked")
    result = Result(parsed.raw)
    pieces: list[bytes] = []
    pos = 0
    pixel_done = False
    link_index = 0
    public = plan.public_url.rstrip("/")
    for part in parsed.parts:
        edits: list[tuple[int, int, str]] = [(a, b, "") for a, b in part.old_pixels]
        if plan.clicks:
            edits += [(a, b, "") for a, b in part.opt_out_removals]
            result.skipped += ["opt_out"] * part.opt_out_links
            result.skipped += part.untouched_links
            for c in part.candidates:
                if plan.skip_url_text_links and c.url_text:
                    result.skipped.append("url_text")
                    continue
                edits.append((c.start, c.end, signed_click(public, plan.keyring, plan.token, link_index,
                                                           c.target_b64)))
                result.links.append((link_index, c.target))
                link_index += 1
        if plan.opens and not pixel_done and part.visible:
            at = part.bottom if plan.pixel_position == "bottom" else part.top
            edits.append((at, at, _pixel_tag(pixel_url(public, plan.token))))
            pixel_done = True
        if not edits:
            continue
        text = _apply(part.text, edits)
        charset = "utf-8" if part.charset == "utf-8-as-ascii" else part.charset
        data = text.encode(charset)
        original_body = parsed.raw[part.body_start:part.body_end]
        body, cte = _encode_body(data, part.cte, original_body)
        pieces.append(parsed.raw[pos:part.headers_start])
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
    pieces.append(parsed.raw[pos:])
    result.data = b"".join(pieces)
    return result


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
