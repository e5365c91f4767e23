"""Logging to the CRM: the look-up the policy needs at acceptance, and the logger that works through
the CRM jobs committed with each message (and logs incoming mail from the inbound listener).

A logged email is the message as the sender wrote it (the spooled form: never our pixel or
wrapped links), with its thread and attachments, associated with the recipient contacts, their
companies and each contact's three most recent open deals and tickets — or, with
``X-Log-Associate``, with the listed deals and tickets instead of those.
"""

from __future__ import annotations

import asyncio
import email
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING
from email import policy as email_policy
from email.utils import getaddresses, parsedate_to_datetime

from relay import autoreply, maillog
from relay.policy import ContactFacts
from storage import crm as q
from storage.models import utcnow
from storage.engine import engine_of
from core.config import Config
from core.companies import normalise_domains, registrable
from core.mailaddr import canonical
from core.neverlog import normalise_entry
from core.aio import finish
from core.batcher import Batcher

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

log = logging.getLogger("trackrelay.crm")

MAX_JOB_ATTEMPTS = 5
#: CRM jobs logged in one commit on SQLite (each parse between them yields to the event loop).
BATCH = 8
#: Never Log lists change rarely and are read for every message: a change takes effect within this.
NEVER_LOG_CACHE_SECONDS = 2.0
_MSGID = re.compile(r"<[^<>\s]+>")
#: A Message-ID some clients write without its angle brackets.
_BARE_MSGID = re.compile(r"^\s*([^<>\s]+@[^<>\s]+)\s*$")


# -- at acceptance ------------------------------------------------------------------------------

class CrmLookup:
    """The relay's CRM look-up at acceptance: existing contacts among the recipients, and the
    sender's Never Log lists. Messages accepted at the same moment share one query (a group
    look-up, like the spool's group commit); the Never Log lists are cached for a moment."""

    def __init__(self, config: Config, sessionmaker: async_sessionmaker):
        self.sessionmaker = sessionmaker
        self._team_cfg = tuple(normalise_entry(e) for e in config.never_log.team)
        self._personal_cfg = {u.name: tuple(normalise_entry(e) for e in u.never_log) for u in config.users}
        self._lists: dict[str, tuple[float, q.NeverLogLists]] = {}
        self._batcher: Batcher[set[str], dict[str, ContactFacts]] = Batcher(self._contacts, name="crm-lookup")
        self._facts = q.FactsReader(engine_of(sessionmaker))

    def start(self) -> None:
        self._batcher.start()

    async def stop(self) -> None:
        await self._batcher.stop()
        await self._facts.close()

    async def __call__(self, user: str, addresses: set[str]):
        contacts = await self._batcher.submit(addresses) if addresses else {}
        cached = self._lists.get(user)
        if cached is None or time.monotonic() - cached[0] > NEVER_LOG_CACHE_SECONDS:
            async with self.sessionmaker() as session:
                lists = await q.never_log_lists(session, user, self._team_cfg, self._personal_cfg.get(user, ()))
            cached = self._lists[user] = (time.monotonic(), lists)
        return contacts, cached[1].team, cached[1].personal

    async def _contacts(self, requests: list[set[str]]) -> list[dict[str, ContactFacts]]:
        rows = await self._facts(set().union(*requests))
        found = {e: ContactFacts(basis, bool(dnt)) for e, basis, dnt in rows}
        return [{a: found[a] for a in wanted if a in found} for wanted in requests]


# -- parsing a message for the CRM --------------------------------------------------------------

@dataclass
class ParsedEmail:
    message_id: str
    subject: str = ""
    from_: str = ""
    to: str = ""
    cc: str = ""
    date: datetime | None = None
    in_reply_to: str | None = None
    references: list[str] = field(default_factory=list)
    text: str | None = None
    html: str | None = None
    attachments: list[tuple[str, str, bytes]] = field(default_factory=list)  # filename, type, bytes
    headers: dict[str, str] = field(default_factory=dict)


def _h(msg, name: str) -> str:
    try:
        v = msg.get(name)
        return str(v) if v is not None else ""
    except Exception:  # a malformed header: keep what can be read
        raw = msg.get_all(name, failobj=[])
        return str(raw[0]) if raw else ""


class _MemoPolicy(email_policy.EmailPolicy):
    """``policy.default`` with its header objects memoized by (name, value): the email package
    parses a part's Content-Type again for each of get_content_type, get_param, get_filename and
    get_content (16 header parses for a one-part message), and most headers (MIME-Version, the
    Content-Types, a sender's From) repeat from message to message. A header object is a pure
    function of its name and value, so the result is the same."""

    def header_fetch_parse(self, name, value):
        if hasattr(value, "name"):
            return value
        key = (name, value)
        header = _HEADERS.get(key)
        if header is None:
            simple = _simple_value(name.lower(), value)
            if simple is not None:
                return simple
            header = super().header_fetch_parse(name, value)
            if len(value) <= _MEMO_MAX_VALUE:
                if len(_HEADERS) >= _MEMO_SIZE:
                    _HEADERS.pop(next(iter(_HEADERS)))
                _HEADERS[key] = header
        return header


#: Headers parse_email only reads as text, and the readings that are plain enough to need no
#: parse: a value ``policy.default`` would render exactly so (``tests/test_perf_paths.py`` checks
#: both against it, on the corpus and on generated values). Everything else is parsed.
_TEXT_ONLY = {"subject", "in-reply-to", "references", "auto-submitted", "precedence", "delivered-to"}
_PLAIN_TEXT = re.compile(r"[ -~\t]*")
_DOT_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_ADDR = rf"{_DOT_ATOM}@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
_PLAIN_MAILBOX = re.compile(rf"(?:[A-Za-z0-9'_-]+(?: [A-Za-z0-9'_-]+)* <{_ADDR}>|{_ADDR})")
_PLAIN_MSGID = re.compile(rf"<{_DOT_ATOM}@{_DOT_ATOM}>")


def _simple_value(name: str, value: str) -> str | None:
    """What ``str()`` of ``policy.default``'s header object gives, where that needs no parse; else None."""
    if "=?" in value or not value.isascii():
        return None
    if name in _TEXT_ONLY or name.startswith("x-"):  # unstructured, as every X- header is
        return value if _PLAIN_TEXT.fullmatch(value) else None
    if name in ("from", "to", "cc"):
        items = [item.strip() for item in value.split(",")]
        return ", ".join(items) if all(_PLAIN_MAILBOX.fullmatch(i) for i in items) else None
    if name == "message-id":
        return value if _PLAIN_MSGID.fullmatch(value) else None
    return None


_HEADERS: dict = {}
_MEMO_SIZE = 4096
_MEMO_MAX_VALUE = 2000
_POLICY = _MemoPolicy()


def parse_email(raw: bytes) -> ParsedEmail:
    msg = email.message_from_bytes(raw, policy=_POLICY)
    # Names present, read once: each absent header costs nothing (Message.get scans every field).
    present = {k.lower() for k in msg.keys()}

    def h(name: str) -> str:
        return _h(msg, name) if name in present else ""

    ids = _MSGID.findall(h("message-id"))
    p = ParsedEmail(message_id=ids[0] if ids else "")
    p.subject = h("subject")
    p.from_, p.to, p.cc = h("from"), h("to"), h("cc")
    date = h("date")
    try:
        p.date = parsedate_to_datetime(date) if date else None
        if p.date is not None and p.date.tzinfo is None:
            p.date = None
    except (TypeError, ValueError, IndexError):
        p.date = None
    irt = _MSGID.findall(h("in-reply-to")) or _BARE_MSGID.findall(h("in-reply-to"))
    p.in_reply_to = irt[0] if irt else None
    p.references = _MSGID.findall(h("references"))
    for name in (*autoreply.HEADERS, "x-auto-response-suppress"):
        if name != "subject":
            if name != "delivered-to":
                p.headers[name] = h(name)
            else:  # every Delivered-To, joined
                p.headers[name] = ", ".join(str(v) for v in msg.get_all(name, failobj=[])) if name in present else ""
    for part in msg.walk():
        if part.is_multipart():
            continue
        disposition = (part.get_content_disposition() or "").lower()
        ctype = part.get_content_type()
        filename = part.get_filename()
        if disposition == "attachment" or (filename and not ctype.startswith("text/")):
            try:
                data = part.get_payload(decode=True) or b""
            except Exception:
                data = b""
            p.attachments.append((filename or "attachment", ctype, data))
            continue
        if ctype in ("text/plain", "text/html"):
            try:
                content = part.get_content()
            except Exception:
                payload = part.get_payload(decode=True) or b""
                content = payload.decode("utf-8", "replace")
            if ctype == "text/plain" and p.text is None:
                p.text = content
            elif ctype == "text/html" and p.html is None:
                p.html = content
    return p


def addresses(header: str) -> list[str]:
    """The header's addresses in canonical form (``core.mailaddr.canonical``: lower-cased, a
    local part such as ``"neko....nyaan"`` keeps the quotes it needs)."""
    return [canonical(a) for _, a in getaddresses([header]) if "@" in a]


def free_mail_domains(config: Config) -> frozenset[str]:
    """The config's additions to the shipped free-mail list (``crm.free_mail_domains``, when the
    config has it)."""
    return normalise_domains(getattr(config.crm, "free_mail_domains", ()) or ())


def parse_associations(value: str | None) -> list[tuple[str, int]]:
    """``deal:12, ticket:7`` -> [("deal", 12), ("ticket", 7)]; unknown words are ignored."""
    out = []
    for item in (value or "").split(","):
        kind, _, ident = item.strip().partition(":")
        if kind.strip().lower() in ("deal", "ticket") and ident.strip().isdigit():
            out.append((kind.strip().lower(), int(ident.strip())))
    return out


# -- writing a logged email --------------------------------------------------------------------

def email_to_log(config: Config, parsed: ParsedEmail, *, direction: str, user: str | None, message_pk: int | None,
                 contact_emails: list[str], owner: str | None, log_associate: str | None = None,
                 fallback_date: datetime | None = None, create_contacts: bool | None = None) -> q.EmailToLog:
    """What logging ``parsed`` to these contacts stores: contacts created when ``crm.create_contacts``
    allows (unless ``create_contacts`` is False); with ``X-Log-Associate`` the listed deals and
    tickets, else each contact's most recent open ones; attachments as the config allows."""
    stored, omitted = [], []
    for filename, ctype, data in parsed.attachments:
        if not config.crm.log_attachments:
            omitted.append({"filename": filename, "size": len(data), "reason": "attachment logging is turned off"})
        elif len(data) > config.crm.max_attachment_bytes:
            omitted.append({"filename": filename, "size": len(data),
                            "reason": f"larger than crm.max_attachment_bytes ({config.crm.max_attachment_bytes})"})
        else:
            stored.append((filename[:500], ctype[:200], data))
    return q.EmailToLog(
        direction=direction, message_pk=message_pk, user=user, message_id=parsed.message_id or "",
        in_reply_to=parsed.in_reply_to, references=tuple(parsed.references), subject=parsed.subject[:2000],
        from_=parsed.from_[:2000], to=parsed.to[:10000], cc=parsed.cc[:10000],
        date=parsed.date or fallback_date or utcnow(), text=parsed.text, html=parsed.html,
        contact_emails=tuple(dict.fromkeys(a.lower() for a in contact_emails)), owner=owner,
        create_contacts=bool(config.crm.create_contacts and create_contacts is not False),
        free_mail=free_mail_domains(config),
        associate=tuple(parse_associations(log_associate)) or None,
        attachments=tuple(stored), omitted_attachments=tuple(omitted))


async def write_logged_email(session: AsyncSession, config: Config, parsed: ParsedEmail, *, direction: str,
                             user: str | None, message_pk: int | None, contact_emails: list[str],
                             owner: str | None, log_associate: str | None = None,
                             fallback_date: datetime | None = None,
                             create_contacts: bool | None = None) -> q.Logged | None:
    """Log one email to the records of these contacts (``email_to_log``), in the session's
    transaction. None: nobody to log to."""
    return await q.log_email(session, email_to_log(
        config, parsed, direction=direction, user=user, message_pk=message_pk, contact_emails=contact_emails,
        owner=owner, log_associate=log_associate, fallback_date=fallback_date, create_contacts=create_contacts))


def outgoing_email(config: Config, job: q.LogJob) -> q.EmailToLog | None:
    """What a CRM job logs: the spooled message to its recipients to log (None: nothing, e.g. the
    message is gone or already purged)."""
    if job.raw is None or not job.addresses:
        return None
    parsed = parse_email(job.raw)
    parsed.message_id = parsed.message_id or job.message_id
    return email_to_log(config, parsed, direction="outgoing", user=job.user, message_pk=job.message_pk,
                        contact_emails=[a.lower() for a in job.addresses], owner=job.user,
                        log_associate=job.log_associate, fallback_date=job.accepted_at)


class CrmLogger:
    """Works through the CRM jobs: on PostgreSQL one job per transaction, claimed with SKIP LOCKED;
    on SQLite a few at a time (``BATCH``), claimed in one trip and logged in one commit."""

    def __init__(self, config: Config, sessionmaker: async_sessionmaker):
        self.config = config
        self.sessionmaker = sessionmaker
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.logged = 0

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="crm-logger")
        # The public suffix list is read at its first use (about 0.2 s of parsing): now, beside the
        # loop, rather than on it when the first message is logged.
        threading.Thread(target=registrable, args=("example.com",), name="trackrelay-psl", daemon=True).start()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        await finish(self._task)
        self._task = None

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                while not self._stopping and await self.process_some():
                    # Background work: let the relay's commits and deliveries have the database
                    # between jobs (SQLite has one write connection).
                    await asyncio.sleep(0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("CRM logging failed: %s", maillog.error(exc))
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
                if not self._stopping:
                    await asyncio.sleep(0.1)  # gather the jobs of a burst of mail
            except asyncio.TimeoutError:
                pass

    async def process_some(self) -> bool:
        """Log pending jobs — on SQLite up to ``BATCH`` claimed in one trip and ended in one commit,
        elsewhere one; False when there was none."""
        engine = engine_of(self.sessionmaker)
        if not q.batches(engine):
            return await self.process_one()
        jobs = await q.next_jobs(engine, BATCH)
        if not jobs:
            return False
        work = []
        for job in jobs:
            try:
                work.append((job, outgoing_email(self.config, job)))
            except Exception as exc:
                await self._failed(engine, job.id, job.message_pk, exc)
            await asyncio.sleep(0)  # each parse is a slice of the loop: SMTP sessions go on between
        for (job, _), outcome in zip(work, await q.finish_jobs(engine, work)):
            if isinstance(outcome, Exception):
                await self._failed(engine, job.id, job.message_pk, outcome)
            else:
                self._done(job.message_pk, outcome)
        return True

    async def process_one(self) -> bool:
        """Log one pending job; False when there is none."""
        engine = engine_of(self.sessionmaker)
        job_id = message_pk = None
        try:
            async with q.next_job(engine) as job:
                if job is None:
                    return False
                job_id, message_pk = job.id, job.message_pk
                logged = await q.finish_job(job, outgoing_email(self.config, job))
            self._done(message_pk, logged)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if job_id is None:
                raise
            await self._failed(engine, job_id, message_pk, exc)
        return True

    def _done(self, message_pk: int, logged: q.Logged | None) -> None:
        if logged is not None:
            self.logged += 1
            maillog.log.info("queue_id=%d status=crm_logged logged_email=%d", message_pk, logged.id)

    @staticmethod
    async def _failed(engine, job_id: int, message_pk: int | None, exc: BaseException) -> None:
        """One more failed attempt of the job (given up at ``MAX_JOB_ATTEMPTS``), logged."""
        log.error("CRM job %s (queue_id=%s) failed: %s", job_id, message_pk, maillog.error(exc))
        await q.job_failed(engine, job_id, MAX_JOB_ATTEMPTS)
