"""Config validation (one line naming file and key), the example config, and the small CLI commands."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest

from helpers import PASSWORD, client, simple_message
from core import config as config_mod
from trackrelay.cli import main
from core.passwords import token_hash, verify_password

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trackrelay.cli", *args], input=stdin, text=True,
                          capture_output=True, cwd=cwd, timeout=60)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, key, words", [
    ("[relay]\nlisten_port = 25\n", "relay.listen_port", "unknown key"),
    ("[relayy]\n", "relayy", "unknown key"),
    ("[relay]\nmax_recipients = \"ten\"\n", "relay.max_recipients", "expected an integer"),
    ("[tracking]\nallow = 1\n", "tracking.allow", "expected true or false"),
    ("[tracking]\npixel_position = \"middle\"\n", "tracking.pixel_position", "top or bottom"),
    ("[upstream]\nurl = \"smtp://relay.example.com\"\nusername = \"u\"\npassword_env = \"NO_SUCH_VAR_X\"\n",
     "upstream.password_env", "NO_SUCH_VAR_X is not set"),
    ("[upstream]\nurl = \"smtp://relay.example.com\"\nusername = \"u\"\n", "upstream.password", "required"),
    ("[upstream]\nurl = \"ftp://x\"\n", "upstream.url", "scheme"),
    ("[relay]\nlisten = \"0.0.0.0:587\"\n", "relay.listen", "AUTH without TLS"),
    ("[[users]]\nname = \"a\"\n", "users[0].password_hash", "required"),
    ("[[users]]\nname = \"a\"\npassword_hash = \"plain\"\n", "users[0].password_hash", "hash-password"),
    ("[privacy]\ntracking_bases = [\"consent\", \"vibes\"]\n", "privacy.tracking_bases[1]", "unknown legal basis"),
    ("[storage\n", "-", "not valid TOML"),
])
def test_config_error_is_one_line_naming_file_and_key(tmp_path, text, key, words):
    path = write(tmp_path, text)
    r = run_cli("-c", str(path), "check-config")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(path) in lines[0] and f": {key}: " in lines[0] and words in lines[0], lines[0]


def test_config_error_is_the_same_with_c_after_the_command_word(tmp_path):
    """README's form: `trackrelay check-config -c FILE`."""
    path = write(tmp_path, "[relay]\nmax_recipients = \"ten\"\n")
    before, after = run_cli("-c", str(path), "check-config"), run_cli("check-config", "-c", str(path))
    assert before.returncode == after.returncode == 1
    assert before.stderr == after.stderr and ": relay.max_recipients: " in after.stderr
    ok = run_cli("check-config", "-c", str(ROOT / "config.example.toml"))
    assert ok.returncode == 0 and ok.stdout == f"{ROOT / 'config.example.toml'}: OK\n"


def test_secret_from_environment_variable(tmp_path):
    cfg = config_mod.from_dict({"upstream": {"url": "smtp://h:25", "username": "u", "password_env": "UP_PW"}},
                               "x.toml", env={"UP_PW": "hunter2"})
    assert cfg.upstream.password == "hunter2"
    assert "hunter2" not in repr(cfg)


def test_plaintext_auth_off_loopback_starts_only_when_allowed():
    cfg = config_mod.from_dict({"relay": {"listen": "0.0.0.0:587", "allow_plaintext_auth": True}}, "x.toml", env={})
    assert any("clear text" in w for w in config_mod.warnings_for(cfg))


def test_example_config_is_valid_and_warns_about_the_example_password(tmp_path):
    r = run_cli("-c", str(ROOT / "config.example.toml"), "check-config")
    assert r.returncode == 0, r.stderr
    assert "example password" in r.stderr


def test_example_config_documents_every_key():
    text = (ROOT / "config.example.toml").read_text()
    for section, cls in config_mod.SECTIONS.items():
        assert f"[{section}]" in text
        for f in config_mod.dataclasses.fields(cls):
            assert f"{f.name} =" in text or f"{f.name}_env =" in text, f"{section}.{f.name} undocumented"
    for section, cls in config_mod.TABLE_ARRAYS.items():
        assert f"[[{section}]]" in text
        for f in config_mod.dataclasses.fields(cls):
            assert f"{f.name} =" in text or f"{f.name}_env =" in text, f"{section}.{f.name} undocumented"


def test_hash_password_reads_stdin_and_verifies():
    r = run_cli("hash-password", stdin="correct horse\n")
    assert r.returncode == 0
    assert verify_password("correct horse", r.stdout.strip())
    assert not verify_password("wrong", r.stdout.strip())


def test_new_token_prints_token_and_its_hash():
    r = run_cli("new-token")
    assert r.returncode == 0
    token = r.stdout.splitlines()[0].split(": ", 1)[1]
    assert f'api_token_hash = "{token_hash(token)}"' in r.stdout


def test_usage_error_exits_2_with_one_line(capsys):
    assert main(["queue", "explode"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trackrelay:")


def test_db_upgrade_creates_the_schema(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(f'[storage]\nurl = "sqlite+aiosqlite:///{tmp_path}/x.db"\n[relay]\nhostname = "h.example"\n')
    r = run_cli("-c", str(p), "db", "upgrade")
    assert r.returncode == 0, r.stderr
    import sqlite3
    with sqlite3.connect(tmp_path / "x.db") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"messages", "recipients", "events", "crm_jobs", "alembic_version"} <= tables


@pytest.fixture
def tls_files(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=relay.example.test"], check=True, capture_output=True)
    return cert, key


async def test_with_a_certificate_auth_is_offered_only_after_starttls(relay, sink, tls_files):
    cert, key = tls_files
    await relay.start(relay={"tls_cert_file": str(cert), "tls_key_file": str(key)})
    c = await client(relay.port, user=None)
    assert "auth" not in c.esmtp_extensions and "starttls" in c.esmtp_extensions
    with pytest.raises(aiosmtplib.SMTPException):
        await c.auth_plain("alice", PASSWORD)
    c.close()
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=True, validate_certs=False,
                        local_hostname="client.test", timeout=10)
    await c.connect()
    await c.ehlo()
    assert "auth" in c.esmtp_extensions
    await c.login("alice", PASSWORD)
    await c.sendmail("alice@example.com", ["carol@ext.test"], simple_message())
    await c.quit()
    (r,) = await sink.wait_for(1)
    assert b"with ESMTPSA" in r.data
