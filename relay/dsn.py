"""Delivery status notifications (RFC 3464): one multipart/report for the recipients of one message
that failed permanently (5xx, or past queue.max_age_hours). Pure: bytes out, no I/O."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime, formatdate

from relay import message as m

_STATUS = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


@dataclass(frozen=True)
class Failed:
    address: str
    reply: str  # the upstream's reply, or our reason


def status_of(reply: str) -> str:
    found = _STATUS.search(reply)
    if found:
        return found.group(1)
    return "4.4.7" if reply[:1] == "4" else "5.0.0"


def _ascii(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", text)


def build(*, hostname: str, dsn_from: str, to: str, original: bytes | None, message_id: str,
          arrival: datetime, failed: list[Failed]) -> bytes:
    boundary = f"=_dsn_{secrets.token_hex(12)}"
    mid = f"<{secrets.token_hex(16)}@{hostname}>"
    sender = dsn_from or f"MAILER-DAEMON@{hostname}"
    human = [
        f"This is the mail system at {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        f"Message-ID: {_ascii(message_id)}",
        "",
    ]
    for f in failed:
        human.append(f"<{_ascii(f.address)}>: {_ascii(f.reply)}")
    report = [
        f"Reporting-MTA: dns; {hostname}",
        f"Arrival-Date: {format_datetime(arrival)}",
        "",
    ]
    for i, f in enumerate(failed):
        if i:
            report.append("")
        report += [
            f"Final-Recipient: rfc822; {_ascii(f.address)}",
            "Action: failed",
            f"Status: {status_of(f.reply)}",
            f"Diagnostic-Code: smtp; {_ascii(f.reply)}",
        ]
    headers = original[:m.header_end(original)].rstrip(b"\r\n") + b"\r\n" if original else \
        f"Message-ID: {_ascii(message_id)}\r\n".encode()
    lines = [
        f"From: Mail Delivery System <{sender}>",
        f"To: <{to}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {formatdate(localtime=False, usegmt=True)}",
        f"Message-ID: {mid}",
        f"In-Reply-To: {_ascii(message_id)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *human,
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        *report,
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    out = "\r\n".join(lines).encode() + b"\r\n" + headers + f"\r\n--{boundary}--\r\n".encode()
    return out
