"""A private Postfix instance for the relay bench: the mature MTA measured beside the other rows.

    with PrivatePostfix(relay_port=SINK) as pf:   # listens on 127.0.0.1:pf.port, relays to SINK
        ... send to pf.port ...
        pf.cpu_seconds()                            # CPU of master and every Postfix process so far

Everything of the instance (main.cf, master.cf, queue, data, its mail log) lives in one temporary
directory; the system's /etc/postfix is never read or written, nothing listens but 127.0.0.1:port,
nothing is delivered locally, nothing is looked up in DNS. Postfix's master runs in the foreground
as our child, in its own session, pinned to CPU 0 (its processes inherit the pin); stopping sends
it SIGTERM (it then terminates its process group, like `postfix stop`) and waits until no process
of the instance is left.

Postfix is many processes (master, smtpd per client, cleanup, qmgr, trivial-rewrite, smtp,
anvil, scache, postlogd …) that master starts and reaps: `cpu_seconds` sums user + system time of
every live process whose parent chain leads to master plus the time of those already reaped
(cutime/cstime), so its difference over a run is the whole instance's CPU like `proc_cpu.cpu_seconds`
is a single server's.

`measure_postfix` is the relay bench's row, measured like relay_bench.measure (a warm-up, then n
messages from `clients` concurrent clients, until the sink has every copy; no AUTH, like the bare
row: 127.0.0.0/8 is in mynetworks), except that the warm-up runs at full concurrency so that
Postfix's processes are started, as in a running Postfix. Standalone, a smoke run (`--bare`: the
bare pass-through first, in the same run):

    .venv/bin/python bench/postfix.py [--messages 200] [--clients 16] [--bare]

Postfix needs root (master drops to the `postfix` user for its services) and Linux (/proc).
`ensure_postfix()` installs the Debian package when `postfix` is missing and apt-get is there;
never call it from tests or CI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POSTFIX_COMMAND = "/usr/sbin/postfix"
APT_HINT = ("echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections && "
            "DEBIAN_FRONTEND=noninteractive apt-get install -y postfix")


def postfix_command() -> str | None:
    return shutil.which("postfix") or (POSTFIX_COMMAND if os.access(POSTFIX_COMMAND, os.X_OK) else None)


def ensure_postfix() -> str:
    """The `postfix` command; installs the Debian package (no configuration) if it is missing."""
    cmd = postfix_command()
    if cmd:
        return cmd
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(f"Postfix is not installed and cannot be installed here; as root: {APT_HINT}")
    print("postfix is missing: installing the Debian package (main_mailer_type 'No configuration'; "
          "the system instance stays unconfigured and is never started) …", file=sys.stderr, flush=True)
    subprocess.run(["debconf-set-selections"], input=b"postfix postfix/main_mailer_type select No configuration\n",
                   check=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "postfix"], check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    cmd = postfix_command()
    if not cmd:
        raise RuntimeError("apt-get installed postfix, yet there is no `postfix` command")
    return cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- CPU of a process tree, from /proc -----------------------------------------------------------

def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime + cutime + cstime in ticks) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[1]), int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])


def tree_pids(root: int) -> list[int]:
    """root and every live process whose parent chain leads to it."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st:
                children.setdefault(st[0], []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU of root and all its descendants so far: the live ones' own time and the
    time of the children they have reaped (cutime/cstime, which holds those children's own reaped
    children too). Take differences at quiet moments: a process exiting between the two reads of
    one call can be counted twice or not at all. /proc counts whole clock ticks (10 ms) per
    process: a difference is off by up to a tick for each process, so measure enough messages."""
    ticks = 0
    for pid in tree_pids(root):
        st = _stat(pid)
        if st:
            ticks += st[1]
    return ticks / os.sysconf("SC_CLK_TCK")


def _set_child_subreaper(on: bool) -> bool:
    """prctl(PR_SET_CHILD_SUBREAPER): orphaned descendants become our children (Linux ≥ 3.4)."""
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl(36, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


# -- the private instance ------------------------------------------------------------------------

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
meta_directory = {meta}
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-bench
maillog_file_prefixes = {dir}
maillog_file = {dir}/maillog

myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
relay_domains =
local_recipient_maps =
local_transport = error:5.1.1 local delivery is disabled in this instance
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no

inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{relay_port}
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_peername_lookup = no
smtp_tls_security_level = none
smtpd_tls_security_level = none

default_process_limit = {process_limit}
"""

# Only what an SMTP → relayhost path needs; nothing chrooted; no local/virtual/pipe, no TLS manager.
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PrivatePostfix:
    """A Postfix of its own: listens on 127.0.0.1:port, relays everything to [127.0.0.1]:relay_port.

    Use as a context manager (or start()/stop()). `pid` is master's; `cpu_seconds()` the instance's
    CPU so far; `maillog` its mail log; `argv` the command that runs master in the foreground (for a
    caller that starts it itself: run it in its own session, e.g. Popen(start_new_session=True),
    after `prepare()`).
    """

    def __init__(self, relay_port: int, port: int | None = None, process_limit: int = 100,
                 cpu: int | None = 0, log=None):
        self.relay_port = relay_port
        self.port = port or _free_port()
        self.process_limit = process_limit
        self.cpu = cpu if cpu is not None and (os.cpu_count() or 1) > cpu else None
        self.log = log  # a file for master's stderr (default: kept in the instance's directory)
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None
        self._err = None

    # the instance's files
    @property
    def config_dir(self) -> Path:
        return self.dir / "etc"

    @property
    def maillog(self) -> Path:
        return self.dir / "maillog"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def argv(self) -> list[str]:
        daemon_dir = self._postconf("daemon_directory")
        return [str(Path(daemon_dir) / "master"), "-c", str(self.config_dir), "-d"]

    def _postconf(self, name: str, default: bool = False) -> str:
        postconf = str(Path(ensure_postfix()).with_name("postconf"))
        args = [postconf, "-h"] + (["-d"] if default else ["-c", str(self.config_dir)]) + [name]
        return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()

    def prepare(self) -> None:
        """Writes the configuration and lets `postfix check` create the queue with its owners."""
        cmd = ensure_postfix()
        if os.geteuid() != 0:
            raise RuntimeError("a private Postfix needs root (master starts its services as the postfix user)")
        self.dir = Path(tempfile.mkdtemp(prefix="postfix-bench-"))
        os.chmod(self.dir, 0o755)  # the postfix user's services reach the queue through it
        self.config_dir.mkdir()
        for sub in ("queue", "data"):
            (self.dir / sub).mkdir()
        shutil.chown(self.dir / "data", "postfix", "postfix")
        (self.config_dir / "main.cf").write_text(MAIN_CF.format(
            dir=self.dir, meta=self._postconf("meta_directory", default=True),
            relay_port=self.relay_port, process_limit=self.process_limit))
        (self.config_dir / "master.cf").write_text(MASTER_CF.format(port=self.port))
        r = subprocess.run([cmd, "-c", str(self.config_dir), "check"], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"postfix check failed for {self.config_dir}:\n{r.stdout}{r.stderr}")

    def start(self, timeout: float = 30) -> "PrivatePostfix":
        if self.dir is None:
            self.prepare()
        cpu = self.cpu
        if self.log is None:
            self._err = open(self.dir / "master.stderr", "w+b")
        err = self.log or self._err
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True,  # its own process group: master's SIGTERM reaches only its own
            preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    state = "timed out" if self.proc.poll() is None else f"master exited {self.proc.returncode}"
                    why = self.diagnostics()
                    self.stop()
                    raise RuntimeError(f"Postfix did not come up on 127.0.0.1:{self.port} ({state}; "
                                       f"port taken?):\n{why}")
                time.sleep(0.05)

    def diagnostics(self) -> str:
        """The ends of master's stderr and of the mail log (while the instance's directory exists)."""
        if self.dir is None:
            return "(the instance's directory is gone)"
        out = []
        for f in (self.dir / "master.stderr", self.maillog):
            if f.exists():
                out.append(f"--- {f.name}\n" + "".join(f.read_text(errors="replace").splitlines(True)[-30:]))
        return "\n".join(out)

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def processes(self, zombies: bool = False) -> list[int]:
        """Processes of the instance (master's session: its process group and anything forked);
        exited ones not yet reaped (zombies) only if asked."""
        if self.proc is None:
            return []
        sid = self.proc.pid
        pids = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                except (FileNotFoundError, ProcessLookupError):
                    continue
                if int(fields[3]) == sid and (zombies or fields[0] != "Z"):  # fields[3]: session id
                    pids.append(int(entry.name))
        return pids

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to master (it terminates its process group and exits without waiting for it);
        its services, orphaned, become our children for the while (PR_SET_CHILD_SUBREAPER) and are
        reaped here; SIGKILL to the group after timeout. Then removes the instance's directory."""
        try:
            if self.proc is not None:
                subreaper = _set_child_subreaper(True)
                try:
                    if self.proc.poll() is None:
                        self.proc.send_signal(signal.SIGTERM)
                        try:
                            self.proc.wait(timeout)
                        except subprocess.TimeoutExpired:
                            os.killpg(self.proc.pid, signal.SIGKILL)
                            self.proc.wait(10)
                    deadline, killed = time.monotonic() + timeout, False
                    while left := self.processes(zombies=True):
                        for pid in left:  # only the instance's own: other children are not ours to reap
                            try:
                                os.waitpid(pid, os.WNOHANG)
                            except ChildProcessError:  # not ours (no subreaper): pid 1 reaps it
                                pass
                        if time.monotonic() > deadline:
                            if killed or not subreaper:
                                break
                            try:
                                os.killpg(self.proc.pid, signal.SIGKILL)
                            except ProcessLookupError:
                                pass
                            deadline, killed = deadline + timeout, True
                        time.sleep(0.02)
                finally:
                    if subreaper:
                        _set_child_subreaper(False)
                left = self.processes()
                if left:
                    raise RuntimeError(f"Postfix processes left after stop: {left}")
        finally:
            if self._err is not None:
                self._err.close()
                self._err = None
            if self.dir is not None and not os.environ.get("POSTFIX_BENCH_KEEP"):  # KEEP: to read its maillog
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def __enter__(self) -> "PrivatePostfix":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- the relay bench's row -----------------------------------------------------------------------

NAME = "Postfix {version}, fsync before 250, relayhost = the sink"


async def measure_postfix(sink, sink_port: int, n: int, clients: int, load, until,
                          recipients: int = 1, process_limit: int = 100) -> dict:
    """One row, measured like relay_bench.measure: the caller's `load(port, n, clients, auth)` and
    `until(sink, copies)` (relay_bench's own, passed in so its globals, e.g. RECIPIENTS, hold) and its
    CountingSink listening on sink_port. Same keys as measure's dict; cpu_ms is the whole instance's."""
    pf = PrivatePostfix(sink_port, process_limit=process_limit)
    pf.start()  # blocks the loop a second or so: nothing is in flight (and Popen's preexec_fn wants no threads)
    try:
        version = pf._postconf("mail_version")
        # Warm up at full concurrency: a running Postfix has its processes (one smtpd per client,
        # cleanups, smtp clients) already started and reuses them (max_use 100, max_idle 100 s).
        sink.count, sink.copies = 0, 0  # a previous row's copies must not end this wait early
        await load(pf.port, max(50, clients), clients, False)
        await asyncio.wait_for(until(sink, max(50, clients) * recipients), 120)
        sink.count, sink.copies, sink.want = 0, 0, n * recipients
        sink.done.clear()
        cpu0 = pf.cpu_seconds()
        t0 = time.perf_counter()
        lat = await load(pf.port, n, clients, False)
        t_accepted = time.perf_counter() - t0
        await asyncio.wait_for(sink.done.wait(), 300)
        t_delivered = time.perf_counter() - t0
        cpu = pf.cpu_seconds() - cpu0
    except BaseException:
        print(pf.diagnostics(), file=sys.stderr)
        raise
    finally:
        pf.stop()
    lat.sort()
    return {
        "name": NAME.format(version=version), "messages": n,
        "accepted_per_s": n / t_accepted,
        "delivered_per_s": n / t_delivered,
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000,
        "cpu_ms": cpu / n * 1000,
    }


async def _smoke(n: int, clients: int, bare: bool) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import relay_bench  # noqa: E402  (its CountingSink, load and _until: the bench's own protocol)
    from aiosmtpd.smtp import SMTP

    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})
    sink = relay_bench.CountingSink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(sink, hostname="sink.test", decode_data=False), "127.0.0.1", 0)
    sink_port = server.sockets[0].getsockname()[1]
    rows = []
    try:
        if bare:  # the baseline in the same run, for a ratio
            port = relay_bench.free_port()
            rows.append(await relay_bench.measure(
                "bare aiosmtpd → aiosmtplib pass-through",
                [sys.executable, relay_bench.__file__, "--bare", str(port), str(sink_port)],
                port, sink, n, clients, auth=False))
            assert sink.copies == n, f"bare: the sink has {sink.copies} of {n} copies"
        rows.append(await measure_postfix(sink, sink_port, n, clients, relay_bench.load, relay_bench._until))
        assert sink.copies == n, f"Postfix: the sink has {sink.copies} of {n} copies"
    finally:
        server.close()
    for r in rows:
        print(f"{r['name']}: {n} messages, {clients} clients, all delivered: "
              f"{r['accepted_per_s']:.0f} accepted/s, {r['delivered_per_s']:.0f} delivered/s, "
              f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, {r['cpu_ms']:.2f} ms CPU/msg")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Smoke run: a private Postfix relaying to a local sink.")
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--bare", action="store_true", help="also measure relay_bench's bare pass-through first")
    args = ap.parse_args()
    asyncio.run(_smoke(args.messages, args.clients, args.bare))
