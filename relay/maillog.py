"""The mail log: one line per event of a message on the ``trackrelay.mail`` logger, greppable by
the queue id of the ``250 … queued as N`` reply, as Postfix's maillog is (accepted, each delivery
attempt, bounced, DSN sent). Recipient addresses as ``log.recipients`` says ("full", "domain" —
``<*@ext.test>`` — or "none"); a Never Log recipient's address is never written."""

from __future__ import annotations

import logging
import re

from core.config import Config

log = logging.getLogger("trackrelay.mail")

_ADDRESS = re.compile(r"[^\s<>()\[\]\"',;:@]+@(\[[^\]\s]*\]|[^\s<>()\[\]\"',;:@]+)")


def recipients_mode(config: Config) -> str:
    """``log.recipients``: "full", "domain" (the default) or "none"."""
    mode = config.log.recipients
    return mode if mode in ("full", "domain", "none") else "domain"


def shown(address: str, mode: str) -> str:
    """An address as the mail log may show it."""
    if mode == "full":
        return f"<{address}>"
    if mode == "domain" and "@" in address:
        return f"<*@{address.rpartition('@')[2]}>"
    return "<*>"


def masked(text: str, mode: str) -> str:
    """Text (an upstream reply, an exception's message) with every address in it shown as ``mode``."""
    if mode == "full" or "@" not in text:
        return text
    return _ADDRESS.sub(lambda m: shown(m.group(0), mode)[1:-1], text)


def quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ") + '"'


def error(exc: BaseException, mode: str = "domain") -> str:
    """An exception for a log line: its class and its message (addresses in it masked), short."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {masked(text, mode)[:300]}" if text else type(exc).__name__
