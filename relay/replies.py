"""Every SMTP reply the relay sends, in one place, each with its enhanced status code (RFC 3463).

``rewrite`` maps aiosmtpd's own replies that lack an enhanced code (or say too much) onto ours.
"""

from __future__ import annotations

import re

OK_QUEUED = "250 2.0.0 OK: queued as {id}"
OK = "250 2.0.0 OK"
OK_SENDER = "250 2.1.0 Sender OK"
OK_RECIPIENT = "250 2.1.5 Recipient OK"

AUTH_REQUIRED = "530 5.7.0 Authentication required"
AUTH_LOCKED = "421 4.7.0 Too many failed authentication attempts, try again later"
SENDER_NOT_OWNED = "553 5.7.1 Sender address not owned by the authenticated user"
FROM_NOT_OWNED = "550 5.7.1 From: or Sender: header not owned by the authenticated user"
FROM_MISSING = "550 5.7.1 No From: header: it must name the authenticated user's address"
DUPLICATE_RECIPIENT = "250 2.1.5 Recipient OK (already given: one copy)"
#: A message that cannot be stored as it is: sending it again unchanged fails the same way.
UNSTORABLE = "554 5.6.0 Message could not be stored as sent; sending it again unchanged will not help"


def header_rule(label: str, why: str) -> str:
    """The 550 for a From:/Sender: header that breaks the sender binding, naming the rule."""
    return f"550 5.7.1 {label} header {why}"
BAD_ADDRESS = "553 5.1.3 Bad address syntax"
BAD_SENDER_ADDRESS = "553 5.1.7 Bad sender address syntax"
RELAY_TRICK = "550 5.7.1 Relaying through address tricks is not allowed"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
LOOP = "554 5.4.6 Too many Received headers: mail loop"
NO_RECIPIENTS = "554 5.5.1 No valid recipients"
TEMP_FAILURE = "451 4.3.0 Temporary failure, try again later"
INBOUND_ONLY = "550 5.7.1 This address does not accept mail"

# aiosmtpd's replies without an enhanced code, or with exception text, mapped onto ours.
_EXACT = {
    "552 Error: Too much mail data": TOO_BIG,
    "552 Error: message size exceeds fixed maximum message size": TOO_BIG,
    "500 Command line too long": "500 5.5.2 Line too long",
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long",
    "500 Error: bad syntax": "500 5.5.2 Syntax error",
    "500 Error: strict ASCII mode": "500 5.6.7 Non-ASCII data without SMTPUTF8",
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
    "554 Command refused due to lack of security": "554 5.7.0 Command refused: STARTTLS first",
    "503 Error: need MAIL command": "503 5.5.1 Need MAIL command",
    "503 Error: need RCPT command": "503 5.5.1 Need RCPT command",
    "503 Error: nested MAIL command": "503 5.5.1 Nested MAIL command",
    "503 Already authenticated": "503 5.5.1 Already authenticated",
    "501 Not enough value": "501 5.5.4 Syntax: AUTH mechanism",
    "501 Too many values": "501 5.5.4 Syntax: AUTH mechanism",
    "250 OK": OK,
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}\b")


def rewrite(status: str) -> str:
    """Our form of a reply that aiosmtpd built. 2xx/3xx informational lines pass as they are."""
    if status in _EXACT:
        return _EXACT[status]
    if status.startswith("500 Error: (") or status.startswith("500 Error: Cannot describe"):
        return TEMP_FAILURE  # never exception text to the client
    if status.startswith('500 Error: command "') and status.endswith('not recognized'):
        return "500 5.5.1 Command not recognized"
    if status[:1] in ("4", "5") and len(status) >= 4 and status[3] == " " and not _HAS_ENHANCED.match(status):
        cls = status[0]
        return f"{status[:3]} {cls}.5.0 {status[4:]}" if status[:3] in ("500", "501", "502", "503", "504") \
            else f"{status[:3]} {cls}.0.0 {status[4:]}"
    return status
