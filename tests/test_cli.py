"""The `trackrelay` command as an operator uses it, every command a real subprocess: help with an
example for every command, -c before and after the command word, --version, the refusal to work on
the built-in defaults, read-only commands that never migrate, --json, exit codes; the queue id of
a real `250 … queued as N` used with queue list/show/retry/bounce/delete/hold/release; and every
command that docs/operations.md and contrib/systemd/ show, run as written."""

from __future__ import annotations

import asyncio
import email
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from email import policy
from importlib.metadata import version
from pathlib import Path

import pytest

from helpers import base_config, client, free_port, make_config, simple_message, to_toml
from trackrelay.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "trackrelay.cli"]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRACKRELAY_CONFIG"}
    env.update(extra)
    return env


def run(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], text=True, capture_output=True, cwd=cwd, env=env or _env(),
                          timeout=60, stdin=subprocess.DEVNULL)


async def arun(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`run` without blocking the event loop (the relay under test lives in it)."""
    proc = await asyncio.create_subprocess_exec(*CLI, *args, cwd=cwd, env=env or _env(),
                                                stdin=subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


_PARALLEL = asyncio.Semaphore  # made per call: a semaphore belongs to one event loop


async def arun_all(commands: list[list[str]], **kw) -> list[subprocess.CompletedProcess]:
    """Independent commands, two at a time (each a second or so of interpreter start-up)."""
    gate = _PARALLEL(2)

    async def one(words):
        async with gate:
            return await arun(*words, **kw)
    return list(await asyncio.gather(*(one(w) for w in commands)))


def command_paths(parser=None, prefix=()) -> list[tuple[str, ...]]:
    """Every command word path of the parser: ('serve',), ('queue', 'list'), …"""
    parser = parser or build_parser()
    out = []
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                out.append((*prefix, name))
                out += command_paths(sub, (*prefix, name))
    return out


def write_config(tmp_path: Path, name: str = "trackrelay.toml", **sections) -> Path:
    data = base_config(db_url=f"sqlite+aiosqlite:///{tmp_path}/trackrelay.db", relay_port=free_port(),
                       upstream_url=f"maildir://{tmp_path}/outbox", tmp=tmp_path, **sections)
    path = tmp_path / name
    path.write_text(to_toml(data))
    return path


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# -- help, version, where the config comes from ------------------------------------------------------

def test_every_command_says_what_it_does_with_an_example():
    paths = command_paths()
    assert {("serve",), ("check-config",), ("db", "upgrade"), ("db", "current"), ("db", "history"),
            ("queue", "list"), ("queue", "show"), ("queue", "retry"), ("queue", "bounce"), ("queue", "delete"),
            ("queue", "hold"), ("queue", "release"), ("feed",), ("contacts", "show"), ("never-log", "list"),
            ("hash-password",), ("new-token",), ("tracker", "refresh-apple-ranges")} <= set(paths)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda p: (p, run(*p, "--help")), [(), *paths]))
    for path, r in results:
        assert r.returncode == 0, (path, r.stderr)
        head, _, rest = r.stdout.partition("\n\n")
        assert head.startswith("usage: trackrelay"), (path, r.stdout)
        description = rest.split("\n\n")[0].strip()
        assert description.endswith(".") and len(description) > 10, (path, description)
        example = re.search(r"^examples?:\n((?:  .*\n?)+)", r.stdout, re.M)
        assert example, (path, r.stdout)
        assert all(line.strip().split()[0] in ("trackrelay", "echo") for line in example.group(1).splitlines())
        assert any(" ".join(("trackrelay", *path)) in line for line in example.group(1).splitlines()), (path, r.stdout)
        if path and path not in (("db",), ("never-log",), ("contacts",), ("tracker",), ("queue",)):
            assert "-c FILE, --config FILE" in r.stdout, path  # -c after the command word


def test_version_from_the_package_metadata():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"trackrelay {version('trackrelay')}"


async def test_config_before_and_after_the_command_word(tmp_path):
    cfg = write_config(tmp_path, "c.toml")
    assert (await arun("-c", str(cfg), "db", "upgrade")).returncode == 0
    commands = (["check-config"], ["db", "current"], ["queue", "list", "--json"], ["never-log", "list", "--json"],
                ["contacts", "show", "x@y.test"])
    results = await arun_all([v for words in commands for v in (["-c", str(cfg), *words], [*words, "-c", str(cfg)])]
                             + [["queue", "list", "--json", f"--config={cfg}"]])
    for i, words in enumerate(commands):
        before, after = results[2 * i:2 * i + 2]
        assert before.returncode == after.returncode, (words, before.stderr, after.stderr)
        assert before.stdout == after.stdout and before.stderr == after.stderr, words
        assert "unrecognized" not in after.stderr
    assert results[-1].stdout == results[4].stdout == "[]\n"
    other = write_config(tmp_path, "other.toml")
    r = await arun("-c", str(cfg), "queue", "list", "-c", str(other))
    assert r.returncode == 2 and "two config files" in one_line(r.stderr)
    r = await arun("-c", str(cfg), "queue", "list", "-c", str(cfg))
    assert r.returncode == 1  # the same file twice is fine (the queue is empty: exit 1)


DB_COMMANDS = [["check-config"], ["db", "upgrade"], ["db", "current"], ["db", "history"], ["queue", "list"],
               ["queue", "show", "1"], ["queue", "retry"], ["queue", "bounce", "1"], ["queue", "delete", "1"],
               ["queue", "hold", "1"], ["queue", "release", "1.1"], ["never-log", "list"],
               ["never-log", "add", "x@y.test"], ["contacts", "show", "a@b.test"], ["feed"],
               ["contacts", "set-basis", "a@b.test", "consent"], ["contacts", "forget", "a@b.test"],
               ["tracker", "refresh-apple-ranges", "--file", "ranges.csv"]]


def test_database_commands_refuse_the_built_in_defaults(tmp_path):
    """In the wrong directory nothing is created and nothing is said to be OK: one line naming
    where a config file was looked for, exit 2."""
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda words: (words, run(*words, cwd=tmp_path)), DB_COMMANDS))
    for words, r in results:
        assert r.returncode == 2, (words, r.returncode, r.stderr)
        line = one_line(r.stderr)
        assert "needs a config file" in line and "$TRACKRELAY_CONFIG (unset)" in line, line
        assert str(tmp_path / "trackrelay.toml") in line, line
        assert r.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no trackrelay.db, no key, nothing
    # These need no config at all.
    assert run("new-token", cwd=tmp_path).returncode == 0
    assert list(tmp_path.iterdir()) == []


def test_check_config_prints_the_path_it_checked(tmp_path):
    cfg = write_config(tmp_path)
    r = run("check-config", cwd=tmp_path)  # ./trackrelay.toml
    assert r.returncode == 0 and r.stdout == f"{cfg}: OK\n"
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    r = run("check-config", cwd=elsewhere, env=_env(TRACKRELAY_CONFIG=str(cfg)))
    assert r.returncode == 0 and r.stdout == f"{cfg}: OK\n"
    r = run("check-config", "-c", "../trackrelay.toml", cwd=elsewhere)
    assert r.returncode == 0 and r.stdout == f"{cfg}: OK\n"
    r = run("check-config", "-c", "missing.toml", cwd=elsewhere)
    assert r.returncode == 1 and "missing.toml: -: file not found" in one_line(r.stderr)


async def _migrate_to(url: str, revision: str) -> None:
    from storage import migrate
    from storage.engine import make_engine
    engine = make_engine(url)
    try:
        await migrate.upgrade(engine, revision)
    finally:
        await engine.dispose()


def _revision(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r for (r,) in conn.execute("SELECT version_num FROM alembic_version")]


async def test_read_only_commands_never_migrate_and_say_how_to(tmp_path):
    cfg = write_config(tmp_path)
    db = tmp_path / "trackrelay.db"
    read_only = [["queue", "list", "--json"], ["queue", "show", "1"], ["feed", "--json"],
                 ["contacts", "show", "a@b.test"], ["never-log", "list", "--json"]]
    some = read_only + [["queue", "hold", "1"]]
    for words, r in zip(some, await arun_all([["-c", str(cfg), *w] for w in some])):
        assert r.returncode == 1 and "run `trackrelay db upgrade`" in one_line(r.stderr), (words, r.stderr)
        assert f"no database at {db}" in r.stderr
    assert not db.exists()  # nothing created
    await _migrate_to(f"sqlite+aiosqlite:///{db}", "0003")
    some = read_only + [["queue", "retry"], ["contacts", "forget", "a@b.test"]]
    for words, r in zip(some, await arun_all([["-c", str(cfg), *w] for w in some])):
        assert r.returncode == 1, (words, r.stderr)
        assert "run `trackrelay db upgrade`" in r.stderr and "0003" in r.stderr, (words, r.stderr)
    assert _revision(db) == ["0003"]
    r = await arun("-c", str(cfg), "db", "current")
    assert r.stdout == "0003\n"
    r = await arun("-c", str(cfg), "db", "history")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert any(line.startswith("0003 ") and line.endswith("(current)") for line in lines), lines
    assert "(head" in lines[0] and lines[-1].startswith("0001 ")
    r = await arun("-c", str(cfg), "db", "upgrade")
    assert r.returncode == 0, r.stderr
    r = await arun("-c", str(cfg), "db", "current")
    assert r.returncode == 0 and r.stdout.endswith(" (head)\n")
    # Up to date and empty: the commands run, select nothing, exit 1 (JSON still parses).
    r = await arun("-c", str(cfg), "queue", "list", "--json")
    assert r.returncode == 1 and json.loads(r.stdout) == [] and "no message" in r.stderr
    r = await arun("-c", str(cfg), "feed", "--json")
    assert r.returncode == 1 and json.loads(r.stdout) == []
    r = await arun("-c", str(cfg), "never-log", "list", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["entries"] == []
    r = await arun("-c", str(cfg), "queue", "bounce", "999")
    assert r.returncode == 1 and "999: no such message" in one_line(r.stderr)


def test_usage_errors_exit_2_with_one_line(tmp_path):
    cfg = write_config(tmp_path)
    commands = (["queue", "explode"], ["queue", "bounce", "42.x"], ["queue", "bounce", "42.0"],
                ["queue", "list", "--older-than", "soon"], ["queue", "delete"], ["queue", "show"],
                ["db"], ["serve", "--only", "everything"], ["queue", "list", "--status", "nope"])
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda words: run("-c", str(cfg), *words), commands))
    for words, r in zip(commands, results):
        assert r.returncode == 2, (words, r.stderr)
        assert one_line(r.stderr).startswith("trackrelay:"), words


# -- one queue id: the 250's ------------------------------------------------------------------------

async def _submit(relay, rcpts: list[str], subject: str = "Hello") -> int:
    """Send through the real relay; the queue id the mail client was told."""
    c = await client(relay.port)
    _errors, reply = await c.sendmail("alice@example.com", rcpts, simple_message(subject=subject))
    await c.quit()
    m = re.fullmatch(r"2\.0\.0 OK: queued as (\d+)", reply.strip())
    assert m, reply
    return int(m.group(1))


async def _start_relay_only(relay):
    """The submission listener alone: copies wait as `queued` in the database, untouched by any
    worker until the test starts one."""
    from trackrelay.service import Service
    relay.config = make_config(relay.config_dict())
    relay.service = Service(relay.config, roles=("relay",))
    await relay.service.start()


def _cli_config(relay, tmp_path: Path, **sections) -> Path:
    path = tmp_path / "cli.toml"
    path.write_text(to_toml(relay.config_dict(**sections)))
    return path


async def _json(cfg: Path, *words: str):
    r = await arun(*words, "--json", "-c", str(cfg))
    assert r.returncode == 0, (words, r.stderr)
    return json.loads(r.stdout)


async def test_held_copy_is_not_attempted_until_released_and_delete_sends_no_dsn(relay, sink, tmp_path):
    await _start_relay_only(relay)
    n = await _submit(relay, ["carol@ext.test", "dave@ext.test"])
    gone = await _submit(relay, ["erin@ext.test"], subject="Never mind")
    await relay.stop()
    cfg = _cli_config(relay, tmp_path)

    listed = await _json(cfg, "queue", "list")
    assert [(m["id"], m["subject"], [(c["copy"], c["address"], c["status"], c["tries"]) for c in m["copies"]])
            for m in listed] == [(n, "Hello", [(f"{n}.1", "carol@ext.test", "queued", 0),
                                               (f"{n}.2", "dave@ext.test", "queued", 0)]),
                                 (gone, "Never mind", [(f"{gone}.1", "erin@ext.test", "queued", 0)])]
    assert all(m["size"] > 0 and m["age_seconds"] >= 0 and m["mail_from"] == "alice@example.com" for m in listed)
    text = await arun("queue", "list", "-c", str(cfg))
    assert text.returncode == 0
    assert re.search(rf"^{n}  .*alice  <alice@example.com>  Hello$", text.stdout, re.M), text.stdout
    assert re.search(rf"^  {n}\.2 +queued +tries 0 +next .* dave@ext.test$", text.stdout, re.M), text.stdout

    shown = await _json(cfg, "queue", "show", str(n))
    assert shown["id"] == n and shown["envelope"] == {"mail_from": "alice@example.com",
                                                      "rcpt_to": ["carol@ext.test", "dave@ext.test"]}
    assert "Subject: Hello" in shown["headers"] and shown["headers"].startswith("Received: from client.test")
    assert [c["copy"] for c in shown["copies"]] == [f"{n}.1", f"{n}.2"]
    assert all(isinstance(c["plan"]["reasons"], list) and c["attempts"] == [] for c in shown["copies"])
    r = await arun("queue", "show", str(n), "-c", str(cfg))
    assert r.returncode == 0 and f"copy {n}.2: dave@ext.test" in r.stdout and "RCPT TO:<carol@ext.test>" in r.stdout

    r = await arun("queue", "hold", f"{n}.2", "-c", str(cfg))
    assert r.returncode == 0 and r.stdout == f"{n}.2\tdave@ext.test\theld\n", r.stderr
    r = await arun("queue", "delete", str(gone), "-c", str(cfg))
    assert r.returncode == 0 and f"{gone}.1\terin@ext.test\tdeleted" in r.stdout and "no DSN" in r.stderr
    assert (await arun("queue", "show", str(gone), "-c", str(cfg))).returncode == 1

    await relay.start()  # now a worker: it claims what is due
    (got,) = await sink.wait_for(1)
    assert got.rcpt_tos == ["carol@ext.test"]
    r = await arun("queue", "retry", f"{n}.2", "-c", str(cfg))  # held: retry does not bypass it
    assert r.returncode == 1 and "held, not due now" in r.stderr
    await asyncio.sleep(2.5)  # more than two of the worker's polls
    assert len(sink.received) == 1
    assert [c["status"] for c in (await _json(cfg, "queue", "show", str(n)))["copies"]] == ["sent", "held"]
    assert [c["copy"] for m in await _json(cfg, "queue", "list", "--status", "held") for c in m["copies"]] == [f"{n}.2"]

    r = await arun("queue", "release", f"{n}.2", "-c", str(cfg))
    assert r.returncode == 0 and r.stdout == f"{n}.2\tdave@ext.test\treleased\n"
    received = await sink.wait_for(2)
    assert received[1].rcpt_tos == ["dave@ext.test"]
    await relay.wait_status({"sent"}, 2)
    shown = await _json(cfg, "queue", "show", str(n))
    assert [[a["outcome"] for a in c["attempts"]] for c in shown["copies"]] == [["sent"], ["sent"]]
    assert shown["done_at"] is not None
    # The deleted message sent no DSN, now or at a later DSN pass.
    assert await relay.service.maintenance.write_dsns() == 0
    await asyncio.sleep(1.0)
    assert [r.rcpt_tos for r in sink.received] == [["carol@ext.test"], ["dave@ext.test"]]
    assert await relay.rows("SELECT id FROM messages WHERE id = :g", g=gone) == []
    r = await arun("queue", "list", "-c", str(cfg))
    assert r.returncode == 1 and r.stdout == ""  # nothing waits: exit 1


async def test_retry_and_bounce_take_the_id_of_the_250(relay, sink, tmp_path):
    from storage import crm
    slow = {"retry_initial_seconds": 3600, "retry_max_seconds": 3600}
    sink.behaviour.rcpt_replies["slow@ext.test"] = "450 4.2.0 Mailbox busy"
    sink.behaviour.rcpt_replies["later@ext.test"] = "450 4.2.0 Mailbox busy"
    await relay.start(queue=slow)
    first = await _submit(relay, ["carol@ext.test", "dave@ext.test"], subject="First")
    await sink.wait_for(2)
    bounced = await _submit(relay, ["slow@ext.test"], subject="Bounce me")
    retried = await _submit(relay, ["later@ext.test"], subject="Retry me")
    await relay.wait_status({"deferred"}, 2)
    cfg = _cli_config(relay, tmp_path, queue=slow)
    # The message id and the copies' own ids differ: `queue bounce 2` must mean message 2.
    (rid,) = (await relay.rows("SELECT id FROM recipients WHERE address = 'slow@ext.test'"))[0]
    assert rid != bounced

    listed = await _json(cfg, "queue", "list", "--status", "deferred")
    assert {m["id"]: [(c["copy"], c["status"], c["tries"], c["last_reply"]) for c in m["copies"]] for m in listed} == {
        bounced: [(f"{bounced}.1", "deferred", 1, "450 4.2.0 Mailbox busy")],
        retried: [(f"{retried}.1", "deferred", 1, "450 4.2.0 Mailbox busy")]}
    assert all(c["next_attempt_at"] for m in listed for c in m["copies"])
    r = await arun("queue", "list", "--older-than", "1h", "-c", str(cfg))
    assert r.returncode == 1  # nothing that old
    r = await arun("queue", "list", "--user", "bob", "-c", str(cfg))
    assert r.returncode == 1

    r = await arun("queue", "bounce", str(bounced), "-c", str(cfg))
    assert r.returncode == 0 and r.stdout == f"{bounced}.1\tslow@ext.test\tbounced\n" and "DSN" in r.stderr
    assert await relay.rows("SELECT status, dsn FROM recipients WHERE id = :r", r=rid) == [("bounced", "pending")]
    assert await relay.rows("SELECT status FROM recipients WHERE message_pk = :m", m=first) == [("sent",), ("sent",)]
    assert await relay.service.maintenance.write_dsns() == 1  # the worker's DSN pass, as for a 5xx
    relay.service.worker.wake()
    received = await sink.wait_for(3)
    dsn = email.message_from_bytes(received[2].data, policy=policy.default)
    assert received[2].rcpt_tos == ["alice@example.com"] and dsn.get_param("report-type") == "delivery-status"
    text = received[2].data.decode()
    assert "Final-Recipient: rfc822; slow@ext.test" in text and "Status: 5.0.0" in text
    assert "Diagnostic-Code: smtp; 554 5.0.0 Bounced by the operator" in text and "Subject: Bounce me" in text

    del sink.behaviour.rcpt_replies["later@ext.test"]
    r = await arun("queue", "retry", f"{retried}.1", "-c", str(cfg))
    assert r.returncode == 0 and r.stdout == f"{retried}.1\tlater@ext.test\tdue now\n"
    received = await sink.wait_for(4)
    assert received[3].rcpt_tos == ["later@ext.test"]

    # One copy of a message deleted: no DSN, never tried again, and the other copy keeps its number.
    sink.behaviour.rcpt_replies["slow2@ext.test"] = "450 4.2.0 Mailbox busy"
    mixed = await _submit(relay, ["erin@ext.test", "slow2@ext.test"], subject="Mixed")
    await sink.wait_for(5)
    await relay.wait_status({"deferred"}, 1)
    r = await arun("queue", "delete", f"{mixed}.2", "-c", str(cfg))
    assert r.returncode == 0 and r.stdout == f"{mixed}.2\tslow2@ext.test\tdeleted\n"
    assert await relay.service.maintenance.write_dsns() == 0
    shown = await _json(cfg, "queue", "show", str(mixed))
    assert [(c["copy"], c["status"], c["dsn"]) for c in shown["copies"]] == [
        (f"{mixed}.1", "sent", "none"), (f"{mixed}.2", "deleted", "suppressed")]
    assert shown["done_at"] is not None
    assert (await arun("queue", "retry", f"{mixed}.2", "-c", str(cfg))).returncode == 1

    # Ids that name nothing, and actions on copies they cannot apply to: exit 1, nothing changed.
    for words, says in ((["bounce", "999"], "999: no such message"),
                        (["bounce", f"{first}.3"], f"message {first} has 2 copies"),
                        (["delete", str(first)], "sent, not deleted"),
                        (["hold", str(bounced)], "bounced, not held"),
                        (["release", str(first)], "sent, not released"),
                        (["show", "999"], "no such message")):
        r = await arun("queue", *words, "-c", str(cfg))
        assert r.returncode == 1 and says in r.stderr, (words, r.stderr)
    assert await relay.rows("SELECT status FROM recipients WHERE message_pk = :m", m=first) == [("sent",), ("sent",)]

    # --json of the other reading commands, parsed.
    feed = await _json(cfg, "feed", "--user", "alice")
    assert [m["subject"] for m in feed] == ["First", "Bounce me", "Retry me", "Mixed"]
    assert [r["status"] for r in feed[0]["recipients"]] == ["sent", "sent"]
    async with relay.service.sessionmaker() as s:
        async with s.begin():
            (await crm.ensure_contact(s, "carol@ext.test", "alice", create=True)).legal_basis = "consent"
    contact = await _json(cfg, "contacts", "show", "carol@ext.test")
    assert contact["email"] == "carol@ext.test" and contact["owner"] == "alice" and contact["legal_basis"] == "consent"
    r = await arun("never-log", "add", "--user", "alice", "*@Private.test", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert await _json(cfg, "never-log", "list", "--user", "alice") == {
        "scope": "user", "user": "alice", "entries": [{"entry": "*@private.test", "source": "database"}]}
    r = await arun("contacts", "show", "nobody@ext.test", "-c", str(cfg))
    assert r.returncode == 1 and "no contact nobody@ext.test" in one_line(r.stderr)


# -- the docs' commands, as written -------------------------------------------------------------------

DOCS = ROOT / "docs" / "operations.md"
UNITS = ROOT / "contrib" / "systemd"
_EXECUTABLES = ("trackrelay", "/opt/trackrelay/.venv/bin/trackrelay")


def documented_commands() -> list[list[str]]:
    """Every trackrelay command of docs/operations.md (code blocks and inline code, in document
    order; ``export NAME=VALUE`` lines as ['export', NAME, VALUE]) and of the shipped units'
    Exec lines."""
    text = DOCS.read_text()
    out: list[list[str]] = []
    for m in re.finditer(r"```[^\n]*\n(?P<block>.*?)```|`(?P<inline>[^`]+)`", text, re.S):
        lines = m.group("block").splitlines() if m.group("block") is not None else [" ".join(m.group("inline").split())]
        for line in lines:
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # not shell (an unbalanced quote in TOML or prose)
                continue
            if words[:1] == ["export"] and "=" in words[1]:
                out.append(["export", *words[1].split("=", 1)])
            elif len(words) > 1 and words[0] in _EXECUTABLES:
                out.append(words)
    for unit in sorted(UNITS.glob("*.service")):
        for line in unit.read_text().splitlines():
            if re.match(r"ExecStart(Pre)?=", line):
                out.append(shlex.split(line.split("=", 1)[1]))
    seen, unique = set(), []
    for words in out:
        if tuple(words) not in seen:
            seen.add(tuple(words))
            unique.append(words)
    return unique


def _as_run(words: list[str], cfg: Path, role: str = "") -> list[str]:
    """The documented words with the documented paths and placeholders made real: the config
    file, the contact to erase; the executable is this interpreter's trackrelay."""
    real = {"/etc/trackrelay/trackrelay.toml": str(cfg), "FILE": str(cfg), "EMAIL": "erin@client.example",
            "%i": role}
    return [*CLI, *(real.get(w, w) for w in words[1:])]


def test_the_docs_show_the_shipped_units_and_their_commands():
    text = DOCS.read_text()
    assert "contrib/systemd/trackrelay.service" in text and "contrib/systemd/trackrelay@.service" in text
    commands = documented_commands()
    assert ["trackrelay", "serve", "-c", "/etc/trackrelay/trackrelay.toml"] in commands
    assert ["/opt/trackrelay/.venv/bin/trackrelay", "serve", "--only", "%i", "-c",
            "/etc/trackrelay/trackrelay.toml"] in commands
    assert {"queue", "db", "feed", "contacts", "never-log", "check-config"} <= {w[1] for w in commands if len(w) > 1}
    for name in ("trackrelay.service", "trackrelay@.service"):
        unit = (UNITS / name).read_text()
        for needed in ("[Install]", "WantedBy=multi-user.target", "WorkingDirectory=/var/lib/trackrelay",
                       "User=trackrelay", "NoNewPrivileges=true", "ProtectSystem=strict",
                       "ReadWritePaths=/var/lib/trackrelay", "PrivateTmp=true", "KillSignal=SIGTERM",
                       "TimeoutStopSec=30", "-c /etc/trackrelay/trackrelay.toml"):
            assert needed in unit, (name, needed)


def test_the_shipped_units_pass_systemd_analyze(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    shutil.copy(UNITS / "trackrelay.service", tmp_path / "trackrelay.service")
    shutil.copy(UNITS / "trackrelay@.service", tmp_path / "trackrelay@worker.service")
    for unit in ("trackrelay.service", "trackrelay@worker.service"):
        r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True,
                           timeout=60)
        # The one complaint allowed: /opt/trackrelay is not installed on the test machine.
        problems = [line for line in (r.stdout + r.stderr).splitlines()
                    if line.strip() and "/opt/trackrelay/.venv/bin/trackrelay is not executable" not in line]
        assert problems == [], problems


async def _seed_for_the_docs(url: str) -> None:
    """What the docs' examples name: message 42 (two queued copies, accepted 3 hours ago, through
    the spool's own code), and the contacts carol@ and erin@client.example."""
    from sqlalchemy import text

    from storage import crm
    from storage.engine import make_engine, make_sessionmaker
    from storage.models import utcnow
    from storage.spool import SpoolEntry, SpoolRecipient, add_entries
    await _migrate_to(url, "head")
    engine = make_engine(url)
    try:
        async with make_sessionmaker(engine)() as s:
            async with s.begin():
                await s.execute(text("INSERT INTO messages (id, kind, message_id, mail_from, from_header, subject, "
                                     "accepted_at, size, log) VALUES (41, 'mail', '<x@y>', '', '', '', "
                                     "'2026-01-01 00:00:00', 0, 0)"))
                ((pk, _),) = await add_entries(s, [SpoolEntry(
                    message_id="<offer@example.com>", user="alice", mail_from="alice@example.com",
                    raw=simple_message(to="carol@client.example", subject="Offer"),
                    recipients=[SpoolRecipient(a, None, False, False, False, ["tracking_disabled"])
                                for a in ("carol@client.example", "dave@client.example")],
                    subject="Offer", accepted_at=utcnow() - timedelta(hours=3))])
                assert pk == 42
                await s.execute(text("DELETE FROM messages WHERE id = 41"))
                for addr in ("carol@client.example", "erin@client.example"):
                    await crm.ensure_contact(s, addr, "alice", create=True)
    finally:
        await engine.dispose()


async def test_every_documented_command_runs_as_written(tmp_path):
    """In document order, on a database holding what the examples name; each exits 0 (what prints
    JSON prints JSON that parses). serve is the next test's."""
    cfg = write_config(tmp_path)
    await _seed_for_the_docs(f"sqlite+aiosqlite:///{tmp_path}/trackrelay.db")
    env = _env()
    ran = []
    for words in documented_commands():
        if words[0] == "export":
            env[words[1]] = str(cfg) if words[2] == "/etc/trackrelay/trackrelay.toml" else words[2]
            continue
        if words[1] == "serve":
            continue
        argv = _as_run(words, cfg)
        r = await arun(*argv[len(CLI):], cwd=tmp_path, env=env)
        assert r.returncode == 0, (words, r.stdout, r.stderr)
        if "--json" in words:
            json.loads(r.stdout)
        ran.append(words[1:3])
    assert ["queue", "bounce"] in ran and ["queue", "hold"] in ran and ["contacts", "forget"] in ran
    with sqlite3.connect(tmp_path / "trackrelay.db") as db:
        # 42.1 deleted (no DSN), 42.2 bounced (its DSN pending for the worker); erin erased.
        assert db.execute("SELECT address, status, dsn FROM recipients ORDER BY id").fetchall() == [
            ("carol@client.example", "deleted", "suppressed"), ("dave@client.example", "bounced", "pending")]
        assert db.execute("SELECT email FROM contacts").fetchall() == [("carol@client.example",)]


async def _serve_until_running(argv: list[str], cwd: Path) -> None:
    """Start `serve` as documented, wait for 'trackrelay running', stop it with SIGTERM: exit 0."""
    proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, env=_env(), stdin=subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    seen = []
    try:
        while True:
            line = await asyncio.wait_for(proc.stderr.readline(), 60)
            assert line, f"{argv} exited {await proc.wait()}: {b''.join(seen).decode()[-2000:]}"
            seen.append(line)
            if b"trackrelay running" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), 40)
        assert await proc.wait() == 0, (argv, rest.decode()[-2000:])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_documented_serve_commands_start_and_stop(tmp_path):
    from conftest import _pg_available, pg_test_url, reset_pg
    serve = [w for w in documented_commands() if w[0] != "export" and w[1] == "serve"]
    single = [w for w in serve if "--only" not in w]
    roles = [w for w in serve if "--only" in w]
    assert single and roles
    cfg = write_config(tmp_path, log={"level": "info"})
    for words in single:
        await _serve_until_running(_as_run(words, cfg), tmp_path)
    why = await _pg_available()
    if why:
        pytest.skip(f"the --only commands need PostgreSQL: {why}")
    await reset_pg()
    pg_dir = tmp_path / "pg"
    pg_dir.mkdir()
    pg_cfg = pg_dir / "trackrelay.toml"
    pg_cfg.write_text(to_toml(base_config(db_url=pg_test_url(), relay_port=free_port(),
                                          upstream_url=f"maildir://{pg_dir}/outbox", tmp=pg_dir,
                                          log={"level": "info"})))
    for words in roles:
        for role in (("relay", "worker", "tracker") if "%i" in words else ("",)):
            await _serve_until_running(_as_run(words, pg_cfg, role), pg_dir)
