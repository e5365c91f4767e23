"""The event model (core/events.py): every type documented and given a status, an event stored and
read back as SPEC §7 shows it, and the inferred-open rule."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from core.events import (DELIVERY_STATUS, ENGAGEMENT, ENGAGEMENT_LADDER, Classification, Event, EventType,
                         human_sequence, recipient_status)

#: SPEC §7: the fields of an event as the API, the stream and the webhooks show it.
SPEC_FIELDS = {"id", "type", "at", "message", "message_id", "recipient", "url", "user_agent", "ip", "client",
               "classification", "reason", "first", "inferred"}


def test_every_event_type_is_in_the_openapi_document_and_the_feeds_status_rule():
    from tracker_http.openapi import SCHEMAS
    event = SCHEMAS["Event"]["properties"]
    assert set(SPEC_FIELDS) == set(event)
    assert event["type"]["enum"] == [str(t) for t in EventType]
    assert event["classification"]["enum"] == [*(str(c) for c in Classification), None]
    status = SCHEMAS["Recipient"]["properties"]["status"]["enum"]
    for kind in EventType:
        assert kind in ENGAGEMENT_LADDER or kind in DELIVERY_STATUS.values(), kind
        assert str(kind) in status, kind
    assert set(ENGAGEMENT) == set(ENGAGEMENT_LADDER)


def test_the_status_rule_the_strongest_human_engagement_else_the_delivery_state():
    assert recipient_status("sent", []) == EventType.SENT
    assert recipient_status("sending", []) == EventType.QUEUED
    assert recipient_status("sent", [EventType.OPENED]) == EventType.OPENED
    assert recipient_status("sent", [EventType.OPENED, EventType.REPLIED, EventType.CLICKED]) == EventType.REPLIED
    assert recipient_status("bounced", [EventType.CLICKED]) == EventType.CLICKED
    assert recipient_status("held", []) == "held"  # the operator's states, as they are


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
async def test_an_event_stored_and_read_back_shows_spec_7s_fields(db_url):
    from storage import events as ev
    from storage.engine import make_engine, make_sessionmaker
    from storage.migrate import upgrade
    from storage.spool import SpoolEntry, SpoolRecipient, add_entries

    at = datetime(2026, 11, 22, 9, 30, 15, 250, tzinfo=timezone.utc)
    engine = make_engine(db_url)
    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            ((mid, (rid,)),) = await add_entries(conn, [SpoolEntry(
                message_id="<m1@example.com>", user="alice", mail_from="alice@example.com", raw=b"x",
                recipients=[SpoolRecipient("carol@ext.test", "tok1", True, True, False, [])], accepted_at=at)])
        written = Event(EventType.CLICKED, mid, at + timedelta(hours=1), rid, "alice", url="https://example.com/",
                        ip="192.0.2.1", user_agent="Firefox", client="Firefox/Linux",
                        classification=Classification.HUMAN, first=True, dedupe_key="k1")
        assert len(written.as_row()) == len(ev.EVENT_COLUMNS)
        async with engine.begin() as conn:
            await ev.write_events(conn, [written, written])  # the second: the same dedupe key, skipped
        async with make_sessionmaker(engine)() as s:
            read = [e for e in await ev.events_after(s, "alice", ev.Cursor(), 100) if e.type == EventType.CLICKED]
    finally:
        await engine.dispose()
    assert len(read) == 1
    (e,) = read
    assert isinstance(e, Event) and e.id and e.message_id == "<m1@example.com>" and e.recipient == "carol@ext.test"
    assert e.type is EventType.CLICKED and e.classification is Classification.HUMAN
    assert e._replace(id=None, txid=None, message_id=None, recipient=None) == written
    j = e.to_json()
    assert set(j) == SPEC_FIELDS
    assert j == {"id": e.id, "type": "clicked", "at": "2026-11-22T10:30:15.000250Z", "message": mid,
                 "message_id": "<m1@example.com>", "recipient": "carol@ext.test", "url": "https://example.com/",
                 "user_agent": "Firefox", "ip": "192.0.2.1", "client": "Firefox/Linux", "classification": "human",
                 "reason": None, "first": True, "inferred": False}


def human(kind: EventType, rcpt: int = 7, key: str | None = "k", **kw) -> Event:
    return Event(kind, 1, 100.0, rcpt, "alice", classification=kw.pop("classification", Classification.HUMAN),
                 dedupe_key=key, url=kw.pop("url", "https://example.com/" if kind == EventType.CLICKED else None),
                 **kw)


def test_a_human_click_without_a_human_open_infers_the_open_first():
    history: set = set()
    opened, clicked = human_sequence(human(EventType.CLICKED), history)
    assert opened == human(EventType.OPENED)._replace(reason="inferred_from_click", first=True, inferred=True,
                                                       dedupe_key="k:open")
    assert opened.url is None and opened.classification is Classification.HUMAN
    assert clicked == human(EventType.CLICKED)._replace(first=True)
    assert history == {(7, EventType.OPENED), (7, EventType.CLICKED)}


def test_a_second_click_is_not_first_and_infers_nothing():
    history = {(7, EventType.OPENED), (7, EventType.CLICKED)}
    assert human_sequence(human(EventType.CLICKED, key="k2"), history) == [human(EventType.CLICKED, key="k2")]


def test_a_click_after_a_human_open_is_first_and_infers_nothing():
    history = {(7, EventType.OPENED)}
    assert human_sequence(human(EventType.CLICKED), history) == [human(EventType.CLICKED)._replace(first=True)]


def test_an_open_is_first_once():
    history: set = set()
    assert human_sequence(human(EventType.OPENED), history) == [human(EventType.OPENED)._replace(first=True)]
    assert human_sequence(human(EventType.OPENED, key="k2"), history) == [human(EventType.OPENED, key="k2")]


@pytest.mark.parametrize("cls", [Classification.MACHINE, Classification.SELF])
def test_a_machine_or_self_event_is_unchanged(cls):
    history: set = set()
    for kind in (EventType.OPENED, EventType.CLICKED):
        event = human(kind, classification=cls)
        assert human_sequence(event, history) == [event]
    assert history == set()


def test_a_reply_infers_its_open():
    history = {(7, EventType.CLICKED)}
    opened, replied = human_sequence(human(EventType.REPLIED, key=None), history)
    assert (opened.type, opened.reason, opened.inferred, opened.first, opened.dedupe_key) == (
        EventType.OPENED, "inferred_from_reply", True, True, None)
    assert replied.first and not replied.inferred
