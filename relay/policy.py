"""Who is tracked and who is logged, address by address: a table of small named rules.

Each rule looks at the message's facts and the decision so far (without changing it) and either
has no say (None) or returns a ``Verdict``: the settings it decides (track, log, …) and the
``Reason`` why, when there is one worth recording. ``decide`` applies a table of rules in order,
making each verdict's settings and collecting the reasons in that order. The reasons are stored
with the recipient (``recipients.reasons``): they are the audit trail of why someone was or was
not tracked or logged, shown by the API and the message page. Decisions are made once, at
acceptance.

Two tables: ``RULES`` for each recipient of a submitted message (``relay.smtp``), and
``INBOUND_RULES`` for the sender of mail to a log address (``relay.inbound``), which is never
tracked: the same rules, those that concern logging.

Pure: no I/O.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from core import idn
from core.config import Config
from core.neverlog import matches
from core.reasons import Reason


#: The X-Track reason of each (opens, clicks) choice.
X_TRACK_REASONS = {(True, False): Reason.X_TRACK_OPENS, (False, True): Reason.X_TRACK_CLICKS,
                   (True, True): Reason.X_TRACK_OPENS_CLICKS, (False, False): Reason.X_TRACK_NONE}


@dataclass(frozen=True)
class ContactFacts:
    legal_basis: str | None
    do_not_track: bool


@dataclass(frozen=True)
class MessageFacts:
    """What the rules need to know about the message as a whole."""

    user_addresses: frozenset[str]
    internal_domains: frozenset[str]
    x_track: str | None  # raw header value, or None
    x_log: str | None
    log_bcc: bool  # the sender added relay.log_bcc_address (inbound: the mail came to a log address)
    sender: str = ""  # the envelope sender (inbound: the sender of the incoming mail)
    #: Existing contacts among the recipients (lower-cased address -> facts), read at acceptance.
    contacts: dict[str, ContactFacts] = field(default_factory=dict)
    never_log_team: frozenset[str] = frozenset()
    never_log_personal: frozenset[str] = frozenset()
    team_addresses: frozenset[str] = frozenset()
    #: Inbound: the mail is from MAILER-DAEMON, postmaster or the null sender (``core.mailaddr.is_system``).
    system_sender: bool = False


@dataclass(slots=True)
class Decision:
    """What is done with one address: built by ``decide`` from the rules' verdicts (rules read the
    decision so far; they never change it)."""

    address: str
    track_opens: bool = False
    track_clicks: bool = False
    log: bool = False
    #: The reasons, in the order of the rules that gave them.
    reasons: list[Reason] = field(default_factory=list)
    token: str | None = None
    never_log: bool = False
    #: A logged address without a contact gets one (``relay.crm.write_logged_email``).
    create_contacts: bool = True

    @property
    def tracked(self) -> bool:
        return self.track_opens or self.track_clicks


class Verdict(NamedTuple):
    """What one rule decides: the settings it makes (None: left as they are) and why (None:
    nothing worth recording)."""

    reason: Reason | None
    track_opens: bool | None = None
    track_clicks: bool | None = None
    log: bool | None = None
    never_log: bool | None = None
    create_contacts: bool | None = None


Rule = Callable[[Config, MessageFacts, Decision], "Verdict | None"]


def x_track_choice(facts: MessageFacts) -> tuple[bool, bool] | None:
    """(opens, clicks) chosen by X-Track; None when absent or not understood."""
    return None if facts.x_track is None else parse_x_track(facts.x_track)


def x_log_choice(facts: MessageFacts) -> str | None:
    """``yes`` or ``no`` chosen by X-Log; None when absent or not understood."""
    return None if facts.x_log is None else _parse_x_log(facts.x_log)


@functools.lru_cache(maxsize=256)
def _parse_x_log(value: str) -> str | None:
    x_log = value.strip().lower()
    return x_log if x_log in ("yes", "no") else None


@functools.lru_cache(maxsize=256)
def parse_x_track(value: str) -> tuple[bool, bool] | None:
    words = {w.strip().lower() for w in value.split(",") if w.strip()}
    if words == {"none"}:
        return False, False
    if words and words <= {"opens", "clicks"}:
        return "opens" in words, "clicks" in words
    return None


def _untrack(reason: Reason) -> Verdict:
    return Verdict(reason, track_opens=False, track_clicks=False)


#: The verdicts the rules give (built once: a rule allocates nothing).
X_TRACK = {(o, c): Verdict(reason, track_opens=o, track_clicks=c) for (o, c), reason in X_TRACK_REASONS.items()}
X_TRACK_INVALID = Verdict(Reason.X_TRACK_INVALID)
DEFAULT_TRACKING = {(o, c): Verdict(None if o or c else Reason.DEFAULT_UNTRACKED, track_opens=o, track_clicks=c)
                    for o in (False, True) for c in (False, True)}
X_LOG = {"yes": Verdict(Reason.X_LOG_YES, log=True), "no": Verdict(Reason.X_LOG_NO, log=False)}
LOG_BCC = Verdict(Reason.LOG_BCC, log=True)
DEFAULT_LOG = {True: Verdict(None, log=True), False: Verdict(Reason.DEFAULT_UNLOGGED, log=False)}
TRACKING_DISABLED = _untrack(Reason.TRACKING_DISABLED)
DO_NOT_TRACK = _untrack(Reason.DO_NOT_TRACK)
GDPR_NO_BASIS = _untrack(Reason.GDPR_NO_BASIS)
NEVER_LOG = Verdict(Reason.NEVER_LOG, log=False, never_log=True)
INTERNAL = {r: Verdict(r, track_opens=False, track_clicks=False, log=False)
            for r in (Reason.OWN_ADDRESS, Reason.INTERNAL)}
NO_NEW_CONTACTS = {(r, logged): Verdict(r if logged else None, create_contacts=False)
                   for r in (Reason.CREATE_CONTACTS_OFF, Reason.SYSTEM_SENDER) for logged in (False, True)}


# -- the rules ----------------------------------------------------------------------------------

def rule_x_track(config: Config, facts: MessageFacts, d: Decision) -> Verdict | None:
    """X-Track chooses opens and/or clicks (or none); a header not understood is noted."""
    choice = x_track_choice(facts)
    if choice is not None:
        return X_TRACK[choice]
    if facts.x_track is not None:
        return X_TRACK_INVALID
    return None


def rule_default_tracking(config: Config, facts: MessageFacts, d: Decision) -> Verdict | None:
    """Without an X-Track choice, tracking.default_opens and default_clicks."""
    if x_track_choice(facts) is not None:
        return None
    return DEFAULT_TRACKING[config.tracking.default_opens, config.tracking.default_clicks]


def rule_x_log(config: Config, facts: MessageFacts, d: Decision) -> Verdict | None:
    """X-Log: yes or no."""
    choice = x_log_choice(facts)
    return None if choice is None else X_LOG[choice]


def rule_log_bcc(config: Config, facts: MessageFacts, d: Decision) -> Verdict | None:
    """Without an X-Log choice, mail also sent to the log address is logged."""
    if x_log_choice(facts) is not None or not facts.log_bcc:
        return None
    return LOG_BCC


def rule_default_log(config: Config, facts: MessageFacts, d: Decision) -> Verdict | None:
    """Without an X-Log choice or the log address, crm.default_log."""
    if x_log_choice(facts) is not None or facts.log_bcc:
        return None
    return DEFAULT_LOG[config.crm.default_log]


def rule_admin_switch(config: Config, facts: MessageFacts, d: Decision) -> Verdict | None:
    """tracking.allow = false: nothing is tracked, whatever the headers say."""
    return None if config.tracking.allow else TRACKING_DISABLED


def rule_do_not_track(config: Config, facts: MessageFacts, d: Decision) -> Verdict | None:
    """A contact marked do_not_track is never tracked, whatever else is set."""
    contact = facts.contacts.get(d.address.lower())
    return DO_NOT_TRACK if contact is not None and contact.do_not_track else None


def rule_gdpr_basis(config: Config, facts: MessageFacts, d: Decision) -> Verdict | None:
    """Under privacy.gdpr only existing contacts with an accepted legal basis are tracked."""
    if not config.privacy.gdpr or not d.tracked:
        return None
    contact = facts.contacts.get(d.address.lower())
    if contact is not None and contact.legal_basis in config.privacy.tracking_bases:
        return None
    return GDPR_NO_BASIS


def rule_never_log(config: Config, facts: MessageFacts, d: Decision) -> Verdict | None:
    """Team and personal Never Log lists: not logged (still delivered and tracked). Mail from or to
    a team address ignores the lists."""
    if facts.sender.lower() in facts.team_addresses or d.address.lower() in facts.team_addresses:
        return None
    if matches(d.address, facts.never_log_team) or matches(d.address, facts.never_log_personal):
        return NEVER_LOG
    return None


def rule_internal(config: Config, facts: MessageFacts, d: Decision) -> Verdict | None:
    """Colleagues and the users' own addresses are neither tracked nor logged. Domains compare in
    their IDNA 2008 ASCII form (``x@straße.de`` is ``x@xn--strae-oqa.de``, not ``x@strasse.de``)."""
    addr = idn.address_key(d.address)
    if addr in _address_keys(facts.user_addresses):
        return INTERNAL[Reason.OWN_ADDRESS]
    if addr.rpartition("@")[2] in _domain_keys(facts.internal_domains):
        return INTERNAL[Reason.INTERNAL]
    return None


@functools.lru_cache(maxsize=64)
def _address_keys(addresses: frozenset[str]) -> frozenset[str]:
    return frozenset(map(idn.address_key, addresses))


@functools.lru_cache(maxsize=64)
def _domain_keys(domains: frozenset[str]) -> frozenset[str]:
    return frozenset(map(idn.domain_key, domains))


def rule_create_contacts(config: Config, facts: MessageFacts, d: Decision) -> Verdict | None:
    """A logged address that is no contact yet becomes one, unless crm.create_contacts = false or
    the mail is from a system sender (bounces and the null sender never become contacts). The
    reason is recorded only for a logged address (for the others it changes nothing)."""
    if not config.crm.create_contacts:
        return NO_NEW_CONTACTS[Reason.CREATE_CONTACTS_OFF, d.log]
    if facts.system_sender:
        return NO_NEW_CONTACTS[Reason.SYSTEM_SENDER, d.log]
    return None


#: The rules for each recipient of a submitted message, in order; later rules may only take away
#: what earlier ones gave (the reasons are stored in this order).
RULES: tuple[Rule, ...] = (
    rule_x_track,
    rule_default_tracking,
    rule_x_log,
    rule_log_bcc,
    rule_default_log,
    rule_admin_switch,
    rule_do_not_track,
    rule_gdpr_basis,
    rule_never_log,
    rule_internal,
    rule_create_contacts,
)

#: The rules for the sender of mail to a user's log address (never tracked): logged (the log
#: address), unless on a Never Log list or internal; a contact created unless the sender is a
#: system sender or creation is off.
INBOUND_RULES: tuple[Rule, ...] = (
    rule_log_bcc,
    rule_never_log,
    rule_internal,
    rule_create_contacts,
)


def mint_token() -> str:
    """160 random bits, URL-safe; reveals nothing about the recipient."""
    return secrets.token_urlsafe(20)


def apply(rules: tuple[Rule, ...] | list[Rule], config: Config, facts: MessageFacts, d: Decision) -> Decision:
    """``d`` after these rules, in order: each verdict's settings made, its reason appended."""
    for rule in rules:
        verdict = rule(config, facts, d)
        if verdict is None:
            continue
        reason, opens, clicks, log, never_log, create = verdict
        if opens is not None:
            d.track_opens = opens
        if clicks is not None:
            d.track_clicks = clicks
        if log is not None:
            d.log = log
        if never_log is not None:
            d.never_log = never_log
        if create is not None:
            d.create_contacts = create
        if reason is not None:
            d.reasons.append(reason)
    return d


def decide(config: Config, facts: MessageFacts, address: str,
           rules: tuple[Rule, ...] | list[Rule] = RULES) -> Decision:
    """What is done with ``address``: the rules applied, their reasons, and a token when tracked."""
    d = apply(rules, config, facts, Decision(address=address))
    if d.tracked:
        d.token = mint_token()
    return d
