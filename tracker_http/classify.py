"""Is an open or click a human reading, a machine (privacy proxy, link scanner) or the sender?

Pure: facts in, (classification, reason) out. Rules are tried in order; the first that fires wins:
first those that look only at the request (``request_verdict``), then those about its time and
company (``timing_verdict``) — the recorder asks the second only when the first has no answer.
"""

from __future__ import annotations

import re
from functools import lru_cache

from core.events import Classification

HUMAN, MACHINE, SELF = Classification.HUMAN, Classification.MACHINE, Classification.SELF

#: Link scanners and prefetchers by user agent (security gateways, previewers, HTTP libraries).
SCANNER_AGENTS = re.compile(
    r"Microsoft Office Protocol Discovery|BingPreview|SafeLinks|Mimecast|Proofpoint|urldefense|"
    r"Barracuda|Symantec|MessageLabs|TrendMicro|Trend Micro|Forcepoint|Sophos|FireEye|Cisco|IronPort|"
    r"Zscaler|Fortinet|FortiGuard|Palo ?Alto|Check ?Point|Avanan|Abnormal|Darktrace|Cloudmark|"
    r"HeadlessChrome|PhantomJS|python-requests|python-urllib|aiohttp|curl/|Wget|Go-http-client|"
    r"okhttp|Java/|libwww|Apache-HttpClient|facebookexternalhit|Slackbot|Twitterbot|Discordbot|"
    r"\bbot\b|crawler|spider|scanner", re.IGNORECASE)
#: Apple Mail Privacy Protection fetches with exactly this agent.
APPLE_MPP_AGENT = "Mozilla/5.0"
BURST_SECONDS = 2.0
SELF_WINDOW = 86400.0  # seconds


@lru_cache(maxsize=4096)
def is_scanner_agent(user_agent: str) -> bool:
    """Known scanners and HTTP libraries (the image proxies of Gmail and Yahoo are readers)."""
    if not user_agent or "GoogleImageProxy" in user_agent or "YahooMailProxy" in user_agent:
        return False
    return bool(SCANNER_AGENTS.search(user_agent))


@lru_cache(maxsize=8192)
def request_verdict(kind: str, method: str, user_agent: str, mpp_ip: bool) -> tuple[Classification, str] | None:
    """The rules that look only at the request (method, agent, Apple's addresses), in their order;
    None when none fires. Cached: a reader's or scanner's requests repeat these four.

    ``mpp_ip``: the address is in Apple's Mail Privacy Protection ranges (tracker_http.apple), which
    make an OPEN machine — Mail's proxy prefetches images, read or not. A click is never machine
    by an Apple address: whoever clicks is a person (iCloud Private Relay carries people's own
    browsing, and its ranges are no part of ``mpp_ip``)."""
    if method == "HEAD":
        return MACHINE, "head_request"
    if is_scanner_agent(user_agent):
        return MACHINE, "scanner_agent"
    if kind == "open" and (mpp_ip or user_agent.strip() == APPLE_MPP_AGENT):
        return MACHINE, "apple_privacy_proxy"
    return None


def timing_verdict(kind: str, ip: str, at: float, delivered_at: float, sender_ip: str | None,
                   accepted_at: float, burst: bool, signed_in_ip: bool,
                   scanner_window_seconds: float) -> tuple[Classification, str | None]:
    """The rules after the request's own (``request_verdict``): when, in what company, from whom."""
    if at - delivered_at < scanner_window_seconds:
        return MACHINE, "scanner_window"
    if kind == "click" and burst:
        return MACHINE, "click_burst"
    if sender_ip and ip == sender_ip and at - accepted_at < SELF_WINDOW:
        return SELF, "sender_ip"
    if signed_in_ip:
        return SELF, "signed_in_ip"
    return HUMAN, None


def warm_up() -> None:
    """Build ua-parser's global parser now: compiling its regexes takes ~130 ms, which on the
    event loop, at the first event's classification, would stall every request and SMTP session
    of the process (``Tracker.start`` calls this before it listens)."""
    import ua_parser
    ua_parser.parser  # noqa: B018 - the module's lazy __getattr__ builds it


@lru_cache(maxsize=4096)
def client_of(user_agent: str) -> str | None:
    """A short client name, e.g. "Gmail", "Outlook/Windows", "Apple Mail/iOS", "Chrome/Android"."""
    if not user_agent:
        return None
    if "GoogleImageProxy" in user_agent:
        return "Gmail"
    if "YahooMailProxy" in user_agent:
        return "Yahoo"
    if user_agent.strip() == APPLE_MPP_AGENT:
        return "Apple Mail Privacy Protection"
    try:
        from ua_parser import parse
        r = parse(user_agent)
    except Exception:
        return None
    family = r.user_agent.family if r.user_agent else None
    os = r.os.family if r.os else None
    if family in (None, "Other"):
        if "Outlook" in user_agent or "ms-office" in user_agent:
            family = "Outlook"
        elif "Thunderbird" in user_agent:
            family = "Thunderbird"
        elif "AppleWebKit" in user_agent and os in ("iOS", "Mac OS X", "macOS"):
            family = "Apple Mail"
    if family in ("Mobile Safari UI/WKWebView",) and os == "iOS":
        family = "Apple Mail"
    if family == "Apple Mail" or (family and family.startswith("Apple Mail")):
        family = "Apple Mail"
    if os in ("Mac OS X",):
        os = "macOS"
    if family in (None, "Other"):
        return os if os not in (None, "Other") else None
    return f"{family}/{os}" if os not in (None, "Other") else family
