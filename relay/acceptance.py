"""What the submission listener answers to DATA, step by step, without I/O: facts in, verdict out.

``relay.smtp.SubmissionHandler.handle_DATA`` reads as the table of contents of this module:
``user_of`` (who is authenticated) → ``read`` (the message's header fields) → ``refusal`` (a
mail loop, a broken sender binding) → ``recipients`` and ``facts`` (what the policy rules look at,
the CRM's answer included) → ``decide`` (``relay.policy.decide`` per recipient, and the entry to
spool) → the commit (the one step that awaits, in ``relay.smtp``) → ``accepted`` or
``commit_refusal`` (the reply). The recipient and header checks of RCPT and DATA are here too.
"""

from __future__ import annotations

import functools
import re
import secrets
from dataclasses import dataclass
from email.utils import formatdate

from aiosmtpd.smtp import Session

from relay import message as m
from relay import replies
from relay.policy import ContactFacts, Decision, MessageFacts
from relay.policy import decide as decide_recipient
from relay.protocol import UNSAFE
from core import idn
from core.config import Config, User
from core.mailaddr import quote_local, unquote_local
from core.batcher import transient
from storage.spool import SpoolEntry, SpoolRecipient

#: Removed before delivery (SPEC §3): they steer us, not the recipient.
CONTROL_HEADERS = {"x-track", "x-log", "x-log-associate"}
MAX_RECEIVED = 100

#: The CRM's answer when there is no CRM lookup: no contacts, empty Never Log lists.
NO_CONTACTS: tuple[dict[str, ContactFacts], frozenset[str], frozenset[str]] = ({}, frozenset(), frozenset())

_DOMAIN = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
                     r"|^\[[0-9a-f:.]+\]$", re.IGNORECASE)


# -- addresses and headers ------------------------------------------------------------------------

def recipient_problem(address: str) -> str | None:
    """Why an envelope recipient is refused, or None. Relay tricks get 5.7.1."""
    if UNSAFE.search(address) or address.count('"') % 2:
        return replies.BAD_ADDRESS
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return replies.BAD_ADDRESS
    if "@" in local or "%" in local or "!" in local or ":" in local.split('"')[0]:
        return replies.RELAY_TRICK
    ascii_domain = domain if domain.startswith("[") else idn.to_ascii_or_none(domain)
    if ascii_domain is None or not _DOMAIN.match(ascii_domain):
        return replies.BAD_ADDRESS
    return None


def canonical(address: str) -> str:
    """An address as compared (duplicates, ownership): quoted only where the local part needs it,
    lower-cased (as every mail system treats it), the domain in IDNA 2008 ASCII."""
    local, _, domain = address.rpartition("@")
    return idn.address_key(f"{quote_local(unquote_local(local))}@{domain}")


def sender_problem(fs: list[m.Field], owned: set[str]) -> str | None:
    """Why the From:/Sender: headers break the sender binding, or None. From: must exist; each
    From: and Sender: must hold at least one address, every address in it the user's — as a modern
    parser reads it (RFC 2047 decoded, comments removed) and as older ones would."""
    if not any(f.name == "from" for f in fs):
        return replies.FROM_MISSING
    for f in fs:
        if f.name not in ("from", "sender"):
            continue
        label = "From:" if f.name == "from" else "Sender:"
        named = _named(f.value) if len(f.value) <= _CACHED_VALUE else _named.__wrapped__(f.value)
        if named is None:
            return replies.header_rule(label, "is not a valid address list (RFC 5322)")
        if not named:
            return replies.header_rule(label, "must contain the authenticated user's address")
        if any(a not in owned for a in named):
            return replies.header_rule(label, "names an address not owned by the authenticated user")
    return None


#: A sender's From: repeats from message to message: the reading of values up to this long is kept.
_CACHED_VALUE = 512


@functools.lru_cache(maxsize=2048)
def _named(value: str) -> tuple[str, ...] | None:
    """Every address a From:/Sender: value names, canonical, as every reader sees it: None when a
    modern parser finds no valid address list, () when it finds no address. A pure function of
    the value (the parse with ``policy.default`` is most of the cost of the binding check)."""
    found = m.mailboxes(value)
    if not found:
        return found
    seen = found + m.addresses(value) + m.addresses(m.decoded(value))
    return tuple(dict.fromkeys(canonical(a) for a in seen))


# -- DATA, step by step ---------------------------------------------------------------------------

def user_of(config: Config, session: Session) -> User | None:
    """The authenticated user of this session, if still configured (SIGHUP may have removed it)."""
    name = session.auth_data if isinstance(session.auth_data, str) else None
    return config.user(name) if name else None


@dataclass(frozen=True, slots=True)
class Incoming:
    """The message as received: its bytes (CRLF line ends) and header fields."""

    raw: bytes
    fields: list[m.Field]


def read(original_content: bytes | None) -> Incoming:
    raw = m.normalize_crlf(original_content or b"")
    return Incoming(raw, m.fields(raw))


def refusal(mail: Incoming, user: User) -> str | None:
    """The reply refusing the message as a whole, or None: a mail loop (554 5.4.6), then the
    From:/Sender: binding (550 5.7.1)."""
    if m.count(mail.fields, "received") >= MAX_RECEIVED:
        return replies.LOOP
    return sender_problem(mail.fields, {canonical(a) for a in user.addresses})


@dataclass(frozen=True, slots=True)
class Recipients:
    """The envelope's recipients but ``relay.log_bcc_address``, and whether that was one of them."""

    addresses: list[str]
    log_bcc: bool

    def lookup_keys(self) -> set[str]:
        """What the CRM lookup is asked about (lower-cased addresses)."""
        return {r.lower() for r in self.addresses}


def contact_keys(config: Config, rcpts: Recipients) -> set[str]:
    """The recipients the CRM lookup is asked about: their contact facts (do_not_track, the legal
    basis) only matter to the tracking rules, so none while ``tracking.allow`` is false (the Never
    Log lists are still read)."""
    return rcpts.lookup_keys() if config.tracking.allow else set()


def recipients(config: Config, rcpt_tos: list[str]) -> Recipients:
    bcc = config.log_bcc_address
    rcpts = [r for r in rcpt_tos if r.lower() != bcc]
    return Recipients(rcpts, len(rcpts) != len(rcpt_tos))


def facts(config: Config, mail: Incoming, rcpts: Recipients, mail_from: str | None,
          known: tuple[dict[str, ContactFacts], frozenset[str], frozenset[str]]) -> MessageFacts:
    """What the policy rules look at: the configuration, the control headers, the envelope and
    the CRM's answer ``known`` (existing contacts, team Never Log list, the user's list)."""
    contacts, never_team, never_personal = known
    return MessageFacts(
        user_addresses=config.user_addresses,
        internal_domains=config.internal_domains,
        x_track=m.get(mail.fields, "x-track"),
        x_log=m.get(mail.fields, "x-log"),
        log_bcc=rcpts.log_bcc,
        sender=mail_from or "",
        contacts=contacts,
        never_log_team=never_team,
        never_log_personal=never_personal,
        team_addresses=frozenset(a.lower() for a in config.crm.team_addresses),
    )


def received(hostname: str, session: Session, tls: bool) -> bytes:
    """Our Received: header for this session (its HELO name sanitised, the client's address)."""
    helo = re.sub(r"[^\w.\-\[\]:]", "?", session.host_name or "unknown")[:100]
    ip = session.peer[0] if isinstance(session.peer, tuple) else "unknown"
    proto = "ESMTPSA" if tls else "ESMTPA"
    return (f"Received: from {helo} ([{ip}])\r\n\tby {hostname} (trackrelay) "
            f"with {proto};\r\n\t{formatdate(localtime=False, usegmt=True)}").encode()


def client_ip(session: Session) -> str | None:
    return session.peer[0] if isinstance(session.peer, tuple) else None


def decide(config: Config, mail: Incoming, facts: MessageFacts, rcpts: Recipients, user: User,
           mail_from: str | None, received_header: bytes, ip: str | None) -> SpoolEntry:
    """The verdict: the policy's decision per recipient, and the message as it is spooled (control
    headers removed, a Message-ID added when it had none, our Received: on top)."""
    fs = mail.fields
    log_associate = m.get(fs, "x-log-associate")
    spooled = m.remove(mail.raw, CONTROL_HEADERS)
    message_id = m.get(fs, "message-id")
    if not message_id:
        message_id = f"<{secrets.token_hex(16)}@{config.relay.hostname}>"
        spooled = m.insert_after_head(spooled, f"Message-ID: {message_id}".encode())
    spooled = m.prepend(spooled, received_header)
    decisions = [decide_recipient(config, facts, r) for r in rcpts.addresses]
    return SpoolEntry(
        message_id=m.text(message_id)[:998], user=user.name, mail_from=mail_from or "",
        raw=spooled,
        recipients=[spool_recipient(d) for d in decisions],
        from_header=m.decoded(m.get(fs, "from"))[:2000],
        subject=m.decoded(m.get(fs, "subject"))[:2000],
        client_ip=ip,
        log=any(d.log for d in decisions) or (rcpts.log_bcc and not rcpts.addresses),
        log_associate=m.text(log_associate) if log_associate else None,
    )


def spool_recipient(d: Decision) -> SpoolRecipient:
    return SpoolRecipient(d.address, d.token, d.track_opens, d.track_clicks, d.log, d.reasons, d.never_log)


def accepted(queue_id: int) -> str:
    """The 250 once the message is committed, with its queue id (the mail log's key)."""
    return replies.OK_QUEUED.format(id=queue_id)


def commit_refusal(exc: BaseException) -> str:
    """The reply when the spool commit failed: 451 when trying again may help, else 554."""
    return replies.TEMP_FAILURE if transient(exc) else replies.UNSTORABLE
