"""Running a benchmarked server from a given checkout (this tree, or an earlier commit's `git worktree`).

The server runs with this venv's python, PYTHONPATH=<checkout> and its working directory in the
checkout: `python -m` and the event writer's `python -c` put the working directory first on
sys.path, so a server started from /work/main would import /work/main's packages whatever
PYTHONPATH says. The checkout's packages then come before the editable install's (its finder is
on sys.meta_path after PathFinder). `verify` proves it before a figure is taken: a probe run with
the very same interpreter, environment and directory imports the server's modules and fails if any
of the project's modules comes from outside the checkout (e.g. `core` from this tree, which an
earlier checkout does not have).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PACKAGES = ("core", "trackrelay", "relay", "storage", "tracker_http")

_PROBE = r"""
import sys
root = sys.argv[1]
import trackrelay.cli, trackrelay.service, tracker_http.writer  # the server's and its writer's imports
bad = sorted(f"{name}: {getattr(m, '__file__', None) or list(getattr(m, '__path__', []))}"
             for name, m in list(sys.modules.items())
             if name.split(".")[0] in %r
             and not all(str(p).startswith(root + "/")
                         for p in ([m.__file__] if getattr(m, "__file__", None) else list(getattr(m, "__path__", []))[:1])))
if bad:
    sys.exit("modules from outside " + root + ":\n  " + "\n  ".join(bad))
print(sum(1 for name in sys.modules if name.split(".")[0] in %r))
""" % (PACKAGES, PACKAGES)


def env(root: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(root))


def verify(root: Path) -> str:
    """Check a server started by `env(root)` in `cwd=root` runs root's code; its commit, for the header."""
    if not (root / "trackrelay" / "cli.py").is_file():
        raise SystemExit(f"{root}: not a trackrelay checkout (no trackrelay/cli.py)")
    probe = subprocess.run([sys.executable, "-c", _PROBE, str(root)], env=env(root), cwd=root,
                           capture_output=True, text=True)
    if probe.returncode:
        raise SystemExit(f"{root}: a server started there would not run its own code:\n{probe.stderr}")
    commit = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (commit or "?") + (" with uncommitted changes" if dirty else "")
