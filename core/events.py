"""The event model: what happened to a recipient's copy, as every side writes and reads it.

One frozen ``Event`` record with the fields of SPEC §7. The relay (``queued`` at acceptance, the
delivery outcomes), the tracker (opens and clicks), the inbound listener (replies) build it; storage
writes it with ``as_row()`` and reads it back with ``from_row()``; the API, the stream and the
webhooks serialise it with ``to_json()``. The two rules that several writers and readers share are
written here once: the inferred open (``human_sequence``) and the feed's recipient status
(``recipient_status``).

Pure: no I/O, no project imports.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any, NamedTuple


class EventType(StrEnum):
    """What happened (SPEC §7's event kinds; stored in ``events.type``)."""

    #: The message was accepted and spooled; this recipient's copy waits for delivery.
    QUEUED = "queued"
    #: The upstream accepted the copy (a 2xx to its DATA).
    SENT = "sent"
    #: The upstream refused the copy for now (4xx, 421, a dropped connection, a timeout); it is retried.
    DEFERRED = "deferred"
    #: The copy failed for good (5xx, too old, or a DSN reported it); the sender got a DSN.
    BOUNCED = "bounced"
    #: The open pixel was fetched (or an open was inferred from a human click or reply).
    OPENED = "opened"
    #: A wrapped link was followed.
    CLICKED = "clicked"
    #: The recipient answered: a reply that proves it answers this copy reached the inbound listener.
    REPLIED = "replied"


class Classification(StrEnum):
    """Who caused an open, click or reply (``events.classification``; delivery events have none)."""

    #: A person reading the mail: the only kind that counts as engagement.
    HUMAN = "human"
    #: A proxy, scanner or prefetcher (Apple Mail Privacy Protection, link checkers, …); ``reason`` says which.
    MACHINE = "machine"
    #: The sender themselves (signed in to the pages, or from the address they sent from).
    SELF = "self"


#: Events a recipient's engagement is made of: their first human occurrence is marked ``first``.
ENGAGEMENT = (EventType.OPENED, EventType.CLICKED, EventType.REPLIED)

#: The recipient status ladder of the feed: the strongest human engagement wins, strongest first;
#: without one, the delivery state.
ENGAGEMENT_LADDER = (EventType.REPLIED, EventType.CLICKED, EventType.OPENED)

#: A recipient row's delivery status (``recipients.status``) as the feed names it.
DELIVERY_STATUS = {"queued": EventType.QUEUED, "sending": EventType.QUEUED, "deferred": EventType.DEFERRED,
                   "sent": EventType.SENT, "bounced": EventType.BOUNCED}

#: Why an open was inferred (``reason`` of an inferred ``opened``), by the event that proved it.
INFERRED_FROM = {EventType.CLICKED: "inferred_from_click", EventType.REPLIED: "inferred_from_reply"}

#: The columns an event is stored with, in ``as_row()`` order (``id`` is the sequence, ``txid`` the
#: server default on PostgreSQL).
COLUMNS = ("type", "at", "message_pk", "recipient_pk", "user", "url", "ip", "user_agent", "client",
           "classification", "reason", "first", "inferred", "dedupe_key")


def _same(value: Any) -> Any:
    return value


class Event(NamedTuple):
    """One event (SPEC §7). Writers fill what they know; storage fills ``id``/``txid`` and, when
    read back with its joins, ``message_id`` (the RFC 5322 Message-ID) and ``recipient``.

    ``at`` is a timezone-aware datetime, or epoch seconds where the tracker writes thousands a
    second (``stamp`` in ``as_row`` turns either into what the driver takes).

    A frozen record, built as a ``NamedTuple``: the tracker builds one per open or click, and a
    frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field) cost ~5 µs each where
    this costs <1 µs. ``_replace`` gives a changed copy."""

    type: EventType
    message_pk: int
    at: datetime | float
    recipient_pk: int | None = None
    user: str | None = None
    url: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    client: str | None = None
    classification: Classification | None = None
    reason: str | None = None
    first: bool = False
    inferred: bool = False
    dedupe_key: str | None = None
    id: int | None = None
    txid: int | None = None
    message_id: str | None = None
    recipient: str | None = None

    def as_row(self, stamp: Callable[[Any], Any] = _same) -> tuple:
        """The stored columns in ``COLUMNS`` order, ``at`` passed through ``stamp``."""
        return (str(self.type), stamp(self.at), self.message_pk, self.recipient_pk, self.user, self.url, self.ip,
                self.user_agent, self.client, None if self.classification is None else str(self.classification),
                self.reason, self.first, self.inferred, self.dedupe_key)

    @classmethod
    def from_row(cls, row: Any, message_id: str | None = None, recipient: str | None = None) -> Event:
        """An event from a stored row (anything with the column attributes, e.g. the ORM's)."""
        classification = row.classification
        return cls(type=EventType(row.type), message_pk=row.message_pk, at=row.at, recipient_pk=row.recipient_pk,
                   user=row.user, url=row.url, ip=row.ip, user_agent=row.user_agent, client=row.client,
                   classification=None if classification is None else Classification(classification),
                   reason=row.reason, first=bool(row.first), inferred=bool(row.inferred),
                   dedupe_key=row.dedupe_key, id=row.id, txid=getattr(row, "txid", None),
                   message_id=message_id, recipient=recipient)

    def to_json(self) -> dict:
        """The event as the API, the stream and the webhooks show it (SPEC §7)."""
        return {
            "id": self.id,
            "type": str(self.type),
            "at": iso_time(self.at),
            "message": self.message_pk,
            "message_id": self.message_id,
            "recipient": self.recipient,
            "url": self.url,
            "user_agent": self.user_agent,
            "ip": self.ip,
            "client": self.client,
            "classification": None if self.classification is None else str(self.classification),
            "reason": self.reason,
            "first": bool(self.first),
            "inferred": bool(self.inferred),
        }


def rows(events: Iterable[Event], stamp: Callable[[Any], Any] = _same) -> list[tuple]:
    """``as_row`` of many events in one comprehension (no call per event: the tracker's batches
    are thousands). The type and classification stay the str-valued enum members: both drivers
    bind them as their text."""
    return [(kind, stamp(at), message_pk, recipient_pk, user, url, ip, user_agent, client, classification, reason,
             first, inferred, dedupe_key)
            for (kind, message_pk, at, recipient_pk, user, url, ip, user_agent, client, classification, reason,
                 first, inferred, dedupe_key, _id, _txid, _message_id, _recipient) in events]


def iso_time(at: datetime | float) -> str:
    """ISO 8601 UTC with a ``Z`` (naive datetimes are read as UTC, as SQLite gives them back)."""
    if not isinstance(at, datetime):
        at = datetime.fromtimestamp(at, timezone.utc)
    elif at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def human_sequence(event: Event, history: set[tuple[int, str]]) -> list[Event]:
    """The events a human open, click or reply stands for, in order, with ``first`` set.

    The inferred-open rule: a human click or reply of a recipient with no human open yet proves the
    mail was opened, so an ``opened`` (classification human, ``inferred``, reason
    ``inferred_from_click``/``inferred_from_reply``, ``first``, dedupe key the cause's plus
    ``:open``) comes before it. ``first`` marks the recipient's first human event of its type.
    ``history`` holds the (recipient, type) pairs that already have a human event and gains these.
    An event that is not human is returned as it is."""
    kind, rcpt = event[0], event[3]  # (type, recipient_pk): a tuple's items, read once
    if event[9] != _HUMAN or rcpt is None:
        return [event]
    done = (rcpt, kind)
    cause = INFERRED_FROM.get(kind)
    if cause is not None and (rcpt, _OPENED) not in history:
        # Event._make of the changed fields (as _replace(type=OPENED, url=None, reason=cause,
        # first=True, inferred=True, dedupe_key=…) would, ten times faster: most human events are
        # a recipient's first, and the tracker writes thousands a second).
        key = event[13]
        opened = _make((_OPENED, *event[1:5], None, *event[6:10], cause, True, True,
                        None if key is None else key + ":open", *event[14:]))
        history.add((rcpt, _OPENED))
        first = done not in history
        history.add(done)
        return [opened, event if event[11] == first else _make((*event[:11], first, *event[12:]))]
    if done in history:
        return [event if not event[11] else _make((*event[:11], False, *event[12:]))]
    history.add(done)
    return [event if event[11] else _make((*event[:11], True, *event[12:]))]


_make = Event._make
_HUMAN, _OPENED = Classification.HUMAN, EventType.OPENED
assert Event._fields[:4] == ("type", "message_pk", "at", "recipient_pk") and Event._fields[5] == "url"
assert Event._fields[9:15] == ("classification", "reason", "first", "inferred", "dedupe_key", "id")


def recipient_status(delivery: str, human: Collection[EventType]) -> EventType | str:
    """The feed's status of one recipient: the strongest kind in ``human`` (the types of their
    human events) on ``ENGAGEMENT_LADDER``, else their delivery ``status`` (``DELIVERY_STATUS``);
    a delivery status no event stands for (``held``, ``deleted``: the operator's) as it is."""
    for kind in ENGAGEMENT_LADDER:
        if kind in human:
            return kind
    return DELIVERY_STATUS.get(delivery, delivery)
