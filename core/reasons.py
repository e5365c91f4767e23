"""The policy's reasons: why a recipient's copy is (not) tracked or logged.

The audit trail of every decision: ``relay.policy``'s rules return them, ``recipients.reasons``
stores them (the strings below, exactly), and the API and the pages show them
(``tracker_http.pages`` has words for each member). Here, in the shared bottom, because both sides
read them.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a rule decided what it did (the strings stored in ``recipients.reasons``)."""

    #: X-Track: opens — only opens are tracked.
    X_TRACK_OPENS = "x_track:opens"
    #: X-Track: clicks — only clicks are tracked.
    X_TRACK_CLICKS = "x_track:clicks"
    #: X-Track: opens, clicks — both are tracked.
    X_TRACK_OPENS_CLICKS = "x_track:opens,clicks"
    #: X-Track: none — nothing is tracked.
    X_TRACK_NONE = "x_track:none"
    #: The X-Track header was not understood: the defaults apply.
    X_TRACK_INVALID = "x_track_invalid"
    #: No X-Track choice, and tracking.default_opens and default_clicks are both off.
    DEFAULT_UNTRACKED = "default_untracked"
    #: X-Log: yes — logged to the CRM.
    X_LOG_YES = "x_log:yes"
    #: X-Log: no — not logged.
    X_LOG_NO = "x_log:no"
    #: Logged: the mail was also sent to the log address (relay.log_bcc_address, or a user's
    #: inbound log address).
    LOG_BCC = "log_bcc"
    #: No X-Log choice, no log address, and crm.default_log is off: not logged.
    DEFAULT_UNLOGGED = "default_unlogged"
    #: tracking.allow = false: nothing is tracked, whatever the headers say.
    TRACKING_DISABLED = "tracking_disabled"
    #: The contact is marked do_not_track: never tracked.
    DO_NOT_TRACK = "do_not_track"
    #: privacy.gdpr: not an existing contact with an accepted legal basis, so not tracked.
    GDPR_NO_BASIS = "gdpr_no_basis"
    #: On the team's or the user's Never Log list: not logged (still delivered and tracked).
    NEVER_LOG = "never_log"
    #: One of the users' own addresses: neither tracked nor logged.
    OWN_ADDRESS = "own_address"
    #: A colleague (an internal domain): neither tracked nor logged.
    INTERNAL = "internal"
    #: Logged, but crm.create_contacts = false: logged only to a contact that already exists.
    CREATE_CONTACTS_OFF = "create_contacts_off"
    #: Logged, but from MAILER-DAEMON, postmaster or the null sender: such a sender never becomes a
    #: contact (an existing one still gets the mail).
    SYSTEM_SENDER = "system_sender"
