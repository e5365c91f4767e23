"""Bounces, auto-replies and companies as real servers and people send them.

- ``tests/data/bounces/``: one bounce a file, written to the formats the MTAs and providers send
  (``expected.toml`` says what each must yield); the shared corpus's DSNs; both compared with
  GNU Mailman's flufl.bounce, each disagreement named with why ours is right.
- Generated DSNs (Hypothesis): the parser never raises and never records an address that is not
  in the message.
- ``tests/data/autoreplies/``: each vendor header, each subject language, and people's replies
  that merely mention being out of office.
- End to end, on both databases: each bounce delivered to the real inbound listener over SMTP
  after a real message of ours to that recipient records ``bounced``/``deferred`` for exactly
  the right recipients, and is never logged or made a contact.
"""

from __future__ import annotations

import base64
import email
import logging
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import autoreply, bounces
from relay.crm import addresses, parse_email
from core import companies, mailaddr

HERE = Path(__file__).parent
BOUNCES = HERE / "data" / "bounces"
AUTOREPLIES = HERE / "data" / "autoreplies"
CORPUS = HERE.parent.parent / "shared" / "corpus" / "eml"
EXPECTED = tomllib.loads((BOUNCES / "expected.toml").read_text("utf-8"))
AUTO_EXPECTED = tomllib.loads((AUTOREPLIES / "expected.toml").read_text("utf-8"))
CORPUS_ALL = sorted(p.name for p in CORPUS.glob("*.eml")) if CORPUS.is_dir() else []
#: The corpus files that are bounces, by name or content (see its MANIFEST.tsv).
CORPUS_BOUNCES = [n for n in CORPUS_ALL if re.search(r"dsn|bounce|deliver|report|failure", n) or
                  re.search(rb"(?i)delivery-status|^From:.*mailer-daemon|^X-Failed-Recipients:", (CORPUS / n).read_bytes(), re.M)]
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"the shared corpus is not at {CORPUS}")


def crlf(raw: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", raw)


def ours(raw: bytes) -> tuple[set[str], set[str]]:
    """(permanent, temporary) failed addresses by our parser, lower-cased."""
    b = bounces._parse(raw, False)  # the inner function: an exception fails the test
    fs = b.failures if b else ()
    return {f.address.lower() for f in fs if f.permanent}, {f.address.lower() for f in fs if not f.permanent}


def flufl(raw: bytes) -> tuple[set[str], set[str]]:
    all_failures = pytest.importorskip("flufl.bounce", reason="flufl.bounce (a test dependency) is not installed").all_failures
    logging.getLogger("flufl.bounce").disabled = True
    temporary, permanent = all_failures(email.message_from_bytes(raw))
    return ({a.decode("ascii").lower() for a in permanent}, {a.decode("ascii").lower() for a in temporary})


# -- the samples ---------------------------------------------------------------------------------

def test_there_are_at_least_40_bounce_samples_each_with_its_expectation():
    files = {p.stem for p in BOUNCES.glob("*.eml")}
    assert len(files) >= 40 and files == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bounce_sample_yields_its_recipients_permanence_and_status(name):
    raw = (BOUNCES / f"{name}.eml").read_bytes()
    b = bounces._parse(raw, True)
    assert b is not None, f"{name}: not recognised as a bounce"
    got = {(mailaddr.canonical(f.address), "bounced" if f.permanent else "deferred", f.status or "") for f in b.failures}
    want = {(mailaddr.canonical(f["address"]), f["event"], f["status"]) for f in EXPECTED[name]["failures"]}
    assert got == want, name
    if EXPECTED[name]["message_id"]:
        assert EXPECTED[name]["message_id"].strip("<>") in b.message_ids, name
    assert all(f.diagnostic is None or len(f.diagnostic) <= 500 for f in b.failures)


#: Where flufl.bounce and we disagree on the samples, and why ours is right.
FLUFL_DISAGREES = {
    "rfc6533_utf8_address_type_escaped": "flufl only reads rfc822-typed addresses; RFC 6533 allows utf-8 (with \\x{} escapes)",
    "rfc6533_global_delivery_status": "flufl ignores message/global-delivery-status (RFC 6533)",
    "rfc6533_global_delivery_status_base64": "flufl ignores message/global-delivery-status, which RFC 6533 lets be base64",
    "rfc3464_no_action_status_only": "no Action field: flufl drops the block; the 5.x.x Status says it failed",
    "amazon_ses_plain_undeliverable": "SES's plain notice ('The following message to <x> was undeliverable') is not among flufl's formats",
    "exim_delay_warning": "flufl's Exim/heuristic detectors report a delay warning as a permanent failure; it says delivery attempts will continue",
    "postfix_old_plain_text": "flufl's Postfix detector needs a multipart with a Notification part; older Postfix also sent plain text",
    "postfix_old_delayed_warning": "flufl reports the 'THIS IS A WARNING ONLY' notice as a permanent failure",
    "microsoft365_ndr_html_one_long_line": "flufl does not read HTML-only Microsoft 365 NDRs",
    "exchange2010_delivery_has_failed": "'Delivery has failed to these recipients or groups' is not among flufl's formats",
    "exchange2003_did_not_reach": "flufl does not read Exchange 2003's 'cannot be reached' list with quoted addresses",
    "exchange_delayed": "Exchange's 'Delivery is delayed' notice: flufl sees nothing; it is a temporary failure",
    "gmail_address_not_found": "Gmail's current '** Address not found **' text (without its report part) is not among flufl's formats",
    "gmail_delivery_incomplete": "Gmail's '** Delivery incomplete **' (temporary) is not among flufl's formats",
    "google_groups_address_not_found": "Google Groups' notice is not among flufl's formats",
    "gmail_forwarded_inline_by_the_user": "a bounce the user forwarded inline: flufl reads no Gmail text format",
    "gmail_message_blocked": "Gmail's '** Message blocked **' is not among flufl's formats",
    "mimecast_rejection": "Mimecast's HTML notice ('Recipient: … Reason: …') is not among flufl's formats",
    "proofpoint_essentials_notice": "Proofpoint Essentials' notice is not among flufl's formats",
    "generic_mail_system_error": "a generic notice from postmaster@ naming the address: flufl's patterns do not cover it",
    "generic_no_original_message_id": "'could not be delivered to: <x>' from MAILER-DAEMON: flufl's patterns do not cover it",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_agrees_with_flufl_bounce_or_the_difference_is_named(name):
    raw = (BOUNCES / f"{name}.eml").read_bytes()
    mine, theirs = ours(raw), flufl(raw)
    if name in FLUFL_DISAGREES:
        assert mine != theirs, f"{name} is listed as a disagreement but now agrees: remove it from FLUFL_DISAGREES"
        want = EXPECTED[name]["failures"]
        assert mine == ({mailaddr.canonical(f["address"]) for f in want if f["event"] == "bounced"},
                        {mailaddr.canonical(f["address"]) for f in want if f["event"] == "deferred"})
    else:
        assert mine == theirs, name


@needs_corpus
def test_the_corpus_has_its_dsns():
    assert len(CORPUS_BOUNCES) >= 10


@needs_corpus
@pytest.mark.parametrize("name", CORPUS_ALL)
def test_corpus_message_agrees_with_flufl_bounce(name):
    """Every corpus message, bounce or not: the same failures as flufl.bounce (none for the rest)."""
    raw = crlf((CORPUS / name).read_bytes())
    try:
        theirs = flufl(raw)
    except (IndexError, AttributeError):  # flufl's Yale and Sina detectors fail on a missing or encoded From
        theirs = (set(), set())
        assert name not in CORPUS_BOUNCES
    assert ours(raw) == theirs, name


# -- generated DSNs ------------------------------------------------------------------------------

_LOCALS = st.one_of(st.from_regex(r"[a-z][a-z0-9._+-]{0,12}[a-z0-9]", fullmatch=True),
                    st.sampled_from(['"neko....nyaan"', '"a b"', "jörg", "用户", "o'brien", "x+tag"]))
_DOMAINS = st.sampled_from(["ext.test", "mail.ext.test", "other.test", "例子.广告", "exemple.test", "yahoo.com"])
_ADDRESSES = st.builds(lambda lp, d: f"{lp}@{d}", _LOCALS, _DOMAINS)
_ACTIONS = st.sampled_from(["failed", "failed (permanent failure)", "FAILED", "delayed", "delayed (retrying)",
                            "delivered", "relayed", "expanded", "", "gibberish"])
_STATUS = st.sampled_from(["5.1.1", "5.2.2", "4.4.1", "4.2.0", "2.0.0", "", "9.9", "5.1.1 (user unknown)"])
_JUNK = st.text(st.characters(blacklist_characters="@\r\n", blacklist_categories=("Cs",)), max_size=80)


@st.composite
def dsns(draw):
    blocks, named = [], set()
    for _ in range(draw(st.integers(0, 4))):
        final, action, status = draw(_ADDRESSES), draw(_ACTIONS), draw(_STATUS)
        original = draw(st.one_of(st.none(), _ADDRESSES))
        kind = draw(st.sampled_from(["rfc822; ", "utf-8; ", "RFC822;", "", "<"]))
        lines = [f"Original-Recipient: rfc822;{original}"] if original else []
        lines.append(f"Final-Recipient: {kind}{final}{'>' if kind == '<' else ''}")
        if action:
            lines.append(f"Action: {action}")
        if status:
            lines.append(f"Status: {status}")
        lines.append(f"Diagnostic-Code: smtp; 550 {draw(_JUNK)}")
        blocks.append("\n".join(lines))
        named |= {final, original} - {None}
    report = "Reporting-MTA: dns; mx.ext.test\n\n" + "\n\n".join(blocks) + "\n"
    ctype = draw(st.sampled_from(["message/delivery-status", "message/global-delivery-status"]))
    cte = draw(st.sampled_from(["", "base64", "8bit"]))
    body = base64.encodebytes(report.encode()).decode() if cte == "base64" else report
    dsn = (f"From: {draw(st.sampled_from(['MAILER-DAEMON@mx.ext.test', 'postmaster@ext.test', 'Alice <alice@example.com>']))}\n"
           f"To: alice@example.com\nSubject: {draw(st.sampled_from(['Undelivered Mail Returned to Sender', 'Hello', '']))}\n"
           "MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\n\n"
           f"--b\nContent-Type: text/plain\n\n{draw(_JUNK)}\n--b\nContent-Type: {ctype}\n"
           + (f"Content-Transfer-Encoding: {cte}\n" if cte else "") + f"\n{body}\n"
           "--b\nContent-Type: text/rfc822-headers\n\nFrom: alice@example.com\nMessage-ID: <orig@example.com>\n\n--b--\n")
    if draw(st.booleans()):
        dsn = ("From: alice@example.com\nSubject: Fwd: bounce\nMIME-Version: 1.0\n"
               "Content-Type: multipart/mixed; boundary=\"o\"\n\n--o\nContent-Type: text/plain\n\nfyi\n"
               f"--o\nContent-Type: message/rfc822\n\n{dsn}\n--o--\n")
    raw = dsn.encode("utf-8")
    raw = raw.replace(b"\n", b"\r\n") if draw(st.booleans()) else raw
    cut = draw(st.one_of(st.none(), st.integers(0, len(raw))))
    return (raw[:cut] if cut is not None else raw), named | {"alice@example.com"}, cut is None, blocks


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dsns())
def test_generated_dsns_never_raise_and_name_only_addresses_in_the_message(case):
    raw, named, whole, blocks = case
    b = bounces._parse(raw, False)
    known = set().union(*(mailaddr.variants(a) for a in named))
    for f in (b.failures if b else ()):
        assert mailaddr.variants(f.address) & known, (f.address, raw)
    if whole:  # every failed or delayed block is read; failed is permanent, delayed (alone) temporary
        assert b is not None
        read = []
        for blk in blocks:
            found = re.search(r"^Action: (\w+)", blk, re.M)
            status = re.search(r"^Status: ([45])\.\d", blk, re.M)
            action = found.group(1).lower() if found else {"5": "failed", "4": "delayed"}.get(status and status.group(1))
            if action in ("failed", "delayed"):
                names = re.findall(r"^(?:Original|Final)-Recipient: (?:(?i:rfc822|utf-8);\s*|<)?(.*?)>?$", blk, re.M)
                read.append((action == "failed", set().union(*(mailaddr.variants(n) for n in names))))
        for failed, forms in read:
            matching = [f for f in b.failures if mailaddr.variants(f.address) & forms]
            assert matching, (forms, b.failures)
            if failed:
                assert any(f.permanent for f in matching), (forms, b.failures)
            elif not any(other_failed and other & forms for other_failed, other in read):
                assert not any(f.permanent for f in matching), (forms, b.failures)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_never_raise(raw):
    bounces._parse(raw, False)
    bounces._parse(b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n--x\r\n"
                   b"Content-Type: message/delivery-status\r\n\r\n" + raw, True)


# -- auto-replies --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(AUTO_EXPECTED))
def test_autoreply_sample(name):
    parsed = parse_email((AUTOREPLIES / f"{name}.eml").read_bytes())
    why = autoreply.detect({**parsed.headers, "subject": parsed.subject})
    assert (why is not None) == AUTO_EXPECTED[name]["automatic"], (name, why)


def test_every_header_and_subject_language_of_the_issue_is_covered():
    names = set(AUTO_EXPECTED)
    for header in ("x_autogenerated", "x_precedence", "x_autoreply_from", "x_mail_autoreply", "x_fc_machinegenerated",
                   "x_post_messageclass", "delivered_to_autoresponder", "auto_submitted"):
        assert any(n.startswith(f"header_{header}") for n in names), header
    for subject in ("Automatische Antwort:", "Abwesenheitsnotiz", "Automatisch antwoord", "Respuesta automática",
                    "Réponse automatique", "Risposta automatica", "Autosvar", "Automaattinen vastaus", "自动回复", "自動返信"):
        assert autoreply.subject_reason(f"{subject} Offer"), subject


# -- companies and addresses ---------------------------------------------------------------------

def test_one_company_per_registrable_domain_and_none_for_free_mail():
    assert companies.company_domain("eu.acme.co.uk") == companies.company_domain("acme.co.uk") == "acme.co.uk"
    assert companies.company_domain("eu.acme.com") == "acme.com"
    assert companies.company_domain("hotmail.co.uk") is None
    assert companies.company_domain("BÜCHER.de") == companies.company_domain("xn--bcher-kva.de") == "xn--bcher-kva.de"
    assert companies.company_domain("mail.ext.test") == "ext.test"  # an unknown suffix is a suffix
    assert companies.company_domain("example.com", frozenset({"example.com"})) is None


def test_free_mail_list_covers_the_named_domains_and_big_ones_per_country():
    for d in ("hotmail.co.uk", "outlook.de", "t-online.de", "gmx.at", "pm.me", "libero.it", "orange.fr", "comcast.net",
              "gmail.com", "yahoo.co.jp", "web.de", "seznam.cz", "wp.pl", "mail.ru", "qq.com", "naver.com", "uol.com.br",
              "bigpond.com", "free.fr", "virgilio.it", "ziggo.nl", "btinternet.com", "bluewin.ch", "yandex.ru", "icloud.com"):
        assert companies.company_domain(d) is None, d
    assert len(companies.free_mail()) >= 300


def test_addresses_keep_the_quotes_a_local_part_needs():
    assert addresses('"neko....nyaan"@example.org, "John"@Example.COM, Carol <carol@ext.test>') == [
        '"neko....nyaan"@example.org', "john@example.com", "carol@ext.test"]
    assert '"neko....nyaan"@example.org' in mailaddr.variants("neko....nyaan@example.org")
    assert mailaddr.is_system("MAILER-DAEMON@mx.ext.test") and mailaddr.is_system("<>")
    assert mailaddr.is_system("Postmaster@ext.test") and not mailaddr.is_system("post@ext.test")
    assert mailaddr.is_system("MicrosoftExchange329e71ec88ae4615bbc36ab6ce41109e@ext.test")


def test_a_persons_mail_about_delivery_is_not_a_bounce():
    raw = (b"From: Carol <carol@ext.test>\r\nTo: alice@example.com\r\nSubject: Re: Offer\r\n\r\n"
           b"Your message couldn't be delivered to bob@ext.test, says our server. Delivery has failed to these "
           b"recipients or groups: bob@ext.test\r\n")
    assert bounces.parse(raw, "carol@ext.test") is None


# -- end to end ----------------------------------------------------------------------------------

async def inbound_send(relay, raw: bytes, mail_from: str = ""):
    import aiosmtplib
    from test_crm import LOG_KEY
    host, port = relay.config.relay.inbound_listen.split(":")
    c = aiosmtplib.SMTP(hostname=host, port=int(port), start_tls=False, local_hostname="mx.ext.test", timeout=10)
    await c.connect()
    try:
        return await c.sendmail(mail_from, [f"log+{LOG_KEY}@relay.example.test"], raw)
    finally:
        c.close()


def _offer(message_id: str | None) -> bytes:
    from test_tracker import HTML_MSG
    return HTML_MSG.replace(b"Subject: Offer", (f"Message-ID: {message_id}\r\n" if message_id else "").encode() + b"Subject: Offer")


async def _send_all(relay, plans):
    """plans: (message_id or None, recipients); all sent, all delivered to the sink."""
    from helpers import client
    for mid, rcpts in plans:
        c = await client(relay.port, user="alice", source="127.0.0.2")
        utf8 = ["SMTPUTF8"] if not all(r.isascii() for r in rcpts) else []
        await c.sendmail("alice@example.com", rcpts, _offer(mid), mail_options=utf8)
        await c.quit()
    await relay.sink.wait_for(sum(len(r) for _, r in plans), timeout=60)


async def _bounce_events(relay) -> dict[str, set[tuple[str, str]]]:
    rows = await relay.rows("SELECT m.message_id, r.address, e.type, e.reason FROM events e "
                            "JOIN recipients r ON r.id = e.recipient_pk JOIN messages m ON m.id = e.message_pk "
                            "WHERE e.type IN ('bounced', 'deferred')")
    out: dict[str, set] = {}
    for mid, address, kind, reason in rows:
        out.setdefault(mid, set()).add((mailaddr.canonical(address), kind, reason))
    return out


async def test_each_bounce_through_the_inbound_listener_records_the_right_recipients(relay, sink):
    from test_crm import alice_with_log_key, start, wait_logged
    await start(relay, inbound=True, users=alice_with_log_key(relay))
    plans, ids = [], {}
    for i, (name, e) in enumerate(sorted(EXPECTED.items())):
        mid = e["message_id"] or None
        plans.append((mid, [f["address"] for f in e["failures"]] + [f"keeper-{i}@ext.test"]))
        ids[name] = mid
    await _send_all(relay, plans)
    await wait_logged(relay, len(plans), timeout=60)
    no_id = {}
    for mid, rcpts in plans:
        if mid is None:
            no_id[rcpts[0]] = None
    for name in sorted(EXPECTED):
        await inbound_send(relay, crlf((BOUNCES / f"{name}.eml").read_bytes()))
    got = await _bounce_events(relay)
    stored_ids = {addr: mid for mid, addr in await relay.rows("SELECT m.message_id, r.address FROM recipients r "
                                                              "JOIN messages m ON m.id = r.message_pk")}
    for name, e in sorted(EXPECTED.items()):
        mid = ids[name] or stored_ids[e["failures"][0]["address"]]
        events = got.get(mid, set())
        if not ids[name]:
            # Issue 20: a bounce citing neither our per-copy reference nor the Message-ID of one of
            # the user's messages proves nothing, so it records nothing (it used to be matched to
            # the user's latest message to that address; tests/test_inbound_security.py shows the
            # same bounce recorded once it carries our reference).
            assert events == set(), name
            continue
        assert {(a, k) for a, k, _ in events} == {(mailaddr.canonical(f["address"]), f["event"]) for f in e["failures"]}, name
        for f in e["failures"]:
            reason = next(r for a, _, r in events if a == mailaddr.canonical(f["address"]))
            assert f["status"] in reason, (name, reason)
    # No bounce is logged as incoming mail or makes a contact of its sender.
    assert await relay.rows("SELECT id FROM logged_emails WHERE direction = 'incoming'") == []
    contacts = {c for (c,) in await relay.rows("SELECT email FROM contacts")}
    assert not [c for c in contacts if mailaddr.is_system(c) or "mimecast" in c]
    statuses = dict(await relay.rows("SELECT address, status FROM recipients"))
    assert statuses["dan@ext.test"] == "bounced" and statuses["gina@ext.test"] == "sent"  # a delay changes no status


@needs_corpus
async def test_corpus_bounces_through_the_inbound_listener(relay, sink):
    from test_crm import alice_with_log_key, start
    await start(relay, inbound=True, users=alice_with_log_key(relay))
    plans, cases, seen = [], [], set()
    for name in CORPUS_BOUNCES:
        raw = crlf((CORPUS / name).read_bytes())
        permanent, temporary = flufl(raw)
        b = bounces.parse(raw)
        if not (permanent or temporary):
            continue
        mid = f"<{b.message_ids[0]}>" if b and b.message_ids else None
        cases.append((name, raw, mid, permanent, temporary))
        if (mid, frozenset(permanent | temporary)) not in seen:
            seen.add((mid, frozenset(permanent | temporary)))
            plans.append((mid, sorted(permanent | temporary)))
    await _send_all(relay, plans)
    for name, raw, *_ in cases:
        await inbound_send(relay, raw)
    got = await _bounce_events(relay)
    stored = {addr: mid for mid, addr in await relay.rows("SELECT m.message_id, r.address FROM recipients r "
                                                          "JOIN messages m ON m.id = r.message_pk")}
    for name, raw, mid, permanent, temporary in cases:
        if mid is None:  # no Message-ID of ours and no reference: no proof, nothing recorded (issue 20)
            assert not got.get(stored[sorted(permanent | temporary)[0]]), name
            continue
        assert {(a, k) for a, k, _ in got.get(mid, set())} == \
            {(a, "bounced") for a in permanent} | {(a, "deferred") for a in temporary}, name
    assert await relay.rows("SELECT id FROM logged_emails WHERE direction = 'incoming'") == []


async def test_auto_replies_record_a_machine_reply_and_no_inferred_open(relay, sink):
    from test_crm import alice_with_log_key, start
    await start(relay, inbound=True, users=alice_with_log_key(relay))
    await _send_all(relay, [(e["in_reply_to"], ["carol@ext.test"]) for e in AUTO_EXPECTED.values()])
    for name in sorted(AUTO_EXPECTED):
        await inbound_send(relay, (AUTOREPLIES / f"{name}.eml").read_bytes(), mail_from="carol@ext.test")
    rows = await relay.rows("SELECT m.message_id, e.type, e.classification, e.reason FROM events e "
                            "JOIN messages m ON m.id = e.message_pk WHERE e.type IN ('replied', 'opened')")
    by_mid: dict[str, set[str]] = {}
    machine: dict[str, set[tuple[str, bool]]] = {}
    for mid, kind, cls, reason in rows:
        if cls == "human":
            by_mid.setdefault(mid, set()).add(kind)
        else:  # what was recognised is stored with the event: a machine replied (issue 21)
            machine.setdefault(mid, set()).add((kind, (reason or "").startswith("auto_reply:")))
    for name, e in AUTO_EXPECTED.items():
        assert by_mid.get(e["in_reply_to"], set()) == (set() if e["automatic"] else {"replied", "opened"}), name
        assert machine.get(e["in_reply_to"], set()) == ({("replied", True)} if e["automatic"] else set()), name


async def test_mail_from_system_senders_or_the_null_sender_makes_no_contact(relay, sink):
    from test_crm import alice_with_log_key, start
    await start(relay, inbound=True, users=alice_with_log_key(relay))
    await inbound_send(relay, b"From: postmaster@ext.test\r\nTo: alice@example.com\r\nSubject: Your server\r\n\r\n"
                              b"Hello, your SPF record is wrong.\r\n", mail_from="postmaster@ext.test")
    await inbound_send(relay, b"From: Dora <dora@ext.test>\r\nTo: alice@example.com\r\nSubject: Away\r\n\r\n"
                              b"I am away.\r\n", mail_from="")
    await inbound_send(relay, b'From: "neko....nyaan"@example.org\r\nTo: alice@example.com\r\nSubject: Hi\r\n\r\n'
                              b"Hello.\r\n", mail_from='"neko....nyaan"@example.org')
    contacts = {c for (c,) in await relay.rows("SELECT email FROM contacts")}
    assert contacts == {'"neko....nyaan"@example.org'}


async def test_inbound_listener_accepts_lines_over_1000_octets(relay, sink):
    from test_crm import alice_with_log_key, start
    await start(relay, inbound=True, users=alice_with_log_key(relay))
    long_line = b"x" * 20000
    await inbound_send(relay, b"From: Erin <erin@ext.test>\r\nTo: alice@example.com\r\nSubject: Long\r\n\r\n"
                              + long_line + b"\r\n", mail_from="erin@ext.test")
    assert len(await relay.rows("SELECT id FROM logged_emails WHERE direction = 'incoming'")) == 1
    assert max(map(len, (BOUNCES / "microsoft365_ndr_html_one_long_line.eml").read_bytes().split(b"\r\n"))) > 1000
