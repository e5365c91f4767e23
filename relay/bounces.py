"""Bounces as mail servers really send them: which recipients failed, permanently or not, with
what status and diagnostic, and which original message it was about. Pure: bytes in, a
``Bounce`` (or None: not a bounce) out; never raises.

Recognised, in this order:

- standard DSNs (RFC 3464 ``message/delivery-status``, RFC 6533
  ``message/global-delivery-status``) anywhere in the message — directly in a
  ``multipart/report``, nested, or inside a bounce forwarded as an attachment. ``Action: failed``
  (with or without a comment) is permanent, ``delayed`` temporary; ``Original-Recipient`` and
  ``Final-Recipient`` are both kept as candidates (an aliased recipient is named by the first);
- Exim's ``X-Failed-Recipients``;
- the plain-text notices of qmail (QSBMF), Exim, Postfix, Sendmail/Proofpoint, Gmail and
  Google Groups, Yahoo, Exchange/Microsoft 365, Mimecast, Amazon SES and the generic "could not
  be delivered" texts: the failed addresses are read from the notice (never from the returned
  copy of the original), each with the status code and diagnostic text that follow it.

Our per-copy references (``X-Trackrelay-Ref``) found in the returned original are reported too,
unverified (``Bounce.refs``). The heuristics are our own (learnt from what those servers document and send; GNU Mailman's
flufl.bounce is the reference the tests compare with). Matching a bounce to one of our messages
and recipients is the inbound listener's job: this module only reports what the bounce says.
"""

from __future__ import annotations

import base64
import binascii
import email
import html
import logging
import quopri
import re
from dataclasses import dataclass
from email import policy as email_policy
from email.message import Message
from email.utils import getaddresses

from core.mailaddr import is_system as is_system_address

log = logging.getLogger("trackrelay.bounces")

_MAX_DEPTH = 6
_MAX_FAILURES = 200
_MAX_DIAGNOSTIC = 500
#: A notice is short (an HTML NDR is some tens of KB): what is read of each text part, and in all.
_MAX_PART_TEXT = 128 * 1024
_MAX_NOTICE_TEXT = 256 * 1024


@dataclass(frozen=True)
class Failure:
    #: The addresses the bounce names for this recipient, best first (Original-Recipient before
    #: Final-Recipient; an address as written before its decoded forms).
    addresses: tuple[str, ...]
    permanent: bool
    status: str | None  # RFC 3463 enhanced code, e.g. "5.1.1"
    diagnostic: str | None

    @property
    def address(self) -> str:
        return self.addresses[0]


@dataclass(frozen=True)
class Bounce:
    #: Which kind of notice it was: "dsn", "exim", "qmail", "postfix", "sendmail", "gmail",
    #: "yahoo", "microsoft", "mimecast", "proofpoint", "ses" or "generic".
    format: str
    failures: tuple[Failure, ...]
    #: Message-IDs of the original message the bounce is about, without angle brackets.
    message_ids: tuple[str, ...]
    #: What looks like our per-copy reference (``relay.reference``, unverified) in the returned
    #: original: its headers as a part or as quoted text, or the notice.
    refs: tuple[str, ...] = ()


# -- addresses ---------------------------------------------------------------------------------

_ATOM = r"[\w!#$%&'*+/=?^`{|}~-]"
_ADDR = re.compile(
    r"(?<![\w.!#$%&'*+/=?^`{|}~@-])"
    r"(\"(?:[^\"\\\r\n]|\\.){1,64}\"|" + _ATOM + r"(?:" + _ATOM + r"|\.(?=" + _ATOM + r"|\.)){0,63})"
    r"@((?:[\w-]{1,63}\.)+[\w-]{2,63})(?![\w-]|\.[\w-])")


def _decode_unicode_escapes(value: str) -> str:
    """RFC 6533's embedded Unicode (``\\x{HHHH}``) in a utf-8 address type of a non-global DSN."""
    def one(m: re.Match) -> str:
        try:
            return chr(int(m.group(1), 16))
        except (ValueError, OverflowError):
            return m.group(0)
    return re.sub(r"\\x\{([0-9A-Fa-f]{1,6})\}", one, value)


def _decode_xtext(value: str) -> str:
    """RFC 3461 xtext (``+2B`` for ``+``): some MTAs copy ORCPT into Original-Recipient encoded."""
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


def _recipient_field(value: str) -> list[str]:
    """``rfc822; addr`` / ``utf-8; addr`` / ``<addr>`` → the address and its decoded forms."""
    value = value.strip()
    kind, sep, rest = value.partition(";")
    if sep and "@" not in kind:
        value = rest.strip()
    value = re.sub(r"\s*\([^()]*\)\s*$", "", value).strip()  # a trailing comment
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    out = [_decode_unicode_escapes(value), value, _decode_xtext(value)]
    out = list(dict.fromkeys(out))
    return [a for a in out if "@" in a and len(a) <= 998]


# -- the MIME tree -----------------------------------------------------------------------------

def _header(msg: Message, name: str) -> str:
    try:
        value = msg.get(name)
    except Exception:
        return ""
    if value is None:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(str(value))))
    except Exception:
        return str(value)


def _sub_message(part: Message) -> Message | None:
    """The message inside a message/rfc822 (or message/global) part."""
    if part.get_content_type() not in ("message/rfc822", "message/global"):
        return None
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return payload[0]
    if isinstance(payload, str) and payload.strip():
        try:
            return email.message_from_string(payload, policy=email_policy.compat32)
        except Exception:
            return None
    return None


def _charset(part: Message) -> str:
    try:
        cs = part.get_content_charset() or "utf-8"
        "".encode(cs)
        return cs
    except (LookupError, Exception):
        return "utf-8"


def _decoded(part: Message) -> bytes:
    """A leaf part's content, transfer-decoded, 8-bit bytes as they came."""
    if not isinstance(part.get_payload(), str):
        return b""
    try:
        data = part.get_payload(decode=True)
    except Exception:
        return b""
    return data if isinstance(data, bytes) else b""


def _text_of(part: Message) -> str:
    text = _decoded(part).decode(_charset(part), "replace").replace("\r\n", "\n")
    if part.get_content_type() == "text/html":
        text = _html_to_text(text)
    return text


def _html_to_text(markup: str) -> str:
    markup = re.sub(r"(?is)<(script|style|head)\b.*?</\1\s*>", " ", markup)
    markup = re.sub(r"(?i)<br\s*/?>|</(p|div|tr|li|h\d|table|td)\s*>", "\n", markup)
    markup = re.sub(r"(?s)<[^>]*>", " ", markup)
    return html.unescape(markup)


_BOUNCE_SUBJECT = re.compile(
    r"^\s*(?:(?:fwd?|fw|wg|tr|rv|enc|doorst|vs|vb)\s*:\s*)*\[?\s*(?:"
    r"undeliver(?:ed|able)|undelivered mail|mail delivery (?:failed|failure|system)|delivery (?:status )?notification|"
    r"delivery (?:failure|failed|has failed|report|problem|delayed)|returned mail|failure notice|"
    r"mail system error|non[- ]?deliver(?:able|y)|message (?:delivery )?(?:failure|not delivered|undeliverable)|"
    r"warning: (?:could not send|message .* delayed|delayed)|delayed mail|delivery delay|"
    r"nicht zustellbar|unzustellbar|non recapitabile|non remis|non distribu|onbestelbaar|"
    r"no se puede entregar|no entregado|mimecast .*(?:rejection|undeliver)|"
    r"(?:mail|message) (?:could not be|was not) delivered|returned to sender|rejected:)", re.I)
_REPORT_TYPES = ("message/delivery-status", "message/global-delivery-status")


def _looks_like_bounce(msg: Message) -> bool:
    """A message that a mail system sent about another (by its sender, subject or form)."""
    if msg.get_content_type() == "multipart/report" and \
            str(msg.get_param("report-type") or "").lower() in ("delivery-status", "global-delivery-status"):
        return True
    if msg.get("X-Failed-Recipients"):
        return True
    senders = [a for _, a in getaddresses([_header(msg, "From"), _header(msg, "Sender")]) if a]
    if any(is_system_address(a) for a in senders) or re.search(r"mail delivery (subsystem|system)",
                                                               _header(msg, "From"), re.I):
        return True
    return bool(_BOUNCE_SUBJECT.match(_header(msg, "Subject")))


@dataclass
class _Walk:
    reports: list[Message]
    notices: list[str]  # notification texts (the original's copy left out)
    subjects: list[str]
    containers: list[Message]  # the bounce messages themselves (top, forwarded ones)
    originals: list[Message]  # returned originals (message/rfc822 that is not a bounce)
    header_texts: list[str]  # text/rfc822-headers parts


def _walk(top: Message) -> _Walk:
    w = _Walk([], [], [], [top], [], [])

    def visit(m: Message, depth: int) -> None:
        if depth > _MAX_DEPTH:
            return
        ctype = m.get_content_type()
        if ctype in _REPORT_TYPES:
            w.reports.append(m)
            return
        if ctype in ("text/rfc822-headers", "message/global-headers"):
            w.header_texts.append(_text_of(m))
            return
        inner = _sub_message(m)
        if inner is not None:
            if _looks_like_bounce(inner):
                w.containers.append(inner)
                w.subjects.append(_header(inner, "Subject"))
                visit(inner, depth + 1)
            else:
                w.originals.append(inner)
            return
        if m.is_multipart():
            payload = m.get_payload()
            for sub in payload if isinstance(payload, list) else []:
                if isinstance(sub, Message):
                    visit(sub, depth + 1)
            return
        if m.get_content_maintype() == "text" and ctype in ("text/plain", "text/html") and \
                str(m.get_content_disposition() or "") != "attachment":
            if sum(map(len, w.notices)) < _MAX_NOTICE_TEXT:
                w.notices.append(_text_of(m)[:_MAX_PART_TEXT])

    w.subjects.append(_header(top, "Subject"))
    visit(top, 0)
    return w


# -- standard DSNs -----------------------------------------------------------------------------

def _report_text(part: Message) -> str:
    """The text of a delivery-status part (its header blocks), transfer-decoded, as UTF-8."""
    payload = part.get_payload()
    if isinstance(payload, list):
        # The parser made one Message per block (message/delivery-status) or one message of it
        # all (message/global-delivery-status): put the text back together.
        blocks = []
        for block in payload:
            if isinstance(block, Message):
                lines = [f"{k}: {v}" for k, v in block.raw_items()]
                body = block.get_payload(decode=True) if isinstance(block.get_payload(), str) else b""
                if body and body.strip():
                    lines.append("")
                    lines.append(body.decode("ascii", "surrogateescape"))
                blocks.append("\n".join(lines))
        text = "\n\n".join(blocks)
    elif isinstance(payload, str):
        text = (part.get_payload(decode=True) or b"").decode("ascii", "surrogateescape")
        if str(part.get("Content-Transfer-Encoding", "")).strip().lower() in ("base64", "quoted-printable"):
            return text.encode("ascii", "surrogateescape").decode("utf-8", "replace")
    else:
        return ""
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    data = text.encode("utf-8", "surrogateescape")
    try:
        if cte == "base64":
            data = base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", data) + b"===")
        elif cte == "quoted-printable":
            data = quopri.decodestring(data)
    except (binascii.Error, ValueError):
        pass
    return data.decode("utf-8", "replace")


def _blocks(text: str) -> list[dict[str, str]]:
    out, cur, last = [], {}, None
    for line in re.split(r"\r\n|\r|\n", text):
        if not line.strip():
            if cur:
                out.append(cur)
            cur, last = {}, None
        elif line[:1] in (" ", "\t") and last:
            cur[last] += " " + line.strip()
        else:
            name, sep, value = line.partition(":")
            if sep and re.fullmatch(r"[A-Za-z0-9-]+", name.strip()):
                last = name.strip().lower()
                cur.setdefault(last, value.strip())
    if cur:
        out.append(cur)
    return out


_STATUS = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?!\.?\d)")
_BASIC = re.compile(r"(?:^|[\s#'(:\[])([45][0-5]\d)(?=[\s:-])")


def _status_in(text: str) -> str | None:
    found = _STATUS.search(text)
    if found:
        return found.group(1)
    basic = _BASIC.search(text)
    return f"{basic.group(1)[0]}.0.0" if basic else None


def _clean(text: str | None) -> str | None:
    if not text:
        return None
    text = re.sub(r"\s+", " ", text).strip()
    return text[:_MAX_DIAGNOSTIC] or None


def _dsn_failures(reports: list[Message]) -> tuple[list[Failure], bool]:
    """(failures, whether any per-recipient block was found)."""
    failures: list[Failure] = []
    any_block = False
    for part in reports:
        for block in _blocks(_report_text(part)):
            candidates: list[str] = []
            for name in ("original-recipient", "final-recipient", "x-actual-recipient"):
                for a in _recipient_field(block.get(name, "")):
                    if a not in candidates:
                        candidates.append(a)
            if not candidates:
                continue
            any_block = True
            action = re.sub(r"\([^()]*\)", " ", block.get("action", "")).strip().lower().split(" ")[0]
            status_found = _STATUS.search(block.get("status", ""))
            status = status_found.group(1) if status_found else None
            if action.startswith(("fail", "error", "bounce", "reject")):
                permanent = True
            elif action.startswith("delay"):
                permanent = False
            elif not action and status and status[0] in "45":
                permanent = status[0] == "5"
            else:
                continue  # delivered, relayed, expanded: not a failure
            diagnostic = block.get("diagnostic-code", "")
            kind, sep, rest = diagnostic.partition(";")
            if sep and re.fullmatch(r"\s*[A-Za-z0-9-]+\s*", kind):
                diagnostic = rest
            failures.append(Failure(tuple(candidates), permanent, status, _clean(diagnostic)))
    return failures, any_block


# -- the plain-text notices --------------------------------------------------------------------

#: (format, marker): the first that matches names the notice's format.
_FORMATS = [
    ("qmail", r"this is the qmail-send program|i'm afraid i wasn't able to deliver your message|"
              r"hi\. this is the (?:qmail|mta program|mail delivery)"),
    ("exim", r"this message was created automatically by mail delivery software"),
    ("postfix", r"this is the (?:postfix|mail system|bns postfix) program at|this is the mail system at host"),
    ("mimecast", r"mimecast"),
    ("proofpoint", r"proofpoint|pphosted"),
    ("sendmail", r"----- ?the following addresses had|the original message was received at|"
                 r"----- transcript of session follows -----"),
    ("gmail", r"\*\* (?:address not found|message not delivered|message blocked|delivery incomplete|"
              r"message delayed) \*\*|delivery to the following recipients? (?:failed permanently|has been delayed)|"
              r"your message wasn't delivered to|googlemail\.com|google groups"),
    ("yahoo", r"sorry, we were unable to deliver your message|message from yahoo\.|yahoo\.com"),
    ("microsoft", r"delivery has failed to these recipients|couldn't be delivered|diagnostic information for administrators|"
                  r"remote server returned|your message did not reach some or all of the intended recipients|"
                  r"the following recipient\(s\) cannot be reached|delivery to the following recipients (?:failed|has been delayed)"),
    ("ses", r"amazonses|the following message to .{1,300} was undeliverable"),
]
_FORMAT_RES = [(name, re.compile(marker, re.I)) for name, marker in _FORMATS]

#: Where the notice ends and the returned copy of the original begins.
_END = re.compile(
    r"^\s*(?:-{2,}\s*below this line is a copy of the message|-{2,} ?this is a copy of the message|"
    r"-{2,}\s*original message\b|original message headers:|-+\s*the header of the original message|"
    r"-{2,}\s*(?:returned|original) (?:mail|message) (?:follows|headers)|"
    r"-{2,} ?(?:start of )?returned message|the original message (?:headers are|follows|is) (?:included|attached|below)|"
    r"-{3,}\s*forwarded message|a copy of the original message|original message follows|"
    r"message headers follow|reporting-mta:)", re.I | re.M)

#: A notice of a delay (a temporary failure: the server is still trying).
_DELAY = re.compile(
    r"this is a warning (?:message )?only|you do not need to resend|has not yet been delivered|"
    r"has been delayed|delivery (?:has been|is|was) delayed|still being retried|will (?:be )?retried|"
    r"will (?:retry|continue trying|keep trying|try again)|delivery attempts will continue|"
    r"delivery incomplete|\*\* message delayed \*\*|still undelivered|transient non-fatal errors|"
    r"could not be delivered for more than|temporary (?:problem|failure) (?:delivering|occurred)|"
    r"^\s*(?:delayed mail|warning: (?:could not send message|message .* delayed))|"
    r"delivery status notification \(delay\)|delivery delayed", re.I | re.M)

#: A line that is a header of a quoted message, not part of the notice.
_HEADER_LINE = re.compile(r"^\s*>?\s*(?:from|to|cc|bcc|reply-to|sender|return-path|subject|date|message-id|"
                          r"in-reply-to|references|received|resent-[a-z-]+|x-[a-z0-9-]+|delivered-to|"
                          r"reporting-mta|generating server|envelope-to|authentication-results|dkim-signature)\s*:",
                          re.I)


def _notice_text(notices: list[str]) -> str:
    """The notices up to where the returned original begins: the first end marker with an
    address before it (a bounce forwarded inline starts with a "Forwarded message" line of its
    own, before the notice)."""
    parts = []
    for text in notices:
        end = next((m for m in _END.finditer(text) if _ADDR.search(text, 0, m.start())), None)
        parts.append(text[:end.start()] if end else text)
    return "\n".join(parts)


def _text_failures(text: str, exclude: set[str]) -> list[tuple[str, str]]:
    """(address, the text that follows it up to the next address) for each address in the notice."""
    lines = re.split(r"\r\n|\r|\n", text)
    found: list[tuple[str, list[str]]] = []
    index: dict[str, int] = {}
    current: int | None = None
    for line in lines:
        if _HEADER_LINE.match(line):
            current = None
            continue
        addrs = []
        for m in _ADDR.finditer(line):
            addr = m.group(0)
            if m.start() > 0 and line[m.start() - 1] in "/=?&" or "://" in line[max(0, m.start() - 60):m.start()]:
                continue  # inside a URL
            if addr.startswith("'") and line[m.end():m.end() + 1] == "'":
                addr = addr[1:]  # 'name@domain' as Exchange writes it
            if addr.lower() in exclude or is_system_address(addr):
                continue
            addrs.append(addr)
        if addrs:
            for addr in addrs:
                key = addr.lower()
                if key not in index:
                    index[key] = len(found)
                    found.append((addr, []))
            current = index[addrs[0].lower()]
            found[current][1].append(line)
        elif current is not None:
            found[current][1].append(line)
    return [(addr, "\n".join(body)) for addr, body in found]


#: Markers no person writes: enough on their own, whoever the sender.
_STRONG = re.compile(r"this is the qmail-send program|this message was created automatically by mail delivery software|"
                     r"this is the (?:postfix|mail system) program at|this is the mail system at host|"
                     r"----- ?the following addresses had (?:permanent fatal|transient non-fatal) errors", re.I)


def _text_bounce(w: _Walk, null_sender: bool, ids: tuple[str, ...] = ()) -> tuple[str, list[Failure], bool] | None:
    """(format, failures, whether it is certainly a bounce) of a notice, or None: not a bounce."""
    failed_header = [a for c in w.containers for _, a in getaddresses(c.get_all("X-Failed-Recipients") or [])
                     if "@" in a]
    certain = bool(failed_header) or any(_looks_like_bounce(c) for c in w.containers)
    notice = _notice_text(w.notices)
    if not certain and not null_sender:
        if not _STRONG.search(notice[:8192]):
            return None  # a person's mail that talks about delivery is not a bounce
        certain = True
    scope = "\n".join(w.subjects) + "\n" + "\n".join(_header(c, "From") for c in w.containers) + "\n" + notice
    fmt = next((name for name, rx in _FORMAT_RES if rx.search(scope)), None)
    if fmt is None and failed_header:
        fmt = "exim"
    # The bounce's own sender and addressee (the original's sender) and the original's sender are
    # named in notices, but never as the failed recipient.
    exclude = set()
    for c, names in [(c, ("From", "To", "Return-Path", "Sender", "Delivered-To")) for c in w.containers] + \
            [(o, ("From", "Sender", "Reply-To", "Return-Path")) for o in w.originals]:
        for name in names:
            exclude |= {a.lower() for _, a in getaddresses([_header(c, name)]) if a}
    exclude |= {i.lower() for i in ids}  # a Message-ID looks like an address
    exclude -= {a.lower() for a in failed_header}
    delay = bool(_DELAY.search("\n".join(w.subjects) + "\n" + notice))
    chunks = _text_failures(notice, exclude)
    if failed_header:
        by_addr = {a.lower(): body for a, body in chunks}
        chunks = [(a, by_addr.get(a.lower(), "")) for a in dict.fromkeys(failed_header)]
    failures = []
    for addr, body in chunks[:_MAX_FAILURES]:
        after = body.split(addr, 1)[-1] if addr in body else body
        status = _status_in(after)
        permanent = not delay or bool(failed_header) or (status is not None and status[0] == "5" and
                                                         not _DELAY.search(body))
        candidates = [addr]
        if addr.startswith("'") and addr.endswith("'") and len(addr) > 2:
            candidates.append(addr[1:-1])
        failures.append(Failure(tuple(candidates), permanent, status, _clean(after) or _clean(body)))
    return fmt or "generic", failures, certain


# -- the original's Message-IDs ----------------------------------------------------------------

_MSGID_LINE = re.compile(r"^[ \t>]*Message-ID[ \t]*:[ \t]*(?:\r?\n[ \t]+)?<?[ \t]*([^\s<>]+@[^\s<>]+?)[ \t]*>?[ \t]*$",
                         re.I | re.M)
_MSGID_INLINE = re.compile(r"Message-ID[ \t]*:[ \t]*<([^<>\s]+@[^<>\s]+)>", re.I)
_ANGLE_ID = re.compile(r"<([^<>\s]+)>")


def _bare_ids(value: str) -> list[str]:
    ids = _ANGLE_ID.findall(value)
    if not ids and value.strip() and " " not in value.strip():
        ids = [value.strip()]
    return ids


def _original_ids(w: _Walk) -> list[str]:
    own = {i for c in w.containers for i in _bare_ids(_header(c, "Message-ID"))}
    ids: list[str] = []
    for o in w.originals:
        ids += _bare_ids(_header(o, "Message-ID"))
    for text in w.header_texts + w.notices:
        ids += _MSGID_LINE.findall(text) + _MSGID_INLINE.findall(text)
    for c in w.containers:
        ids += _ANGLE_ID.findall(_header(c, "In-Reply-To")) + _ANGLE_ID.findall(_header(c, "References"))
    return [i for i in dict.fromkeys(ids) if i not in own][:50]


# -- the entry point ---------------------------------------------------------------------------

def parse(raw: bytes, mail_from: str | None = None) -> Bounce | None:
    """The bounce this message is, or None when it is not one; ``mail_from`` is the envelope
    sender, when known ("" is the null sender of bounces and auto-replies). Never raises: a
    message too broken to read is not a bounce."""
    try:
        return _parse(raw, mail_from is not None and not mail_from.strip("<> "))
    except Exception as exc:  # a parser bug must not turn an incoming message into a 451 loop
        log.warning("bounce parsing failed, taken as no bounce: %s", type(exc).__name__)
        return None


def _original_refs(w: _Walk) -> tuple[str, ...]:
    """Our per-copy references where a bounce returns the original: its header as a part
    (message/rfc822, text/rfc822-headers) or quoted in the notice's text."""
    from relay.reference import candidates
    texts = [_header(o, "X-Trackrelay-Ref") for o in w.originals] + w.header_texts + w.notices
    found: list[str] = []
    for text in texts:
        for c in candidates(text):
            if c.decode("ascii") not in found:
                found.append(c.decode("ascii"))
    return tuple(found[:20])


def _parse(raw: bytes, null_sender: bool) -> Bounce | None:
    top = email.message_from_bytes(raw, policy=email_policy.compat32)
    w = _walk(top)
    ids = tuple(_original_ids(w))
    refs = _original_refs(w)
    if w.reports:
        failures, any_block = _dsn_failures(w.reports)
        if any_block:
            return Bounce("dsn", tuple(_merge(failures)), ids, refs)
    text = _text_bounce(w, null_sender, ids)
    if text is not None and (text[1] or text[2] or w.reports):
        # (a null sender alone, with no failed address read, is more likely an auto-reply)
        return Bounce(text[0] if text[1] or not w.reports else "dsn", tuple(_merge(text[1])), ids, refs)
    if w.reports:
        return Bounce("dsn", (), ids, refs)
    return None


def _merge(failures: list[Failure]) -> list[Failure]:
    """One failure per address (the same recipient named twice, e.g. in two reports)."""
    out: dict[str, Failure] = {}
    for f in failures:
        key = f.address.lower()
        if key not in out or (f.permanent and not out[key].permanent):
            out[key] = f
    return list(out.values())[:_MAX_FAILURES]
