"""The ``trackrelay`` command. Errors go to stderr as one line: exit 2 for usage (and for a
command that needs a config file when none was found), 1 for failures and for a command that
selected nothing.

``-c/--config`` goes before or after the command word. Commands that read the database never
change its schema: only ``db upgrade`` and ``serve`` migrate.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import getpass
import json
import logging
import os
import signal
import sys
from contextlib import asynccontextmanager
from datetime import datetime, timezone

from core import config as config_mod
from core.config import Config, ConfigError


class UsageError(Exception):
    pass


class Failure(Exception):
    pass


class NoConfig(Exception):
    """A command that needs a config file, and none was found: exit 2."""


class Nothing(Exception):
    """The command selected nothing: exit 1, one line on stderr."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2
        raise UsageError(message)


_CONFIG_HELP = "config file (default: $TRACKRELAY_CONFIG, else ./trackrelay.toml)"


def _common() -> argparse.ArgumentParser:
    """-c/--config after the command word (SUPPRESS: absent unless given, so a subcommand's
    parser never overwrites one given before the command word)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-c", "--config", default=argparse.SUPPRESS, metavar="FILE", help=_CONFIG_HELP)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("trackrelay")
    except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
        return "unknown"


def _epilog(*examples: str, note: str = "") -> str:
    text = "example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(f"  {e}" for e in examples)
    return text + (f"\n\n{note}" if note else "")


_ID_HELP = "a queue id: the message id of the 250 reply (ID), or ID.N for its Nth recipient's copy"


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    p = _Parser(prog="trackrelay", description="Self-hosted email tracking relay.",
                epilog=_epilog("trackrelay serve -c /etc/trackrelay/trackrelay.toml",
                               "trackrelay queue list -c /etc/trackrelay/trackrelay.toml",
                               note="Every command takes -c FILE before or after its name; "
                                    "`trackrelay COMMAND --help` tells more."))
    p.add_argument("-c", "--config", dest="config_before", metavar="FILE", help=_CONFIG_HELP)
    p.add_argument("--version", action="version", version=f"trackrelay {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def cmd(parent, name, help, *examples, note="", **kw):
        return parent.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                                 epilog=_epilog(*examples, note=note), parents=[common], **kw)

    s = cmd(sub, "serve", "run the relay, the delivery worker and the tracker (migrating the schema first)",
            "trackrelay serve -c /etc/trackrelay/trackrelay.toml",
            "trackrelay serve --only worker -c /etc/trackrelay/trackrelay.toml",
            note="SIGTERM stops it cleanly. --only needs PostgreSQL.")
    s.add_argument("--only", choices=("relay", "worker", "tracker"), help="run one role (needs PostgreSQL)")
    s.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve /metrics, /readyz and /healthz here (overrides metrics.listen; each "
                        "--only process on one host needs its own port)")
    cmd(sub, "check-config", "validate a config file and print every warning",
        "trackrelay check-config -c /etc/trackrelay/trackrelay.toml",
        note="Prints the path it checked; every error names the file and the key (exit 1).")

    db = cmd(sub, "db", "the database schema", "trackrelay db current -c FILE")
    dbs = db.add_subparsers(dest="action", required=True, parser_class=_Parser, metavar="ACTION")
    cmd(dbs, "upgrade", "apply the pending migrations", "trackrelay db upgrade -c /etc/trackrelay/trackrelay.toml",
        note="On PostgreSQL under an advisory lock, so it is safe while other processes start.")
    cmd(dbs, "current", "print the database's schema revision (exit 1 when an upgrade is due)",
        "trackrelay db current -c /etc/trackrelay/trackrelay.toml")
    cmd(dbs, "history", "list the migrations, marking the database's revision",
        "trackrelay db history -c /etc/trackrelay/trackrelay.toml")

    cmd(sub, "hash-password", "print the Argon2id hash of a password for [[users]] password_hash: on a terminal "
        "it asks twice without echo; from a pipe it reads one line",
        "echo 'their password' | trackrelay hash-password")
    cmd(sub, "new-token", "print a fresh API token and its api_token_hash", "trackrelay new-token")
    cmd(sub, "new-log-key", "print a fresh inbound log key (160 random bits) for [[users]] log_key",
        "trackrelay new-log-key", note="Mail to log+<log_key>@<relay.hostname> is logged for that user.")

    nl = cmd(sub, "never-log", "the Never Log lists (the team's, or a user's with --user)",
             "trackrelay never-log list -c FILE")
    nls = nl.add_subparsers(dest="action", required=True, parser_class=_Parser, metavar="ACTION")
    for action, help, ex in (("add", "add entries to a Never Log list", "trackrelay never-log add --user alice '*@lawyer.example' -c FILE"),
                             ("remove", "remove entries from a Never Log list", "trackrelay never-log remove ceo@client.example -c FILE"),
                             ("list", "print a Never Log list (config entries marked)", "trackrelay never-log list --user alice --json -c FILE")):
        a = cmd(nls, action, help, ex)
        a.add_argument("--user", help="a user's personal list (default: the team list)")
        if action == "list":
            a.add_argument("--json", action="store_true", help="print JSON")
        else:
            a.add_argument("entries", nargs="+", metavar="ENTRY", help="name@domain or *@domain")

    cp = cmd(sub, "contacts", "CRM contacts", "trackrelay contacts show carol@client.example -c FILE")
    cps = cp.add_subparsers(dest="action", required=True, parser_class=_Parser, metavar="ACTION")
    a = cmd(cps, "show", "print a contact", "trackrelay contacts show carol@client.example --json -c FILE")
    a.add_argument("email")
    a.add_argument("--json", action="store_true", help="print JSON")
    a = cmd(cps, "set-basis", "set a contact's GDPR legal basis (or none)",
            "trackrelay contacts set-basis carol@client.example consent -c FILE")
    a.add_argument("email")
    a.add_argument("basis", help="one of the six GDPR bases, or none")
    a = cmd(cps, "forget", "GDPR erase: the contact, its events and tracking data",
            "trackrelay contacts forget carol@client.example -c FILE")
    a.add_argument("email")

    fp = cmd(sub, "feed", "the activity feed in the terminal: recent messages, opens and clicks",
             "trackrelay feed --user alice -c FILE", "trackrelay feed --follow -c FILE")
    fp.add_argument("--user", help="one user's mail (default: everybody's)")
    fp.add_argument("--follow", action="store_true", help="keep printing new events as they happen")
    fp.add_argument("--limit", type=int, default=20, help="how many messages (default 20)")
    fp.add_argument("--json", action="store_true",
                    help="print the messages as a JSON array (with --follow, then one JSON event per line)")

    tp = cmd(sub, "tracker", "tracker data", "trackrelay tracker refresh-apple-ranges -c FILE")
    tps = tp.add_subparsers(dest="action", required=True, parser_class=_Parser, metavar="ACTION")
    a = cmd(tps, "refresh-apple-ranges",
            "download Apple's Mail Privacy Protection and iCloud Private Relay ranges to beside the database",
            "trackrelay tracker refresh-apple-ranges -c FILE",
            "trackrelay tracker refresh-apple-ranges --only relay --file egress-ip-ranges.csv -c FILE")
    a.add_argument("--only", choices=("mpp", "relay"),
                   help="refresh one list: mpp (Mail Privacy Protection, from tracker.apple_mpp_ranges_url) "
                        "or relay (iCloud Private Relay, from tracker.apple_private_relay_ranges_url); "
                        "default both")
    src = a.add_mutually_exclusive_group()
    src.add_argument("--url", help="download the list from here instead of its configured URL "
                                   "(the mpp list unless --only relay)")
    src.add_argument("--file", help="read the list from this file instead of downloading it "
                                    "(the mpp list unless --only relay)")

    qp = cmd(sub, "queue", "inspect and steer the delivery queue", "trackrelay queue list -c FILE",
             note="A message's id is the N of the relay's `250 2.0.0 OK: queued as N`; "
                  "N.K is the copy for its Kth recipient.")
    qps = qp.add_subparsers(dest="action", required=True, parser_class=_Parser, metavar="ACTION")
    queue_cmds = {
        "list": ("list messages waiting for delivery and their copies",
                 ("trackrelay queue list -c FILE", "trackrelay queue list --status deferred --older-than 2h --json -c FILE"),
                 "Without --status: copies queued, sending, deferred or held. Exit 1 when nothing matches."),
        "show": ("print one message: envelope, headers, each copy's plan, reasons and attempts",
                 ("trackrelay queue show 42 -c FILE",), ""),
        "retry": ("make waiting copies due now (none given: all queued and deferred ones)",
                  ("trackrelay queue retry 42 -c FILE", "trackrelay queue retry --status deferred -c FILE"), ""),
        "bounce": ("bounce waiting copies: the sender gets a DSN, as for a 5xx",
                   ("trackrelay queue bounce 42.2 -c FILE",),
                   "The worker writes the DSN at its next DSN pass (within 30 s)."),
        "delete": ("take waiting copies out of the queue for good, without a DSN",
                   ("trackrelay queue delete 42 -c FILE",),
                   "The copies become `deleted`; a message none of whose copies went anywhere is removed whole."),
        "hold": ("keep waiting copies out of delivery until released",
                 ("trackrelay queue hold 42 -c FILE", "trackrelay queue hold --user alice -c FILE"), ""),
        "release": ("put held copies back in the queue, due now",
                    ("trackrelay queue release 42 -c FILE",), ""),
    }
    for action, (help, examples, note) in queue_cmds.items():
        a = cmd(qps, action, help, *examples, note=note)
        a.add_argument("ids", nargs="+" if action == "show" else "*", metavar="ID", help=_ID_HELP)
        if action != "show":
            a.add_argument("--status", action="append", metavar="STATUS",
                           help="only copies in this status (repeatable): queued, sending, deferred, "
                                "held, sent, bounced or deleted")
            a.add_argument("--user", help="only messages sent by this user")
            a.add_argument("--older-than", metavar="AGE", help="only messages accepted longer ago (90s, 30m, 2h, 3d)")
        if action in ("list", "show"):
            a.add_argument("--json", action="store_true", help="print JSON")
    return p


def _config_path(args) -> str | None:
    after, before = getattr(args, "config", None), getattr(args, "config_before", None)
    if before and after and before != after:
        raise UsageError(f"two config files given: {before} and {after}")
    return config_mod.locate(after or before)


def _looked_for() -> str:
    env = os.environ.get("TRACKRELAY_CONFIG")
    return (f"-c FILE (not given), $TRACKRELAY_CONFIG ({'=' + env if env else 'unset'}), "
            f"{os.path.join(os.getcwd(), 'trackrelay.toml')} (absent)")


def _load(args, *, need_file: bool = True) -> Config:
    path = _config_path(args)
    if path is None and need_file:
        name = " ".join(x for x in (args.command, getattr(args, "action", None)) if x)
        raise NoConfig(f"`{name}` needs a config file and none was found: looked for {_looked_for()}")
    return config_mod.load(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, extra = build_parser().parse_known_args(argv)
        # argparse stops filling a trailing list of positionals at an option: `never-log add
        # --user NAME a@b c@d` leaves the entries over. They are entries all the same.
        if extra and getattr(args, "command", None) == "never-log" and hasattr(args, "entries") \
                and not any(x.startswith("-") for x in extra):
            args.entries += extra
        elif extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as e:
        print(f"trackrelay: {e}", file=sys.stderr)
        return 2
    try:
        return _dispatch(args)
    except ConfigError as e:
        print(f"trackrelay: config error: {e}", file=sys.stderr)
        return 1
    except (UsageError, NoConfig) as e:
        print(f"trackrelay: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (Failure, Nothing) as e:
        print(f"trackrelay: {e}", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    if args.command == "hash-password":
        return _hash_password()
    if args.command == "new-log-key":
        from core.logkeys import new_log_key
        print(f'log_key = "{new_log_key()}"')
        return 0
    if args.command == "new-token":
        from core.passwords import new_api_token
        token, digest = new_api_token()
        print(f"token: {token}")
        print(f'api_token_hash = "{digest}"')
        return 0
    if args.command == "serve":
        path = _config_path(args)
        if path is None:
            print(f"trackrelay: no config file found (looked for {_looked_for()}): "
                  "running on the built-in defaults", file=sys.stderr)
        return _serve(config_mod.load(path), args.only, args.metrics_listen)
    cfg = _load(args)
    if args.command == "check-config":
        for w in config_mod.warnings_for(cfg) + _apple_warnings(cfg):
            print(f"warning: {cfg.source}: {w}", file=sys.stderr)
        print(f"{os.path.abspath(cfg.source)}: OK")
        return 0
    if args.command == "db":
        return asyncio.run({"upgrade": _db_upgrade, "current": _db_current, "history": _db_history}[args.action](cfg))
    if args.command == "queue":
        return asyncio.run(_queue(cfg, args))
    if args.command == "never-log":
        return asyncio.run(_never_log(cfg, args.action, args.user, getattr(args, "entries", []),
                                      getattr(args, "json", False)))
    if args.command == "contacts":
        return asyncio.run(_contacts(cfg, args.action, args.email, getattr(args, "basis", None),
                                     getattr(args, "json", False)))
    if args.command == "feed":
        if args.user is not None and cfg.user(args.user) is None:
            raise UsageError(f"no user named {args.user!r} in {cfg.source}")
        return asyncio.run(_feed(cfg, args.user, args.follow, args.limit, args.json))
    if args.command == "tracker":
        only = args.only or ("mpp" if args.url or args.file else None)
        return asyncio.run(_refresh_apple(cfg, only, args.url, args.file))
    raise UsageError(f"unknown command {args.command}")  # pragma: no cover


def _apple_warnings(cfg: Config) -> list[str]:
    from tracker_http import apple
    stale = apple.stale_mpp_file(cfg)
    return [apple.stale_warning(stale)] if stale else []


def _hash_password() -> int:
    from core.passwords import hash_password
    if sys.stdin.isatty():
        pw = getpass.getpass("Password (not echoed): ")
        if getpass.getpass("Again: ") != pw:
            raise Failure("passwords differ")
    else:
        pw = sys.stdin.readline().rstrip("\r\n")
    if not pw:
        raise Failure("empty password")
    print(hash_password(pw))
    return 0


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


# -- the database, without migrating it ------------------------------------------------------------

_UPGRADE = "run `trackrelay db upgrade`"


@asynccontextmanager
async def _database(cfg: Config, *, write: bool = False):
    """A sessionmaker on the configured database, whose schema must be this trackrelay's: the
    command never creates the database nor migrates it. ``write=False``: read-only connections."""
    from sqlalchemy.exc import SQLAlchemyError

    from storage import admin
    from storage.engine import make_sessionmaker
    path = admin.sqlite_path(cfg.storage.url)
    if path is not None and not os.path.exists(path):
        raise Failure(f"no database at {os.path.abspath(path)} (storage.url of {cfg.source}): {_UPGRADE}")
    engine = admin.open_engine(cfg.storage.url, read_only=not write)
    try:
        try:
            state = await admin.schema_state(engine)
        except (OSError, SQLAlchemyError) as e:
            raise Failure(f"cannot read the database: {type(e).__name__}: {_first_line(e)}") from None
        if state.unknown:
            raise Failure(f"the database schema is at {', '.join(state.current)}, which this trackrelay "
                          f"({_version()}) does not know: upgrade trackrelay")
        if not state.up_to_date:
            raise Failure(f"the database schema is at {', '.join(state.current) or 'nothing (empty database)'}, "
                          f"this trackrelay needs {', '.join(state.heads)}: {_UPGRADE}")
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


async def _with_session(cfg: Config, fn, *, write: bool = False):
    async with _database(cfg, write=write) as sm:
        async with sm() as session:
            async with session.begin():
                return await fn(session)


async def _db_upgrade(cfg: Config) -> int:
    from storage import migrate
    from storage.engine import make_engine
    engine = make_engine(cfg.storage.url)
    try:
        print("upgrading the database schema…", file=sys.stderr)
        await migrate.upgrade(engine)
        print("database schema is up to date", file=sys.stderr)
    except Exception as e:
        raise Failure(f"database upgrade failed: {type(e).__name__}: {e}") from None
    finally:
        await engine.dispose()
    return 0


async def _schema(cfg: Config):
    """The database's schema state, or None when the SQLite file does not exist yet."""
    from sqlalchemy.exc import SQLAlchemyError

    from storage import admin
    path = admin.sqlite_path(cfg.storage.url)
    if path is not None and not os.path.exists(path):
        return None
    engine = admin.open_engine(cfg.storage.url, read_only=True)
    try:
        return await admin.schema_state(engine)
    except (OSError, SQLAlchemyError) as e:
        raise Failure(f"cannot read the database: {type(e).__name__}: {_first_line(e)}") from None
    finally:
        await engine.dispose()


async def _db_current(cfg: Config) -> int:
    state = await _schema(cfg)
    if state is None or not state.current:
        print("none (empty database)")
        raise Failure(f"the database has no schema yet: {_UPGRADE}")
    print(", ".join(state.current) + (" (head)" if state.up_to_date else ""))
    if state.unknown:
        raise Failure(f"revision {', '.join(state.unknown)} is newer than this trackrelay ({_version()})")
    if not state.up_to_date:
        raise Failure(f"the schema at {', '.join(state.current)} is behind (head is {', '.join(state.heads)}): "
                      f"{_UPGRADE}")
    return 0


async def _db_history(cfg: Config) -> int:
    from storage import admin
    state = await _schema(cfg)
    current = set(state.current) if state else set()
    for script in admin.revisions():
        marks = [m for m, on in (("head", script.is_head), ("current", script.revision in current)) if on]
        doc = (script.doc or "").strip().splitlines()[0] if script.doc else ""
        print(f"{script.revision}  {doc}" + (f"  ({', '.join(marks)})" if marks else ""))
    if state is None:
        print("(the database does not exist yet)", file=sys.stderr)
    return 0


# -- queue ---------------------------------------------------------------------------------------

def _age(seconds: float) -> str:
    s = int(max(0, seconds))
    for unit, size, sub_unit, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // sub_size
            return f"{s // size}{unit}" + (f"{rest}{sub_unit}" if rest else "")
    return f"{s}s"


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / 1048576:.1f} MB"


def _when(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t else None


def _filters(args, default: tuple[str, ...] | None):
    from storage import admin
    try:
        older = admin.parse_duration(args.older_than) if args.older_than else None
    except admin.SelectionError as e:
        raise UsageError(str(e)) from None
    statuses = tuple(dict.fromkeys(args.status)) if args.status else default
    unknown = [s for s in statuses or () if s not in admin.STATUSES]
    if unknown:
        raise UsageError(f"--status {unknown[0]}: not one of {', '.join(admin.STATUSES)}")
    return admin.Filters(statuses=statuses, user=args.user, older_than=older)


def _selectors(ids: list[str]):
    from storage import admin
    try:
        return [admin.parse_selector(i) for i in ids]
    except admin.SelectionError as e:
        raise UsageError(str(e)) from None


async def _queue(cfg: Config, args) -> int:
    from storage import admin
    action = args.action
    selectors = _selectors(args.ids)
    now = datetime.now(timezone.utc)
    if action == "show":
        return await _queue_show(cfg, selectors, args.json)
    if action == "list":
        filters = _filters(args, None if selectors and not args.status else admin.WAITING)
        return await _queue_list(cfg, filters, selectors, now, args.json)
    filters = _filters(args, None)
    if not selectors and filters == admin.Filters():
        if action != "retry":
            raise UsageError(f"queue {action} needs queue ids (ID or ID.N) or a filter "
                             "(--status, --user, --older-than)")
    if not selectors:  # by filter alone: only what the action can change
        eligible = admin.ACTS_ON[action]
        filters.statuses = tuple(s for s in (filters.statuses or eligible) if s in eligible)
        if not filters.statuses:
            raise UsageError(f"queue {action} acts on copies that are {' or '.join(admin.ACTS_ON[action])}")

    async def change(session):
        try:
            copies = await admin.select_copies(session, selectors, filters, now)
        except admin.SelectionError as e:
            raise Nothing(str(e)) from None
        ids = [c.id for c in copies]
        fn = getattr(admin, action)
        done = await fn(session, ids, now)
        removed: list[int] = []
        if action == "delete":
            done, removed = done
        return copies, set(done), removed

    copies, done, removed = await _with_session(cfg, change, write=True)
    past = {"retry": "due now", "bounce": "bounced", "delete": "deleted", "hold": "held", "release": "released"}[action]
    for c in copies:
        if c.id in done:
            print(f"{c.qid}\t{c.address}\t{past}")
        else:
            print(f"trackrelay: {c.qid} {c.address}: {c.status}, not {past}", file=sys.stderr)
    for pk in removed:
        print(f"{pk}\tmessage removed (no copy left)")
    n = len(done)
    if not n:
        raise Nothing(f"no copy {past}" + ("" if copies else ": nothing matches"))
    note = {"bounce": "; the senders get a DSN at the worker's next DSN pass (within 30 s)",
            "delete": "; no DSN", "retry": "; the worker takes them within a second"}.get(action, "")
    print(f"{n} {'copy' if n == 1 else 'copies'} {past}{note}", file=sys.stderr)
    return 0


async def _queue_list(cfg: Config, filters, selectors, now: datetime, as_json: bool) -> int:
    from storage import admin

    async def read(session):
        try:
            return await admin.list_queue(session, filters, now, selectors or None)
        except admin.SelectionError as e:
            raise Nothing(str(e)) from None
    messages = await _with_session(cfg, read)
    if as_json:
        _print_json([{
            "id": m.id, "kind": m.kind, "message_id": m.message_id, "user": m.user, "mail_from": m.mail_from,
            "subject": m.subject, "accepted_at": _iso(m.accepted_at),
            "age_seconds": round((now - m.accepted_at).total_seconds()), "size": m.size,
            "copies": [{"copy": c.qid, "address": c.address, "status": c.status, "tries": c.attempts,
                        "next_attempt_at": _iso(c.next_attempt_at) if c.status in ("queued", "deferred") else None,
                        "last_reply": c.last_reply} for c in m.copies],
        } for m in messages])
    else:
        for m in messages:
            print(f"{m.id}  {_when(m.accepted_at)}  age {_age((now - m.accepted_at).total_seconds())}  "
                  f"{_size(m.size)}  {m.user or '-'}  <{m.mail_from}>  {m.subject or '(no subject)'}"
                  + ("  [DSN]" if m.kind == "dsn" else ""))
            for c in m.copies:
                nxt = _when(c.next_attempt_at) if c.status in ("queued", "deferred") else "-"
                print(f"  {c.qid:<8} {c.status:<9} tries {c.attempts:<3} next {nxt:<19}  {c.address}"
                      + (f"  {c.last_reply}" if c.last_reply else ""))
    copies = sum(len(m.copies) for m in messages)
    if not messages:
        raise Nothing("no message in the queue matches")
    print(f"{len(messages)} messages, {copies} copies", file=sys.stderr)
    return 0


async def _queue_show(cfg: Config, selectors, as_json: bool) -> int:
    from storage import admin

    async def read(session):
        return [(pk, n, await admin.show(session, pk)) for pk, n in selectors]
    found = await _with_session(cfg, read)
    missing = [str(pk) for pk, _, item in found if item is None]
    items = []
    for pk, n, item in found:
        if item is None:
            continue
        if n is not None:
            if n > len(item["copies"]):
                missing.append(f"{pk}.{n}")
                continue
            item["copies"] = [item["copies"][n - 1]]
        items.append(item)
    if as_json:
        _print_json(items if len(selectors) > 1 else (items[0] if items else None))
    else:
        for item in items:
            _print_message(item)
    if missing:
        raise Nothing(f"no such message or copy: {', '.join(missing)}")
    return 0


def _print_message(m: dict) -> None:
    print(f"message {m['id']}" + (" (a DSN)" if m["kind"] == "dsn" else ""))
    for k in ("message_id", "user", "client_ip", "accepted_at", "size", "subject", "from", "done_at", "purged_at"):
        print(f"  {k}: {m[k] if m[k] not in (None, '') else '-'}")
    print(f"  envelope: MAIL FROM:<{m['envelope']['mail_from']}>")
    for r in m["envelope"]["rcpt_to"]:
        print(f"            RCPT TO:<{r}>")
    print("headers:" if m["headers"] is not None else "headers: - (spooled bytes purged)")
    for line in (m["headers"] or "").splitlines():
        print(f"  {line}")
    for c in m["copies"]:
        p = c["plan"]
        print(f"copy {c['copy']}: {c['address']}")
        print(f"  status: {c['status']}, tries {c['tries']}"
              + (f", next attempt {c['next_attempt_at']}" if c["next_attempt_at"] else "")
              + (f", sent {c['sent_at']}" if c["sent_at"] else "")
              + (f", leased by {c['lease_owner']} until {c['lease_until']}" if c["lease_owner"] else ""))
        print(f"  plan: opens {'tracked' if p['track_opens'] else 'not tracked'}, clicks "
              f"{'tracked' if p['track_clicks'] else 'not tracked'}, {'logged' if p['log'] else 'not logged'}"
              + (", on a Never Log list" if p["never_log"] else ""))
        print(f"  reasons: {', '.join(p['reasons']) or '-'}")
        for k in ("last_reply", "render_note"):
            if c[k]:
                print(f"  {k}: {c[k]}")
        if c["reclaims"]:
            print(f"  reclaims: {c['reclaims']} (each a possible duplicate delivery)")
        if c["dsn"] != "none":
            print(f"  dsn: {c['dsn']}")
        for a in c["attempts"]:
            print(f"  attempt {a['at']}  {a['outcome']:<8} {a['reply'] or ''}")


# -- never-log, contacts, feed, tracker ----------------------------------------------------------------

async def _never_log(cfg: Config, action: str, user: str | None, entries: list[str], as_json: bool = False) -> int:
    from storage import crm
    from core.neverlog import normalise_entry
    if user is not None and cfg.user(user) is None:
        raise UsageError(f"no user named {user!r} in {cfg.source}")
    scope, owner = ("user", user) if user else ("team", "")
    managed = tuple(normalise_entry(e) for e in (cfg.user(user).never_log if user else cfg.never_log.team))
    which = f"the list of {user}" if user else "the team list"
    if action == "list":
        async def read(session):
            return await crm.never_log_db_entries(session, scope, owner)
        db = await _with_session(cfg, read)
        rows = [(e, "config") for e in managed] + [(e, "database") for e in db if e not in managed]
        if as_json:
            _print_json({"scope": scope, "user": user, "entries": [{"entry": e, "source": s} for e, s in rows]})
        else:
            for e, s in rows:
                print(f"{e}\t(config)" if s == "config" else e)
        if not rows:
            raise Nothing(f"{which} is empty")
        print(f"{len(rows)} entries on {which}", file=sys.stderr)
        return 0
    if not entries:
        raise UsageError(f"never-log {action} needs one or more entries")

    async def change(session):
        return await crm.never_log_change(session, action=action, scope=scope, user=owner,
                                          raw_entries=entries, config_entries=managed)
    try:
        changed = await _with_session(cfg, change, write=True)
    except crm.NeverLogRefused as e:
        raise Failure(str(e)) from None
    print(f"{len(changed)} entries {'added' if action == 'add' else 'removed'}", file=sys.stderr)
    return 0


async def _contacts(cfg: Config, action: str, email: str, basis: str | None, as_json: bool = False) -> int:
    from storage import crm
    from core.config import GDPR_BASES
    email = email.strip().lower()
    if action == "show":
        async def show(session):
            c = await crm.get_contact(session, email)
            if c is None:
                raise Nothing(f"no contact {email}")
            domain = await crm.company_domain(session, c.company_pk)
            return {"email": c.email, "owner": c.owner, "company": domain, "legal_basis": c.legal_basis,
                    "do_not_track": c.do_not_track, "marketing": c.marketing,
                    "last_open_at": c.last_open_at, "last_click_at": c.last_click_at,
                    "last_engagement_at": c.last_engagement_at}
        data = await _with_session(cfg, show)
        if as_json:
            _print_json({k: _iso(v) if isinstance(v, datetime) else v for k, v in data.items()})
        else:
            for k, v in data.items():
                print(f"{k}: {v if v is not None else '-'}")
        return 0
    if action == "set-basis":
        if basis is None or (basis != "none" and basis not in GDPR_BASES):
            raise UsageError(f"set-basis needs one of: {', '.join(GDPR_BASES)}, none")

        async def set_basis(session):
            c = await crm.get_contact(session, email)
            if c is None:
                raise Nothing(f"no contact {email}")
            c.legal_basis = None if basis == "none" else basis
        await _with_session(cfg, set_basis, write=True)
        print(f"{email}: legal basis {basis}", file=sys.stderr)
        return 0

    async def forget(session):
        return await crm.erase_contact(session, email)
    if not await _with_session(cfg, forget, write=True):
        raise Nothing(f"no contact or tracking data for {email}")
    print(f"{email}: erased (contact, events, tracking data, sole-contact logged emails)", file=sys.stderr)
    return 0


def _feed_table(items: list[dict]) -> list[str]:
    def when(t):
        return t[:16].replace("T", " ") if t else "-"
    lines = [f"{'sent':<16}  {'subject':<28}  {'recipient':<30}  {'status':<8}  {'opens':>5}  "
             f"{'machine':>7}  {'last open':<16}  clicks"]
    for m in items:
        for r in m["recipients"]:
            clicks = ", ".join(f"{c['url']} x{c['count']}" for c in r["clicks"])
            lines.append(f"{when(m['accepted_at']):<16}  {(m['subject'] or '(no subject)')[:28]:<28}  "
                         f"{r['address'][:30]:<30}  {r['status']:<8}  {r['opens']:>5}  {r['machine_opens']:>7}  "
                         f"{when(r['last_opened_at']):<16}  {clicks}")
    return lines


async def _feed(cfg: Config, user: str | None, follow: bool, limit: int, as_json: bool = False) -> int:
    from storage import events as ev
    from storage import feed
    async with _database(cfg) as sm:
        async with sm() as s:
            msgs = await feed.list_messages(s, user, None, max(1, limit), False)
            items = await feed.feed_json(s, list(reversed(msgs)))
            cursor = await ev.latest_cursor(s, user)
        if as_json:
            print(json.dumps(items, ensure_ascii=False), flush=True)
        else:
            for line in _feed_table(items):
                print(line, flush=True)
        if not follow:
            if not items:
                raise Nothing("no messages" + (f" of {user}" if user else ""))
            return 0
        print("following new events (Ctrl-C stops)…", file=sys.stderr)
        while True:
            async with sm() as s:
                rows = await ev.events_after(s, user, cursor, 500)
            for e in rows:
                cursor = ev.cursor_of(e)
                j = e.to_json()
                if as_json:
                    print(json.dumps(j, ensure_ascii=False), flush=True)
                    continue
                extra = " ".join(x for x in (j["classification"] or "", j["client"] or "", j["url"] or "") if x)
                print(f"{j['at'][:19].replace('T', ' ')}  {j['type']:<9} {j['recipient'] or '-':<30} "
                      f"message {j['message']}  {extra}", flush=True)
            if not rows:
                await asyncio.sleep(0.5)


async def _refresh_apple(cfg: Config, only: str | None, url: str | None, file: str | None) -> int:
    from tracker_http import apple
    try:
        written = await apple.refresh(cfg, only, url, file, say=lambda line: print(line, file=sys.stderr))
    except apple.RangesError as e:
        raise Failure(f"{e}; nothing written, the lists in use are kept") from None
    for lst, count, path in written:
        print(f"{lst.title}: {count} networks written to {path}", file=sys.stderr)
    if written:
        print("a running tracker reads them at its next SIGHUP or restart", file=sys.stderr)
    return 0


# -- serve -----------------------------------------------------------------------------------------

def _serve(cfg: Config, only: str | None, metrics_listen: str | None = None) -> int:
    from core import logs
    logs.setup(cfg.log)
    log = logging.getLogger("trackrelay")
    if only and not cfg.storage.url.startswith("postgresql"):
        raise Failure("serve --only needs PostgreSQL (storage.url = postgresql+asyncpg://…): "
                      "several processes cannot share one SQLite file safely")
    for w in config_mod.warnings_for(cfg):
        log.warning("%s: %s", cfg.source, w)
    if metrics_listen:
        try:
            config_mod.parse_hostport(metrics_listen)
        except ValueError as e:
            raise Failure(f"--metrics-listen: {e}, got {metrics_listen!r}") from None
    # The event loop: uvloop when installed, unless TRACKRELAY_EVENT_LOOP=asyncio (core.aio).
    from core import aio
    try:
        aio.loop_factory()
    except (ValueError, ImportError) as e:
        raise Failure(f"{aio.EVENT_LOOP_ENV}: {e}") from None
    return aio.run(_run(cfg, only, metrics_listen))


async def _run(cfg: Config, only: str | None, metrics_listen: str | None = None) -> int:
    from trackrelay.service import ROLES, Service
    log = logging.getLogger("trackrelay")
    service = Service(cfg, roles=(only,) if only else ROLES, metrics_listen=metrics_listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task] = set()

    def on_hup() -> None:
        task = asyncio.create_task(_reload(service))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await service.start()
    except OSError as e:
        await service.stop()
        raise Failure(f"cannot start: {e.strerror or e}") from None
    from core.aio import loop_name
    log.info("trackrelay running (%s) on %s's event loop; SIGTERM stops it, SIGHUP reloads the config",
             ", ".join(service.roles), loop_name())
    # Everything loaded so far (modules, compiled statements, regexes, ranges) lives as long as the
    # process: out of the collector's sight, a full collection no longer walks it every time.
    gc.freeze()
    await stop.wait()
    log.info("stopping: draining sessions and deliveries")
    await service.stop()
    log.info("stopped")
    return 0


async def _reload(service) -> None:
    """SIGHUP: read the config file again; a file that no longer validates is refused (the reason
    logged) and the running configuration kept."""
    log = logging.getLogger("trackrelay")
    source = service.config.source
    if source.startswith("<"):
        log.warning("SIGHUP: running on the built-in defaults, no file to reload")
        return
    try:
        new = config_mod.load(source)
    except ConfigError as e:
        log.error("SIGHUP: reload refused, keeping the running configuration: %s", e)
        return
    for w in config_mod.warnings_for(new):
        log.warning("%s: %s", new.source, w)
    try:
        restart = await service.reload(new)
    except Exception as e:  # a certificate that does not load, say: the old one stays
        log.error("SIGHUP: reload failed, keeping the running configuration: %s: %s", type(e).__name__, e)
        return
    log.info("SIGHUP: reloaded %s (users, tokens, log keys, Never Log, webhooks, certificates, Apple ranges)",
             source)
    if restart:
        log.warning("SIGHUP: these changed but need a restart: %s", ", ".join(restart))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
