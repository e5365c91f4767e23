"""Configuration: one typed, immutable object loaded once from TOML and passed in.

Every key of SPEC §2 has a safe default. An unknown key, a wrong type or a bad value raises
ConfigError whose message is one line naming the file, the key and what is wrong. Secrets may be
given inline or as ``<key>_env`` naming an environment variable.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A configuration problem; str() is one line naming file and key."""

    def __init__(self, source: str, key: str, problem: str):
        self.source, self.key, self.problem = source, key, problem
        super().__init__(f"{source}: {key}: {problem}")


GDPR_BASES = (
    "consent",
    "contract",
    "legal_obligation",
    "vital_interests",
    "public_task",
    "legitimate_interests",
)


@dataclass(frozen=True)
class RelaySection:
    listen: str = "127.0.0.1:2525"
    inbound_listen: str | None = None
    hostname: str = ""  # filled with the machine's FQDN when empty
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    allow_plaintext_auth: bool = False
    max_message_bytes: int = 104857600
    max_recipients: int = 100
    max_line_octets: int = 65536
    auth_max_failures: int = 5
    auth_max_failures_network: int = 20
    auth_backoff_seconds: float = 60.0
    auth_backoff_max_seconds: float = 3600.0
    log_bcc_address: str = ""  # log@<hostname> when empty


@dataclass(frozen=True)
class UpstreamSection:
    url: str = "maildir://./outbox"
    starttls: bool = True
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_seconds: float = 60.0
    max_connections: int = 4
    max_messages_per_minute: int = 0


@dataclass(frozen=True)
class QueueSection:
    retry_initial_seconds: float = 60.0
    retry_max_seconds: float = 3600.0
    max_age_hours: float = 120.0
    lease_seconds: float = 300.0
    dsn_from: str = ""
    keep_delivered_days: float = 7.0


@dataclass(frozen=True)
class TrackerSection:
    listen: str = "127.0.0.1:8080"
    public_url: str = "http://127.0.0.1:8080"
    secret_keys: tuple[str, ...] = field(default=(), repr=False)
    trusted_proxies: tuple[str, ...] = ()
    writer_process: bool = True
    #: ``tracker refresh-apple-ranges``: Apple's own network (AS714), whose OPENS are Mail
    #: Privacy Protection's prefetch, as RIPEstat JSON or one network a line…
    apple_mpp_ranges_url: str = "https://stat.ripe.net/data/announced-prefixes/data.json?resource=AS714"
    #: …and the iCloud Private Relay egress CSV (people browsing: never machine by address).
    apple_private_relay_ranges_url: str = "https://mask-api.icloud.com/egress-ip-ranges.csv"


@dataclass(frozen=True)
class ApiSection:
    listen: str = "127.0.0.1:8081"
    public_url: str = ""  # where people open the pages; https makes the session cookie Secure
    login_max_failures: int = 5
    login_max_failures_network: int = 20
    login_backoff_seconds: float = 60.0
    login_backoff_max_seconds: float = 3600.0
    session_idle_seconds: float = 14400.0
    session_max_seconds: float = 43200.0
    tls_cert_file: str | None = None  # with tls_key_file: the API and pages over https
    tls_key_file: str | None = None


@dataclass(frozen=True)
class StorageSection:
    url: str = "sqlite+aiosqlite:///./trackrelay.db"


@dataclass(frozen=True)
class TrackingSection:
    allow: bool = True
    default_opens: bool = True
    default_clicks: bool = True
    skip_url_text_links: bool = True
    pixel_position: str = "top"
    scanner_window_seconds: float = 10.0
    internal_domains: tuple[str, ...] | None = None  # None: the domains of all users' addresses


@dataclass(frozen=True)
class CrmSection:
    default_log: bool = True
    log_attachments: bool = True
    max_attachment_bytes: int = 52428800
    create_contacts: bool = True
    team_addresses: tuple[str, ...] = ()
    free_mail_domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class PrivacySection:
    gdpr: bool = False
    tracking_bases: tuple[str, ...] = ("consent",)
    store_ip: str = "truncated"
    event_retention_days: float = 0.0


@dataclass(frozen=True)
class NeverLogSection:
    team: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricsSection:
    #: HOST:PORT of this process's /metrics, /readyz and /healthz; "" = none (serve --metrics-listen
    #: overrides it: each `serve --only` process on one host needs a port of its own).
    listen: str = ""


@dataclass(frozen=True)
class LogSection:
    level: str = "info"
    format: str = "text"
    recipients: str = "domain"


@dataclass(frozen=True)
class User:
    name: str = ""
    password_hash: str = field(default="", repr=False)
    addresses: tuple[str, ...] = ()
    api_token_hash: str | None = field(default=None, repr=False)
    admin: bool = False
    log_key: str | None = field(default=None, repr=False)
    never_log: tuple[str, ...] = ()
    #: IANA zone for the pages (e.g. "America/New_York"); None: the browser's, else UTC.
    time_zone: str | None = None


@dataclass(frozen=True)
class Webhook:
    url: str = ""
    secret: str = field(default="", repr=False)
    events: tuple[str, ...] = ()  # empty: all
    retry_initial_seconds: float = 10.0


@dataclass(frozen=True)
class DkimKey:
    domain: str = ""
    selector: str = ""
    private_key_file: str = ""


@dataclass(frozen=True)
class Config:
    source: str = "<defaults>"
    relay: RelaySection = RelaySection()
    upstream: UpstreamSection = UpstreamSection()
    queue: QueueSection = QueueSection()
    tracker: TrackerSection = TrackerSection()
    api: ApiSection = ApiSection()
    storage: StorageSection = StorageSection()
    tracking: TrackingSection = TrackingSection()
    crm: CrmSection = CrmSection()
    privacy: PrivacySection = PrivacySection()
    never_log: NeverLogSection = NeverLogSection()
    log: LogSection = LogSection()
    metrics: MetricsSection = MetricsSection()
    users: tuple[User, ...] = ()
    webhooks: tuple[Webhook, ...] = ()
    dkim: tuple[DkimKey, ...] = ()

    # -- derived views ---------------------------------------------------------------------------

    def user(self, name: str) -> User | None:
        for u in self.users:
            if u.name == name:
                return u
        return None

    def user_for_address(self, address: str) -> User | None:
        address = address.lower()
        for u in self.users:
            if address in (a.lower() for a in u.addresses):
                return u
        return None

    @property
    def user_addresses(self) -> frozenset[str]:
        return frozenset(a.lower() for u in self.users for a in u.addresses)

    @property
    def internal_domains(self) -> frozenset[str]:
        """In the form core.idn.domain_key gives (IDNA 2008 ASCII): compare an address's
        domain by its domain_key too, so ``straße.de`` is ``xn--strae-oqa.de`` and not ``strasse.de``."""
        from core.idn import domain_key
        if self.tracking.internal_domains is not None:
            return frozenset(domain_key(d) for d in self.tracking.internal_domains)
        return frozenset(domain_key(a.rpartition("@")[2]) for a in self.user_addresses)

    @property
    def log_bcc_address(self) -> str:
        return (self.relay.log_bcc_address or f"log@{self.relay.hostname}").lower()


SECTIONS: dict[str, type] = {
    "relay": RelaySection,
    "upstream": UpstreamSection,
    "queue": QueueSection,
    "tracker": TrackerSection,
    "api": ApiSection,
    "storage": StorageSection,
    "tracking": TrackingSection,
    "crm": CrmSection,
    "privacy": PrivacySection,
    "never_log": NeverLogSection,
    "log": LogSection,
    "metrics": MetricsSection,
}
TABLE_ARRAYS: dict[str, type] = {"users": User, "webhooks": Webhook, "dkim": DkimKey}
SECRET_KEYS = {"upstream.password", "tracker.secret_keys", "webhooks.secret"}
REQUIRED = {
    "users": ("name", "password_hash"),
    "webhooks": ("url", "secret"),
    "dkim": ("domain", "selector", "private_key_file"),
}


def load(path: str | os.PathLike[str] | None, env: typing.Mapping[str, str] | None = None) -> Config:
    """Load and validate a config file; None gives the built-in defaults."""
    env = os.environ if env is None else env
    if path is None:
        return from_dict({}, "<defaults>", env)
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(source, "-", "file not found") from None
    except OSError as e:
        raise ConfigError(source, "-", f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "-", f"not valid TOML: {e}") from None
    return from_dict(data, source, env)


def locate(explicit: str | None, env: typing.Mapping[str, str] | None = None) -> str | None:
    """The config file the CLI uses: -c, else $TRACKRELAY_CONFIG, else ./trackrelay.toml."""
    env = os.environ if env is None else env
    if explicit:
        return explicit
    if env.get("TRACKRELAY_CONFIG"):
        return env["TRACKRELAY_CONFIG"]
    if Path("trackrelay.toml").exists():
        return "trackrelay.toml"
    return None


def from_dict(data: dict[str, Any], source: str, env: typing.Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    values: dict[str, Any] = {"source": source}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(source, key, "must be a table")
            values[key] = _section(SECTIONS[key], value, key, source, env)
        elif key in TABLE_ARRAYS:
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(source, key, f"must be an array of tables ([[{key}]])")
            items = []
            for i, item in enumerate(value):
                where = f"{key}[{i}]"
                for req in REQUIRED[key]:
                    if req not in item and f"{req}_env" not in item:
                        raise ConfigError(source, f"{where}.{req}", "is required")
                items.append(_section(TABLE_ARRAYS[key], item, where, source, env, secret_prefix=key))
            values[key] = tuple(items)
        else:
            raise ConfigError(source, key, "unknown key")
    config = Config(**values)
    if not config.relay.hostname:
        config = dataclasses.replace(config, relay=dataclasses.replace(config.relay, hostname=_fqdn()))
    _validate(config, source)
    return config


def _fqdn() -> str:
    return socket.getfqdn() or "localhost"


def _section(cls: type, raw: dict[str, Any], prefix: str, source: str,
             env: typing.Mapping[str, str], secret_prefix: str | None = None) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        qual = f"{prefix}.{key}"
        secret_name = f"{secret_prefix or prefix}.{key[:-4]}"
        if key.endswith("_env") and key[:-4] in known and secret_name in SECRET_KEYS:
            if not isinstance(value, str):
                raise ConfigError(source, qual, "must be the name of an environment variable")
            if value not in env:
                raise ConfigError(source, qual, f"environment variable {value} is not set")
            secret = env[value]
            if hints[key[:-4]] == tuple[str, ...]:
                secret = [s.strip() for s in secret.split(",") if s.strip()]
            out[key[:-4]] = _coerce(hints[key[:-4]], secret, f"{prefix}.{key[:-4]}", source)
            continue
        if key not in known:
            raise ConfigError(source, qual, "unknown key")
        out[key] = _coerce(hints[key], value, qual, source)
    return cls(**out)


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(inner, value, key, source)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {_tname(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected an integer, got {_tname(value)}")
        if value < 0:
            raise ConfigError(source, key, "must not be negative")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"expected a number, got {_tname(value)}")
        if value < 0:
            raise ConfigError(source, key, "must not be negative")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {_tname(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(source, key, "expected a list of strings")
        return tuple(value)
    raise AssertionError(f"unhandled type {hint!r}")  # pragma: no cover


def _tname(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError("expected host:port")
    host = host.strip("[]")
    p = int(port)
    if not 0 <= p <= 65535:
        raise ValueError("port out of range")
    return host, p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _validate(c: Config, src: str) -> None:
    def bad(key: str, problem: str) -> None:
        raise ConfigError(src, key, problem)

    for key, value in (("relay.listen", c.relay.listen), ("tracker.listen", c.tracker.listen),
                       ("api.listen", c.api.listen), ("relay.inbound_listen", c.relay.inbound_listen),
                       ("metrics.listen", c.metrics.listen or None)):
        if value is None:
            continue
        try:
            parse_hostport(value)
        except ValueError as e:
            bad(key, f"{e}, got {value!r}")
    if c.metrics.listen and parse_hostport(c.metrics.listen) in {
            parse_hostport(v) for v in (c.relay.listen, c.tracker.listen, c.api.listen, c.relay.inbound_listen) if v}:
        bad("metrics.listen", f"{c.metrics.listen!r} is already another listener's address")
    for section in ("relay", "api"):
        sec = getattr(c, section)
        if bool(sec.tls_cert_file) != bool(sec.tls_key_file):
            bad(f"{section}.tls_key_file" if sec.tls_cert_file else f"{section}.tls_cert_file",
                "tls_cert_file and tls_key_file go together")
        for key in ("tls_cert_file", "tls_key_file"):
            path = getattr(sec, key)
            if path and not Path(path).is_file():
                bad(f"{section}.{key}", f"no such file: {path}")
    host, _ = parse_hostport(c.relay.listen)
    if not c.relay.tls_cert_file and not is_loopback(host) and not c.relay.allow_plaintext_auth:
        bad("relay.listen", "AUTH without TLS on a non-loopback address: set relay.tls_cert_file "
            "and relay.tls_key_file, or relay.allow_plaintext_auth = true")
    if c.relay.max_recipients < 1:
        bad("relay.max_recipients", "must be at least 1")
    if not 998 <= c.relay.max_line_octets <= 1048576:
        bad("relay.max_line_octets", "must be between 998 (RFC 5322's limit) and 1048576")
    if c.relay.max_message_bytes < 1024:
        bad("relay.max_message_bytes", "must be at least 1024")
    scheme = urlsplit(c.upstream.url).scheme
    if scheme not in ("smtp", "smtps", "maildir"):
        bad("upstream.url", f"scheme must be smtp, smtps or maildir, got {c.upstream.url!r}")
    if scheme in ("smtp", "smtps"):
        parts = urlsplit(c.upstream.url)
        if not parts.hostname:
            bad("upstream.url", "needs a host, as smtp://host:port")
        try:
            parts.port
        except ValueError:
            bad("upstream.url", "bad port")
    if c.upstream.max_connections < 1:
        bad("upstream.max_connections", "must be at least 1")
    if c.upstream.username and c.upstream.password is None:
        bad("upstream.password", "is required when upstream.username is set (or upstream.password_env)")
    if c.queue.retry_initial_seconds <= 0:
        bad("queue.retry_initial_seconds", "must be positive")
    if c.queue.retry_max_seconds < c.queue.retry_initial_seconds:
        bad("queue.retry_max_seconds", "must be at least queue.retry_initial_seconds")
    if c.queue.lease_seconds < 5:
        bad("queue.lease_seconds", "must be at least 5")
    pu = urlsplit(c.tracker.public_url)
    if pu.scheme not in ("http", "https") or not pu.hostname:
        bad("tracker.public_url", f"must be an http(s) URL, got {c.tracker.public_url!r}")
    if c.api.public_url:
        au = urlsplit(c.api.public_url)
        if au.scheme not in ("http", "https") or not au.hostname:
            bad("api.public_url", f"must be an http(s) URL, got {c.api.public_url!r}")
    for key, value in (("relay.auth_backoff_seconds", c.relay.auth_backoff_seconds),
                       ("api.login_backoff_seconds", c.api.login_backoff_seconds)):
        if value < 1:
            bad(key, "must be at least 1")
    if c.api.session_idle_seconds < 60:
        bad("api.session_idle_seconds", "must be at least 60")
    if c.api.session_max_seconds < c.api.session_idle_seconds:
        bad("api.session_max_seconds", "must be at least api.session_idle_seconds")
    for i, k in enumerate(c.tracker.secret_keys):
        if len(k) < 16:
            bad(f"tracker.secret_keys[{i}]", "must be at least 16 characters")
    for i, p in enumerate(c.tracker.trusted_proxies):
        try:
            ipaddress.ip_network(p, strict=False)
        except ValueError:
            bad(f"tracker.trusted_proxies[{i}]", f"not an IP address or network: {p!r}")
    for key in ("apple_mpp_ranges_url", "apple_private_relay_ranges_url"):
        u = urlsplit(getattr(c.tracker, key))
        if u.scheme not in ("http", "https") or not u.hostname:
            bad(f"tracker.{key}", f"must be an http(s) URL, got {getattr(c.tracker, key)!r}")
    if not c.storage.url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        bad("storage.url", "must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
    if c.tracking.pixel_position not in ("top", "bottom"):
        bad("tracking.pixel_position", f"must be top or bottom, got {c.tracking.pixel_position!r}")
    for i, b in enumerate(c.privacy.tracking_bases):
        if b not in GDPR_BASES:
            bad(f"privacy.tracking_bases[{i}]", f"unknown legal basis {b!r}; one of {', '.join(GDPR_BASES)}")
    if c.privacy.store_ip not in ("full", "truncated", "none"):
        bad("privacy.store_ip", f"must be full, truncated or none, got {c.privacy.store_ip!r}")
    if c.log.level.lower() not in ("debug", "info", "warning", "error"):
        bad("log.level", f"must be debug, info, warning or error, got {c.log.level!r}")
    if c.log.format not in ("text", "json"):
        bad("log.format", f"must be text or json, got {c.log.format!r}")
    if c.log.recipients not in ("full", "domain", "none"):
        bad("log.recipients", f"must be full, domain or none, got {c.log.recipients!r}")
    names: set[str] = set()
    log_keys: dict[str, str] = {}
    for i, u in enumerate(c.users):
        where = f"users[{i}]"
        if not u.name:
            bad(f"{where}.name", "must not be empty")
        if u.name in names:
            bad(f"{where}.name", f"duplicate user name {u.name!r}")
        names.add(u.name)
        from core.passwords import hash_problem
        problem = hash_problem(u.password_hash)
        if problem:
            bad(f"{where}.password_hash", problem)
        if u.api_token_hash is not None and not (
                u.api_token_hash.startswith("sha256:") and len(u.api_token_hash) == 71):
            bad(f"{where}.api_token_hash", "must be sha256:<64 hex digits> from `trackrelay new-token`")
        if u.log_key is not None:
            from core.logkeys import problem as log_key_problem
            key_problem = log_key_problem(u.log_key)
            if key_problem:
                bad(f"{where}.log_key", key_problem)
            if u.log_key in log_keys:
                bad(f"{where}.log_key", f"the same as the log key of user {log_keys[u.log_key]!r}: every user needs their own")
            log_keys[u.log_key] = u.name
        for j, a in enumerate(u.addresses):
            if a.count("@") != 1 or not a.split("@")[0] or "." not in a.split("@")[1]:
                bad(f"{where}.addresses[{j}]", f"not an email address: {a!r}")
        if u.time_zone is not None:
            from zoneinfo import ZoneInfo
            try:
                ZoneInfo(u.time_zone)
            except (ValueError, KeyError, OSError):
                bad(f"{where}.time_zone", f"not an IANA time zone name (like Europe/Berlin): {u.time_zone!r}")
    from core.neverlog import MAX_ENTRIES, EntryError, normalise_entry
    for key, entries in [("never_log.team", c.never_log.team)] + [
            (f"users[{i}].never_log", u.never_log) for i, u in enumerate(c.users)]:
        if len(entries) > MAX_ENTRIES:
            bad(key, f"at most {MAX_ENTRIES} entries, got {len(entries)}")
        for j, e in enumerate(entries):
            try:
                normalise_entry(e)
            except EntryError as err:
                bad(f"{key}[{j}]", str(err))
    for i, w in enumerate(c.webhooks):
        if urlsplit(w.url).scheme not in ("http", "https"):
            bad(f"webhooks[{i}].url", "must be an http(s) URL")
    for i, d in enumerate(c.dkim):
        if not Path(d.private_key_file).is_file():
            bad(f"dkim[{i}].private_key_file", f"no such file: {d.private_key_file}")


def warnings_for(c: Config) -> list[str]:
    """Risky but valid combinations: said at start and by check-config."""
    out = []
    if "." not in c.relay.hostname:
        out.append(f"relay.hostname {c.relay.hostname!r} has no dot: set a fully qualified name")
    host, _ = parse_hostport(c.relay.listen)
    if c.relay.allow_plaintext_auth and not c.relay.tls_cert_file and not is_loopback(host):
        out.append("relay.allow_plaintext_auth: passwords cross the network in clear text")
    pu = urlsplit(c.tracker.public_url)
    if urlsplit(c.upstream.url).scheme != "maildir" and (
            pu.scheme == "http" or is_loopback(pu.hostname or "")):
        out.append(f"tracker.public_url {c.tracker.public_url!r} is loopback or plain http while "
                   "mail goes to a real upstream: recipients' opens and clicks will not reach it")
    from core.passwords import EXAMPLE_PASSWORD_HASH
    from core.passwords import needs_rehash
    for u in c.users:
        if u.password_hash == EXAMPLE_PASSWORD_HASH:
            out.append(f"user {u.name!r} still has the example password from config.example.toml: change it")
        elif needs_rehash(u.password_hash):
            kind = "scrypt" if u.password_hash.startswith("scrypt$") else "Argon2 with weaker parameters"
            out.append(f"user {u.name!r}: password_hash is {kind}: due for rehash as Argon2id "
                       "(`trackrelay hash-password`)")
    return out
