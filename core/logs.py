"""Logging to standard error, as text lines or JSON, per the [log] section.

Nothing we log carries a token, a password or a recipient address: aiosmtpd's per-envelope INFO
lines are filtered in relay.smtp, and aiohttp's access log is not enabled.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from core.config import LogSection


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _NoBadRequestTracebacks(logging.Filter):
    """aiohttp logs every malformed HTTP request with a traceback; it already answered 400."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            from aiohttp.http_exceptions import HttpProcessingError
            return not isinstance(record.exc_info[1], HttpProcessingError)
        return True


def setup(cfg: LogSection) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if cfg.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.level.upper())
    for noisy in ("aiosqlite", "asyncio", "alembic", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_NoBadRequestTracebacks())
