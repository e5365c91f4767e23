"""Who is tracked and who is logged, recipient by recipient: an ordered table of small named rules.

Each rule looks at the message's facts and one recipient and may change the decision; whenever it
does, it adds a reason. The reasons are stored with the recipient: they are the audit trail of
why someone was or was not tracked or logged. Decisions are made once, at acceptance.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass, field
from typing import Callable

from core import idn
from core.config import Config
from core.neverlog import matches


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
    log_bcc: bool  # the sender added relay.log_bcc_address
    sender: str = ""  # the envelope sender
    #: Existing contacts among the recipients (lower-cased address -> facts), read at acceptance.
    contacts: dict[str, ContactFacts] = field(default_factory=dict)
    never_log_team: frozenset[str] = frozenset()
    never_log_personal: frozenset[str] = frozenset()
    team_addresses: frozenset[str] = frozenset()


@dataclass
class Decision:
    address: str
    track_opens: bool = False
    track_clicks: bool = False
    log: bool = False
    reasons: list[str] = field(default_factory=list)
    token: str | None = None
    never_log: bool = False

    @property
    def tracked(self) -> bool:
        return self.track_opens or self.track_clicks


Rule = Callable[[Config, MessageFacts, Decision], None]


def parse_x_track(value: str) -> tuple[bool, bool] | None:
    words = {w.strip().lower() for w in value.split(",") if w.strip()}
    if words == {"none"}:
        return False, False
    if words and words <= {"opens", "clicks"}:
        return "opens" in words, "clicks" in words
    return None


def rule_tracking_choice(config: Config, facts: MessageFacts, d: Decision) -> None:
    """X-Track, or the defaults, choose opens and/or clicks."""
    choice = parse_x_track(facts.x_track) if facts.x_track is not None else None
    if choice is not None:
        d.track_opens, d.track_clicks = choice
        d.reasons.append("x_track:" + (",".join(k for k, v in zip(("opens", "clicks"), choice) if v) or "none"))
    else:
        if facts.x_track is not None:
            d.reasons.append("x_track_invalid")
        d.track_opens, d.track_clicks = config.tracking.default_opens, config.tracking.default_clicks
        if not d.tracked:
            d.reasons.append("default_untracked")


def rule_logging_choice(config: Config, facts: MessageFacts, d: Decision) -> None:
    """X-Log, the BCC log address, or crm.default_log."""
    x_log = (facts.x_log or "").strip().lower()
    if x_log in ("yes", "no"):
        d.log = x_log == "yes"
        d.reasons.append(f"x_log:{x_log}")
    elif facts.log_bcc:
        d.log = True
        d.reasons.append("log_bcc")
    else:
        d.log = config.crm.default_log
        if not d.log:
            d.reasons.append("default_unlogged")


def rule_admin_switch(config: Config, facts: MessageFacts, d: Decision) -> None:
    """tracking.allow = false: nothing is tracked, whatever the headers say."""
    if not config.tracking.allow and d.tracked:
        d.track_opens = d.track_clicks = False
        d.reasons.append("tracking_disabled")
    elif not config.tracking.allow:
        d.reasons.append("tracking_disabled")


def rule_internal(config: Config, facts: MessageFacts, d: Decision) -> None:
    """Colleagues and the users' own addresses are neither tracked nor logged. Domains compare in
    their IDNA 2008 ASCII form (``x@straße.de`` is ``x@xn--strae-oqa.de``, not ``x@strasse.de``)."""
    addr = idn.address_key(d.address)
    if addr in _address_keys(facts.user_addresses):
        reason = "own_address"
    elif addr.rpartition("@")[2] in _domain_keys(facts.internal_domains):
        reason = "internal"
    else:
        return
    d.track_opens = d.track_clicks = d.log = False
    d.reasons.append(reason)


@functools.lru_cache(maxsize=64)
def _address_keys(addresses: frozenset[str]) -> frozenset[str]:
    return frozenset(map(idn.address_key, addresses))


@functools.lru_cache(maxsize=64)
def _domain_keys(domains: frozenset[str]) -> frozenset[str]:
    return frozenset(map(idn.domain_key, domains))


def rule_do_not_track(config: Config, facts: MessageFacts, d: Decision) -> None:
    """A contact marked do_not_track is never tracked, whatever else is set."""
    contact = facts.contacts.get(d.address.lower())
    if contact is not None and contact.do_not_track:
        if d.tracked:
            d.track_opens = d.track_clicks = False
        d.reasons.append("do_not_track")


def rule_gdpr_basis(config: Config, facts: MessageFacts, d: Decision) -> None:
    """Under privacy.gdpr only existing contacts with an accepted legal basis are tracked."""
    if not config.privacy.gdpr or not d.tracked:
        return
    contact = facts.contacts.get(d.address.lower())
    if contact is None or contact.legal_basis not in config.privacy.tracking_bases:
        d.track_opens = d.track_clicks = False
        d.reasons.append("gdpr_no_basis")


def rule_never_log(config: Config, facts: MessageFacts, d: Decision) -> None:
    """Team and personal Never Log lists: not logged (still delivered and tracked). Mail from or to
    a team address ignores the lists."""
    if facts.sender.lower() in facts.team_addresses or d.address.lower() in facts.team_addresses:
        return
    if matches(d.address, facts.never_log_team) or matches(d.address, facts.never_log_personal):
        d.never_log = True
        if d.log:
            d.log = False
        d.reasons.append("never_log")


#: The rules in order; later rules may only take away what earlier ones gave.
RULES: list[Rule] = [
    rule_tracking_choice,
    rule_logging_choice,
    rule_admin_switch,
    rule_do_not_track,
    rule_gdpr_basis,
    rule_never_log,
    rule_internal,
]


def mint_token() -> str:
    """160 random bits, URL-safe; reveals nothing about the recipient."""
    return secrets.token_urlsafe(20)


def decide(config: Config, facts: MessageFacts, address: str, rules: list[Rule] = RULES) -> Decision:
    d = Decision(address=address)
    for rule in rules:
        rule(config, facts, d)
    if d.tracked:
        d.token = mint_token()
    return d
