"""The ``trackrelay`` command. Errors go to stderr as one line: exit 2 for usage, 1 for failures."""

from __future__ import annotations

import argparse
import asyncio
import gc
import getpass
import logging
import signal
import sys
from datetime import datetime, timezone

from trackrelay import config as config_mod
from trackrelay.config import Config, ConfigError


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="trackrelay", description="Self-hosted email tracking relay.")
    p.add_argument("-c", "--config", help="config file (default: $TRACKRELAY_CONFIG, else ./trackrelay.toml, "
                                          "else built-in defaults)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("serve", help="run the relay, the delivery worker and the tracker")
    s.add_argument("--only", choices=("relay", "worker", "tracker"), help="run one role (needs PostgreSQL)")
    sub.add_parser("check-config", help="validate the config file")
    db = sub.add_parser("db", help="database schema")
    db.add_argument("action", choices=("upgrade",))
    sub.add_parser("hash-password", help="read a password from stdin (or prompt), print its hash")
    sub.add_parser("new-token", help="print a fresh API token and its api_token_hash")
    nl = sub.add_parser("never-log", help="the Never Log lists (team, or a user's with --user)")
    nl.add_argument("action", choices=("add", "remove", "list"))
    nl.add_argument("--user", help="a user's personal list (default: the team list)")
    nl.add_argument("entries", nargs="*", help="name@domain or *@domain")
    cp = sub.add_parser("contacts", help="CRM contacts")
    cp.add_argument("action", choices=("show", "set-basis", "forget"))
    cp.add_argument("email")
    cp.add_argument("basis", nargs="?", help="set-basis: one of the six GDPR bases, or none")
    fp = sub.add_parser("feed", help="the activity feed in the terminal")
    fp.add_argument("--user", help="one user's mail (default: everybody's)")
    fp.add_argument("--follow", action="store_true", help="keep printing new events as they happen")
    fp.add_argument("--limit", type=int, default=20, help="how many messages (default 20)")
    tp = sub.add_parser("tracker", help="tracker data")
    tp.add_argument("action", choices=("refresh-apple-ranges",))
    src = tp.add_mutually_exclusive_group()
    src.add_argument("--url", help="where to download Apple's egress-ip-ranges.csv from")
    src.add_argument("--file", help="read the list from this file instead of downloading it")
    qp = sub.add_parser("queue", help="inspect and steer the delivery queue")
    qp.add_argument("action", choices=("list", "retry", "bounce"))
    qp.add_argument("ids", nargs="*", type=int, help="recipient copy ids (retry: none means all)")
    return p


def _load(args) -> Config:
    return config_mod.load(config_mod.locate(args.config))


def main(argv: list[str] | None = None) -> int:
    try:
        args, extra = build_parser().parse_known_args(argv)
        # argparse stops filling a trailing list of positionals at an option: `never-log add
        # --user NAME a@b c@d` leaves the entries over. They are entries all the same.
        if extra and getattr(args, "command", None) == "never-log" and not any(x.startswith("-") for x in extra):
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
    except UsageError as e:
        print(f"trackrelay: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Failure as e:
        print(f"trackrelay: {e}", file=sys.stderr)
        return 1


class Failure(Exception):
    pass


def _dispatch(args) -> int:
    if args.command == "hash-password":
        return _hash_password()
    if args.command == "new-token":
        from trackrelay.passwords import new_api_token
        token, digest = new_api_token()
        print(f"token: {token}")
        print(f'api_token_hash = "{digest}"')
        return 0
    cfg = _load(args)
    if args.command == "check-config":
        for w in config_mod.warnings_for(cfg):
            print(f"warning: {cfg.source}: {w}", file=sys.stderr)
        print(f"{cfg.source}: OK")
        return 0
    if args.command == "db":
        return asyncio.run(_db_upgrade(cfg))
    if args.command == "queue":
        return asyncio.run(_queue(cfg, args.action, args.ids))
    if args.command == "serve":
        return _serve(cfg, args.only)
    if args.command == "never-log":
        return asyncio.run(_never_log(cfg, args.action, args.user, args.entries))
    if args.command == "contacts":
        return asyncio.run(_contacts(cfg, args.action, args.email, args.basis))
    if args.command == "feed":
        if args.user is not None and cfg.user(args.user) is None:
            raise UsageError(f"no user named {args.user!r} in {cfg.source}")
        return asyncio.run(_feed(cfg, args.user, args.follow, args.limit))
    if args.command == "tracker":
        return asyncio.run(_refresh_apple(cfg, args.url, args.file))
    raise UsageError(f"unknown command {args.command}")  # pragma: no cover


def _hash_password() -> int:
    from trackrelay.passwords import hash_password
    if sys.stdin.isatty():
        pw = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != pw:
            raise Failure("passwords differ")
    else:
        pw = sys.stdin.readline().rstrip("\r\n")
    if not pw:
        raise Failure("empty password")
    print(hash_password(pw))
    return 0


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


async def _queue(cfg: Config, action: str, ids: list[int]) -> int:
    from storage import migrate
    from storage import queue as q
    from storage.engine import make_engine, make_sessionmaker
    engine = make_engine(cfg.storage.url)
    try:
        await migrate.upgrade(engine)
        sm = make_sessionmaker(engine)
        now = datetime.now(timezone.utc)
        async with sm() as session:
            async with session.begin():
                if action == "list":
                    rows = await q.list_waiting(session)
                    print(f"{'copy':>8}  {'msg':>6}  {'status':<9} {'tries':>5}  {'next attempt':<20} address / last reply")
                    for rid, mpk, _mid, addr, status, attempts, nxt, reply in rows:
                        when = nxt.strftime("%Y-%m-%d %H:%M:%S") if nxt else "-"
                        print(f"{rid:>8}  {mpk:>6}  {status:<9} {attempts:>5}  {when:<20} {addr}  {reply or ''}")
                    print(f"{len(rows)} copies waiting", file=sys.stderr)
                elif action == "retry":
                    n = await q.retry_now(session, ids or None, now)
                    print(f"{n} copies due now", file=sys.stderr)
                else:
                    if not ids:
                        raise UsageError("queue bounce needs the ids of the copies to bounce")
                    n = await q.force_bounce(session, ids, now)
                    print(f"{n} copies bounced; their senders get a DSN", file=sys.stderr)
    finally:
        await engine.dispose()
    return 0


async def _with_session(cfg: Config, fn):
    from storage import migrate
    from storage.engine import make_engine, make_sessionmaker
    engine = make_engine(cfg.storage.url)
    try:
        await migrate.upgrade(engine)
        async with make_sessionmaker(engine)() as session:
            async with session.begin():
                return await fn(session)
    finally:
        await engine.dispose()


async def _never_log(cfg: Config, action: str, user: str | None, entries: list[str]) -> int:
    from storage import crm
    from trackrelay.neverlog import normalise_entry
    if user is not None and cfg.user(user) is None:
        raise UsageError(f"no user named {user!r} in {cfg.source}")
    scope, owner = ("user", user) if user else ("team", "")
    managed = tuple(normalise_entry(e) for e in (cfg.user(user).never_log if user else cfg.never_log.team))
    if action == "list":
        async def show(session):
            db = await crm.never_log_db_entries(session, scope, owner)
            for e in managed:
                print(f"{e}\t(config)")
            for e in db:
                if e not in managed:
                    print(e)
            print(f"{len(set(db) | set(managed))} entries on the {'list of ' + user if user else 'team list'}",
                  file=sys.stderr)
        await _with_session(cfg, show)
        return 0
    if not entries:
        raise UsageError(f"never-log {action} needs one or more entries")

    async def change(session):
        return await crm.never_log_change(session, action=action, scope=scope, user=owner,
                                          raw_entries=entries, config_entries=managed)
    try:
        changed = await _with_session(cfg, change)
    except crm.NeverLogRefused as e:
        raise Failure(str(e)) from None
    print(f"{len(changed)} entries {'added' if action == 'add' else 'removed'}", file=sys.stderr)
    return 0


async def _contacts(cfg: Config, action: str, email: str, basis: str | None) -> int:
    from storage import crm
    from trackrelay.config import GDPR_BASES
    email = email.strip().lower()
    if action == "show":
        async def show(session):
            c = await crm.get_contact(session, email)
            if c is None:
                raise Failure(f"no contact {email}")
            domain = await crm.company_domain(session, c.company_pk)
            for k, v in (("email", c.email), ("owner", c.owner), ("company", domain),
                         ("legal_basis", c.legal_basis), ("do_not_track", c.do_not_track),
                         ("marketing", c.marketing), ("last_open_at", c.last_open_at),
                         ("last_click_at", c.last_click_at), ("last_engagement_at", c.last_engagement_at)):
                print(f"{k}: {v if v is not None else '-'}")
        await _with_session(cfg, show)
        return 0
    if action == "set-basis":
        if basis is None or (basis != "none" and basis not in GDPR_BASES):
            raise UsageError(f"set-basis needs one of: {', '.join(GDPR_BASES)}, none")

        async def set_basis(session):
            c = await crm.get_contact(session, email)
            if c is None:
                raise Failure(f"no contact {email}")
            c.legal_basis = None if basis == "none" else basis
        await _with_session(cfg, set_basis)
        print(f"{email}: legal basis {basis}", file=sys.stderr)
        return 0

    async def forget(session):
        return await crm.erase_contact(session, email)
    if not await _with_session(cfg, forget):
        raise Failure(f"no contact or tracking data for {email}")
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


async def _feed(cfg: Config, user: str | None, follow: bool, limit: int) -> int:
    from storage import events as ev
    from storage import feed, migrate
    from storage.engine import make_engine, make_sessionmaker
    engine = make_engine(cfg.storage.url)
    try:
        await migrate.upgrade(engine)
        sm = make_sessionmaker(engine)
        async with sm() as s:
            msgs = await feed.list_messages(s, user, None, max(1, limit), False)
            items = await feed.feed_json(s, list(reversed(msgs)))
            cursor = await ev.latest_cursor(s, user)
        for line in _feed_table(items):
            print(line)
        if not follow:
            return 0
        print("following new events (Ctrl-C stops)…", file=sys.stderr)
        while True:
            async with sm() as s:
                rows = await ev.list_after(s, user, cursor, 500)
            for e, _mid, rcpt in rows:
                cursor = ev.cursor_of(e)
                j = ev.event_json(e, _mid, rcpt)
                extra = " ".join(x for x in (j["classification"] or "", j["client"] or "", j["url"] or "") if x)
                print(f"{j['at'][:19].replace('T', ' ')}  {j['type']:<9} {j['recipient'] or '-':<30} "
                      f"message {j['message']}  {extra}", flush=True)
            if not rows:
                await asyncio.sleep(0.5)
    finally:
        await engine.dispose()


async def _refresh_apple(cfg: Config, url: str | None, file: str | None) -> int:
    from pathlib import Path

    from tracker_http import apple
    from trackrelay.links import key_file_path
    source = file or url or apple.APPLE_EGRESS_URL
    print(f"reading {source} …", file=sys.stderr)
    try:
        text = Path(file).read_text() if file else await apple.fetch(source)
    except Exception as e:
        raise Failure(f"cannot read {source}: {type(e).__name__}: {e}") from None
    nets = apple.parse_ranges(text)
    if not nets:
        raise Failure(f"{source} holds no IP networks")
    out = key_file_path(cfg.storage.url).parent / "apple_mpp_ranges.txt"
    apple.write_ranges(out, nets, source)
    print(f"{len(nets)} networks written to {out}; restart the tracker to use them", file=sys.stderr)
    return 0


def _serve(cfg: Config, only: str | None) -> int:
    from trackrelay import logs
    logs.setup(cfg.log)
    log = logging.getLogger("trackrelay")
    if only and not cfg.storage.url.startswith("postgresql"):
        raise Failure("serve --only needs PostgreSQL (storage.url = postgresql+asyncpg://…): "
                      "several processes cannot share one SQLite file safely")
    for w in config_mod.warnings_for(cfg):
        log.warning("%s: %s", cfg.source, w)
    return asyncio.run(_run(cfg, only))


async def _run(cfg: Config, only: str | None) -> int:
    from trackrelay.service import ROLES, Service
    log = logging.getLogger("trackrelay")
    service = Service(cfg, roles=(only,) if only else ROLES)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except OSError as e:
        await service.stop()
        raise Failure(f"cannot start: {e.strerror or e}") from None
    log.info("trackrelay running (%s); SIGTERM stops it", ", ".join(service.roles))
    # Everything loaded so far (modules, compiled statements, regexes, ranges) lives as long as the
    # process: out of the collector's sight, a full collection no longer walks it every time.
    gc.freeze()
    await stop.wait()
    log.info("stopping: draining sessions and deliveries")
    await service.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
