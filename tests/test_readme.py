"""The README's commands, run as written. (Its test command — a fresh virtualenv, `pip install
".[test]"`, `python -m pytest` — is what .ci/run runs; the first one is run here in a copy of
the checkout.)"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiosmtplib
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    return [line.split("   #")[0].strip() for b in blocks for line in b.splitlines() if line.strip()]


def test_the_readme_opens_with_the_two_commands():
    run, test = _commands()[:2]
    assert run.endswith("trackrelay serve") and "pip install ." in run
    assert test == 'python3 -m venv .venv && .venv/bin/pip install ".[test]" && .venv/bin/python -m pytest'
    ci = (ROOT / ".ci" / "run").read_text()
    assert '".[test]"' in ci and ".venv/bin/python -m pytest" in ci  # CI runs the test command


def test_every_readme_command_is_one_this_file_runs():
    assert _commands()[2:] == ["echo 'their password' | .venv/bin/trackrelay hash-password"]


def test_the_hash_password_command_as_written(tmp_path):
    venv_bin = Path(sys.executable).parent
    if not (venv_bin / "trackrelay").exists():
        pytest.skip(f"no trackrelay script beside {sys.executable}")
    (tmp_path / ".venv").symlink_to(venv_bin.parent)
    cmd = _commands()[2]
    out = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    from core.passwords import verify_password
    assert verify_password("their password", out.stdout.strip())


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
async def test_the_first_command_installs_and_serves_on_the_defaults(tmp_path):
    """A copy of the checkout, the command exactly as the README shows it: it installs, starts on
    SQLite and the example config, takes mail for the example user and writes it to ./outbox/new."""
    if _listening(2525):
        pytest.skip("127.0.0.1:2525 (the example config's relay.listen) is taken on this machine")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    work = tmp_path / "trackrelay"
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, work / name)
    log = open(tmp_path / "first-command.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    proc = subprocess.Popen(["bash", "-c", _commands()[0]], cwd=work, stdout=log, stderr=log, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a fresh virtualenv and the install
        while not _listening(2525):
            assert proc.poll() is None, (tmp_path / "first-command.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the relay did not start listening"
            await asyncio.sleep(0.5)
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=2525, start_tls=False, timeout=20)
        await c.connect()
        await c.login("alice", "change-me-now")
        user_address = re.search(r'addresses = \["([^"]+)"', (work / "config.example.toml").read_text()).group(1)
        await c.sendmail(user_address, ["carol@example.net"],
                         f"From: {user_address}\r\nTo: carol@example.net\r\nSubject: hi\r\n\r\nHello.\r\n".encode())
        await c.quit()
        outbox = work / "outbox" / "new"
        deadline = time.monotonic() + 30
        while not (outbox.is_dir() and any(outbox.iterdir())):
            assert time.monotonic() < deadline, "nothing delivered to ./outbox/new"
            await asyncio.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert proc.returncode == 0, (tmp_path / "first-command.log").read_text()[-3000:]
