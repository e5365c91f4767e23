"""The policy rules (``relay.policy``), each on its own: no SMTP, no database.

One test per rule, calling the rule alone with the facts and the decision so far it looks at; then
the tables applied in full (``decide``) on representative cases, with the decisions and reasons the
rules gave before they became a table (the reasons stored with recipients are unchanged)."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from core.config import Config
from relay import policy
from relay.policy import ContactFacts, Decision, MessageFacts, Reason, Verdict


def config(**sections) -> Config:
    """The default config with some settings changed: ``config(tracking={"allow": False})``."""
    c = Config()
    return dataclasses.replace(c, **{name: dataclasses.replace(getattr(c, name), **values)
                                     for name, values in sections.items()})


def facts(**kw) -> MessageFacts:
    base = dict(user_addresses=frozenset({"alice@example.com"}), internal_domains=frozenset({"example.com"}),
                x_track=None, x_log=None, log_bcc=False, sender="alice@example.com")
    return MessageFacts(**{**base, **kw})


def so_far(address: str = "carol@ext.test", **kw) -> Decision:
    return Decision(address=address, **kw)


def ruled(rule, c: Config, f: MessageFacts, d: Decision) -> Verdict | None:
    """The rule's verdict; the decision it was given is left as it was."""
    before = copy.deepcopy(d)
    verdict = rule(c, f, d)
    assert d == before, f"{rule.__name__} changed the decision it was given"
    assert verdict is None or isinstance(verdict, Verdict)
    return verdict


TRACKED = dict(track_opens=True, track_clicks=True)


def test_rule_x_track():
    c, d = config(), so_far()
    assert ruled(policy.rule_x_track, c, facts(), d) is None
    assert ruled(policy.rule_x_track, c, facts(x_track="opens"), d) == \
        Verdict(Reason.X_TRACK_OPENS, track_opens=True, track_clicks=False)
    assert ruled(policy.rule_x_track, c, facts(x_track=" Clicks "), d) == \
        Verdict(Reason.X_TRACK_CLICKS, track_opens=False, track_clicks=True)
    assert ruled(policy.rule_x_track, c, facts(x_track="clicks, opens"), d) == \
        Verdict(Reason.X_TRACK_OPENS_CLICKS, track_opens=True, track_clicks=True)
    assert ruled(policy.rule_x_track, c, facts(x_track="none"), d) == \
        Verdict(Reason.X_TRACK_NONE, track_opens=False, track_clicks=False)
    for bad in ("", "all", "opens, none"):
        assert ruled(policy.rule_x_track, c, facts(x_track=bad), d) == Verdict(Reason.X_TRACK_INVALID), bad


def test_rule_default_tracking():
    d = so_far()
    assert ruled(policy.rule_default_tracking, config(), facts(), d) == \
        Verdict(None, track_opens=True, track_clicks=True)
    assert ruled(policy.rule_default_tracking, config(tracking={"default_clicks": False}), facts(), d) == \
        Verdict(None, track_opens=True, track_clicks=False)
    off = config(tracking={"default_opens": False, "default_clicks": False})
    assert ruled(policy.rule_default_tracking, off, facts(), d) == \
        Verdict(Reason.DEFAULT_UNTRACKED, track_opens=False, track_clicks=False)
    assert ruled(policy.rule_default_tracking, off, facts(x_track="bogus"), d) == \
        Verdict(Reason.DEFAULT_UNTRACKED, track_opens=False, track_clicks=False)
    assert ruled(policy.rule_default_tracking, off, facts(x_track="opens"), d) is None  # X-Track chose


def test_rule_x_log():
    c, d = config(), so_far()
    assert ruled(policy.rule_x_log, c, facts(), d) is None
    assert ruled(policy.rule_x_log, c, facts(x_log=" Yes "), d) == Verdict(Reason.X_LOG_YES, log=True)
    assert ruled(policy.rule_x_log, c, facts(x_log="no", log_bcc=True), d) == Verdict(Reason.X_LOG_NO, log=False)
    assert ruled(policy.rule_x_log, c, facts(x_log="maybe"), d) is None


def test_rule_log_bcc():
    c, d = config(), so_far()
    assert ruled(policy.rule_log_bcc, c, facts(log_bcc=True), d) == Verdict(Reason.LOG_BCC, log=True)
    assert ruled(policy.rule_log_bcc, c, facts(log_bcc=True, x_log="maybe"), d) == Verdict(Reason.LOG_BCC, log=True)
    assert ruled(policy.rule_log_bcc, c, facts(log_bcc=True, x_log="no"), d) is None  # X-Log chose
    assert ruled(policy.rule_log_bcc, c, facts(), d) is None


def test_rule_default_log():
    d = so_far()
    assert ruled(policy.rule_default_log, config(), facts(), d) == Verdict(None, log=True)
    unlogged = config(crm={"default_log": False})
    assert ruled(policy.rule_default_log, unlogged, facts(), d) == Verdict(Reason.DEFAULT_UNLOGGED, log=False)
    assert ruled(policy.rule_default_log, unlogged, facts(x_log="yes"), d) is None
    assert ruled(policy.rule_default_log, unlogged, facts(log_bcc=True), d) is None


def test_rule_admin_switch():
    f = facts(x_track="opens,clicks")
    assert ruled(policy.rule_admin_switch, config(), f, so_far(**TRACKED)) is None
    off = config(tracking={"allow": False})
    untracked = Verdict(Reason.TRACKING_DISABLED, track_opens=False, track_clicks=False)
    assert ruled(policy.rule_admin_switch, off, f, so_far(**TRACKED)) == untracked
    assert ruled(policy.rule_admin_switch, off, f, so_far()) == untracked  # noted even when nothing was tracked


def test_rule_do_not_track():
    c = config()
    f = facts(contacts={"carol@ext.test": ContactFacts("consent", True), "dan@ext.test": ContactFacts(None, False)})
    untracked = Verdict(Reason.DO_NOT_TRACK, track_opens=False, track_clicks=False)
    assert ruled(policy.rule_do_not_track, c, f, so_far("Carol@Ext.test", **TRACKED)) == untracked
    assert ruled(policy.rule_do_not_track, c, f, so_far("carol@ext.test")) == untracked
    assert ruled(policy.rule_do_not_track, c, f, so_far("dan@ext.test", **TRACKED)) is None
    assert ruled(policy.rule_do_not_track, c, f, so_far("erin@ext.test", **TRACKED)) is None


def test_rule_gdpr_basis():
    f = facts(contacts={"carol@ext.test": ContactFacts("consent", False),
                        "dan@ext.test": ContactFacts("contract", False)})
    gdpr = config(privacy={"gdpr": True})
    untracked = Verdict(Reason.GDPR_NO_BASIS, track_opens=False, track_clicks=False)
    assert ruled(policy.rule_gdpr_basis, gdpr, f, so_far("carol@ext.test", **TRACKED)) is None
    assert ruled(policy.rule_gdpr_basis, gdpr, f, so_far("dan@ext.test", **TRACKED)) == untracked
    assert ruled(policy.rule_gdpr_basis, gdpr, f, so_far("erin@ext.test", track_opens=True)) == untracked
    assert ruled(policy.rule_gdpr_basis, gdpr, f, so_far("erin@ext.test")) is None  # nothing to take away
    assert ruled(policy.rule_gdpr_basis, config(), f, so_far("erin@ext.test", **TRACKED)) is None
    both = config(privacy={"gdpr": True, "tracking_bases": ("consent", "contract")})
    assert ruled(policy.rule_gdpr_basis, both, f, so_far("dan@ext.test", **TRACKED)) is None


def test_rule_never_log():
    c = config()
    f = facts(never_log_team=frozenset({"*@blocked.test"}), never_log_personal=frozenset({"carol@ext.test"}),
              team_addresses=frozenset({"sales@ext.test"}))
    never = Verdict(Reason.NEVER_LOG, log=False, never_log=True)
    assert ruled(policy.rule_never_log, c, f, so_far("x@blocked.test", log=True)) == never
    assert ruled(policy.rule_never_log, c, f, so_far("Carol@Ext.test")) == never
    assert ruled(policy.rule_never_log, c, f, so_far("dan@ext.test", log=True)) is None
    # mail to or from a team address ignores the lists
    assert ruled(policy.rule_never_log, c, dataclasses.replace(f, team_addresses=frozenset({"carol@ext.test"})),
                 so_far("carol@ext.test", log=True)) is None
    assert ruled(policy.rule_never_log, c, dataclasses.replace(f, sender="Sales@ext.test"),
                 so_far("x@blocked.test", log=True)) is None


def test_rule_internal():
    c = config()
    f = facts(user_addresses=frozenset({"alice@example.com", "jörg@xn--bcher-kva.example"}),
              internal_domains=frozenset({"example.com", "xn--bcher-kva.example"}))
    own = Verdict(Reason.OWN_ADDRESS, track_opens=False, track_clicks=False, log=False)
    internal = Verdict(Reason.INTERNAL, track_opens=False, track_clicks=False, log=False)
    assert ruled(policy.rule_internal, c, f, so_far("Alice@Example.com", log=True, **TRACKED)) == own
    assert ruled(policy.rule_internal, c, f, so_far("Jörg@Bücher.example")) == own
    assert ruled(policy.rule_internal, c, f, so_far("bob@example.com", log=True)) == internal
    assert ruled(policy.rule_internal, c, f, so_far("someone@bücher.example")) == internal
    assert ruled(policy.rule_internal, c, f, so_far("carol@ext.test", log=True)) is None


def test_rule_create_contacts():
    f, system = facts(), facts(system_sender=True)
    assert ruled(policy.rule_create_contacts, config(), f, so_far(log=True)) is None
    off = config(crm={"create_contacts": False})
    assert ruled(policy.rule_create_contacts, off, f, so_far(log=True)) == \
        Verdict(Reason.CREATE_CONTACTS_OFF, create_contacts=False)
    assert ruled(policy.rule_create_contacts, config(), system, so_far(log=True)) == \
        Verdict(Reason.SYSTEM_SENDER, create_contacts=False)
    assert ruled(policy.rule_create_contacts, off, system, so_far(log=True)) == \
        Verdict(Reason.CREATE_CONTACTS_OFF, create_contacts=False)
    # not logged: no contact either way, nothing worth recording
    assert ruled(policy.rule_create_contacts, off, f, so_far()) == Verdict(None, create_contacts=False)


def test_every_rule_has_a_test_and_a_place_in_a_table():
    rules = {name for name in dir(policy) if name.startswith("rule_")}
    assert rules == {f"rule_{n[len('test_rule_'):]}" for n in globals() if n.startswith("test_rule_")}
    assert rules == {r.__name__ for r in policy.RULES + policy.INBOUND_RULES}
    assert set(policy.INBOUND_RULES) <= set(policy.RULES)


def test_every_reason_is_documented_and_keeps_its_stored_string():
    import inspect
    lines = [line.strip() for line in inspect.getsource(Reason).splitlines()]
    for member in Reason:
        i = next(i for i, line in enumerate(lines) if line.startswith(f"{member.name} = "))
        while lines[i - 1].startswith("#") and not lines[i - 1].startswith("#:"):
            i -= 1
        assert lines[i - 1].startswith("#:"), f"{member.name} has no #: comment"
    assert {str(r) for r in Reason} >= {
        "x_track:opens", "x_track:clicks", "x_track:opens,clicks", "x_track:none", "x_track_invalid",
        "default_untracked", "x_log:yes", "x_log:no", "log_bcc", "default_unlogged", "tracking_disabled",
        "do_not_track", "gdpr_no_basis", "never_log", "own_address", "internal"}


#: (config sections, facts, address) -> (opens, clicks, log, never_log, reasons) as ``decide`` gave
#: them before the rules became a table (``create_contacts`` then left no reason: the cases with
#: crm.create_contacts = false gain its reason at the end and nothing else).
CONTACTS = {"dnt@ext.test": ContactFacts("consent", True), "ok@ext.test": ContactFacts("consent", False)}
CASES = [
    ({}, {}, "carol@ext.test", (True, True, True, False, [])),
    ({}, {"x_track": "opens", "x_log": "no"}, "carol@ext.test", (True, False, False, False, ["x_track:opens", "x_log:no"])),
    ({}, {"x_track": "bogus"}, "carol@ext.test", (True, True, True, False, ["x_track_invalid"])),
    ({"tracking": {"default_opens": False, "default_clicks": False}, "crm": {"default_log": False}},
     {"x_track": "bogus"}, "carol@ext.test",
     (False, False, False, False, ["x_track_invalid", "default_untracked", "default_unlogged"])),
    ({"tracking": {"allow": False}}, {"x_track": "none", "log_bcc": True}, "carol@ext.test",
     (False, False, True, False, ["x_track:none", "log_bcc", "tracking_disabled"])),
    ({"privacy": {"gdpr": True}}, {"contacts": CONTACTS}, "dnt@ext.test",
     (False, False, True, False, ["do_not_track"])),
    ({"privacy": {"gdpr": True}}, {"contacts": CONTACTS}, "ok@ext.test", (True, True, True, False, [])),
    ({"privacy": {"gdpr": True}}, {"contacts": CONTACTS}, "carol@ext.test",
     (False, False, True, False, ["gdpr_no_basis"])),
    ({"tracking": {"allow": False}, "privacy": {"gdpr": True}}, {"contacts": CONTACTS, "x_log": "yes",
                                                                 "never_log_team": frozenset({"*@ext.test"})},
     "dnt@ext.test", (False, False, False, True, ["x_log:yes", "tracking_disabled", "do_not_track", "never_log"])),
    ({}, {"never_log_personal": frozenset({"*@example.com"})}, "bob@example.com",
     (False, False, False, True, ["never_log", "internal"])),
    ({}, {}, "Alice@Example.com", (False, False, False, False, ["own_address"])),
    ({"crm": {"create_contacts": False}}, {}, "carol@ext.test",
     (True, True, True, False, ["create_contacts_off"])),
    ({"crm": {"create_contacts": False, "default_log": False}}, {}, "carol@ext.test",
     (True, True, False, False, ["default_unlogged"])),
]


@pytest.mark.parametrize("sections, kw, address, expected", CASES)
def test_the_table_in_full_decides_as_before(sections, kw, address, expected):
    d = policy.decide(config(**sections), facts(**kw), address)
    assert (d.track_opens, d.track_clicks, d.log, d.never_log, d.reasons) == expected
    assert all(type(r) is Reason for r in d.reasons)
    assert (d.token is not None) == d.tracked and d.address == address
    assert d.create_contacts == config(**sections).crm.create_contacts


def test_the_inbound_table():
    """The sender of mail to a log address: logged, never tracked, unless a rule says otherwise."""
    c = config()
    inbound = dict(log_bcc=True, team_addresses=frozenset({"sales@ext.test"}),
                   never_log_team=frozenset({"*@blocked.test"}))

    def decide(address, **kw):
        d = policy.decide(c if "config" not in kw else kw.pop("config"), facts(sender=address, **{**inbound, **kw}),
                          address, policy.INBOUND_RULES)
        assert not d.tracked and d.token is None
        return d.log, d.never_log, d.create_contacts, d.reasons

    assert decide("carol@ext.test") == (True, False, True, ["log_bcc"])
    assert decide("x@blocked.test") == (False, True, True, ["log_bcc", "never_log"])
    assert decide("sales@ext.test", never_log_team=frozenset({"*@ext.test"})) == (True, False, True, ["log_bcc"])
    assert decide("bob@example.com") == (False, False, True, ["log_bcc", "internal"])
    assert decide("alice@example.com") == (False, False, True, ["log_bcc", "own_address"])
    assert decide("mailer-daemon@ext.test", system_sender=True) == (True, False, False, ["log_bcc", "system_sender"])
    assert decide("carol@ext.test", config=config(crm={"create_contacts": False})) == \
        (True, False, False, ["log_bcc", "create_contacts_off"])


def test_every_reason_has_words_on_the_pages():
    """The reasons stored with a recipient are its audit trail: the message page says each in words."""
    from tracker_http.pages import recipient_reason_words

    for reason in Reason:
        words = recipient_reason_words(reason)
        assert words and words != reason.value.replace("_", " "), reason
