"""Instrumentation cost, measured in one run:

- the HTML scanner alone and parse + render (MB/s of HTML), the standard-conformant scanner side by
  side with the scanner of an older revision (``--old-rev``, default the last one before it; loaded
  from ``git show REV:relay/html_scan.py`` into a temporary module, never kept in the package),
  rounds alternating and best of rounds kept, for 10 KB, 100 KB and 1 MB of link-dense HTML and for
  the real-world templates in ../shared/corpus/html (when present); beside a plain lxml parse +
  serialize of the same HTML;
- the cost of 100 recipients' copies against 1 (one parse, then splicing per copy);
- peak memory (tracemalloc) rendering a message with a 50 MB attachment.

    .venv/bin/python bench/instrument_bench.py [--old-rev 677fa6e] [--rounds 5]
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import lxml.html

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay import html_scan, instrument  # noqa: E402
from core.links import Keyring  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus" / "html"
#: main's commit before the standard-conformant scanner
OLD_REV = "677fa6e"

PUBLIC = "https://t.example.com"
KEYS = Keyring.from_strings(["bench-key-0123456789abcdef"])


def html_of(size: int) -> str:
    row = ('<tr><td style="padding:8px;font-family:Arial"><p>Paragraph with &amp; entities and a '
           '<a href="https://example.com/p?id={i}&amp;utm_source=mail">link {i}</a>.</p></td></tr>\r\n')
    rows, total, i = [], 0, 0
    while total < size:
        r = row.format(i=i)
        rows.append(r)
        total += len(r)
        i += 1
    return "<html><head><!--[if mso]><style>td{}</style><![endif]--></head><body><table>\r\n" + \
        "".join(rows) + "</table></body></html>\r\n"


def message_of(html: str, attachment: bytes | None = None) -> bytes:
    head = "From: a@example.com\r\nTo: c@ext.test\r\nSubject: bench\r\nMIME-Version: 1.0\r\n"
    if attachment is None:
        return (head + "Content-Type: text/html; charset=utf-8\r\n\r\n" + html).encode()
    b64 = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return (head + 'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\n'
            "Content-Type: text/html; charset=utf-8\r\n\r\n" + html + "\r\n--B\r\n"
            "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n").encode() + \
        b64 + b"\r\n--B--\r\n"


def plan(token: str) -> instrument.Plan:
    return instrument.Plan(token=token, opens=True, clicks=True, public_url=PUBLIC, keyring=KEYS)


def timeit(fn, min_time: float = 1.0) -> float:
    """CPU seconds per call (process time: others' load on a shared machine does not count)."""
    n, t0 = 0, time.process_time()
    while True:
        fn()
        n += 1
        elapsed = time.process_time() - t0
        if elapsed >= min_time and n >= 3:
            return elapsed / n


def old_scanner(rev: str):
    """The scanner of revision ``rev`` as a temporary module, adapted to what instrument expects."""
    source = subprocess.run(["git", "show", f"{rev}:relay/html_scan.py"], cwd=ROOT, check=True,
                            capture_output=True).stdout
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "old_html_scan.py"
        path.write_bytes(source)
        spec = importlib.util.spec_from_file_location("old_html_scan", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["old_html_scan"] = module
        spec.loader.exec_module(module)

    def scan(text: str, prefix: str):
        sc = module.scan(text, prefix)
        for link in sc.links:
            link.reason = getattr(link, "reason", None)
        sc.ambiguous_from = getattr(sc, "ambiguous_from", None)
        return sc
    return scan


def best(fns: dict, rounds: int, min_time: float = 0.3) -> dict:
    """Seconds per call of each function: rounds alternate between them (the order too), best kept."""
    out = {k: float("inf") for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            out[k] = min(out[k], timeit(fns[k], min_time))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-rev", default=OLD_REV)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    old_scan, new_scan = old_scanner(args.old_rev), html_scan.scan

    def copy(raw: bytes, scanner):
        instrument.scan = scanner
        try:
            return instrument.render(instrument.parse(raw, PUBLIC), plan("T" * 27))
        finally:
            instrument.scan = new_scan

    cases = [(f"{size // 1000} KB", html_of(size)) for size in (10_000, 100_000, 1_000_000)]
    if CORPUS.is_dir():
        files = sorted(CORPUS.glob("*.htm*"))
        templates = [p.read_bytes().decode("utf-8", "replace") for p in files]
        cases.append((f"corpus ({len(files)} templates)", templates))
    print(f"Scanner of {args.old_rev} (old) and of this tree (new); MB/s of HTML, best of {args.rounds} "
          "alternating rounds.\n")
    print("| HTML | scan old MB/s | scan new MB/s | new/old speed | parse+render old MB/s | parse+render new MB/s "
          "| new/old speed | lxml parse+serialize MB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, html in cases:
        docs = html if isinstance(html, list) else [html]
        raws = [message_of(h) for h in docs]
        mb = sum(len(h.encode()) for h in docs) / 1e6
        t = best({
            "scan_old": lambda: [old_scan(h, PUBLIC + "/o/") for h in docs],
            "scan_new": lambda: [new_scan(h, PUBLIC + "/o/") for h in docs],
            "copy_old": lambda: [copy(r, old_scan) for r in raws],
            "copy_new": lambda: [copy(r, new_scan) for r in raws],
            "lxml": lambda: [lxml.html.tostring(lxml.html.document_fromstring(h)) for h in docs],
        }, args.rounds)
        print(f"| {label} | {mb / t['scan_old']:.1f} | {mb / t['scan_new']:.1f} | "
              f"{t['scan_old'] / t['scan_new']:.2f} | {mb / t['copy_old']:.1f} | {mb / t['copy_new']:.1f} | "
              f"{t['copy_old'] / t['copy_new']:.2f} | {mb / t['lxml']:.1f} |")

    raw = message_of(html_of(17_000))
    t_parse = timeit(lambda: instrument.parse(raw, PUBLIC))
    parsed = instrument.parse(raw, PUBLIC)
    t_copy = timeit(lambda: instrument.render(parsed, plan("U" * 27)))
    t_one = t_parse + t_copy
    t_hundred = t_parse + 100 * t_copy
    print(f"\n17 KB HTML message: first copy {t_one * 1000:.2f} ms (parse {t_parse * 1000:.2f} + render "
          f"{t_copy * 1000:.2f}); each further copy {t_copy * 1000:.2f} ms = {t_copy / t_one:.2f} of the first; "
          f"100 copies {t_hundred * 1000:.1f} ms = {t_hundred / t_one:.1f}x one copy")

    attachment = os.urandom(50 * 1024 * 1024)
    raw = message_of(html_of(20_000), attachment)
    del attachment
    tracemalloc.start()
    out = instrument.render(instrument.parse(raw, PUBLIC), plan("V" * 27)).data
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"\nmessage of {len(raw) / 1e6:.1f} MB (50 MB attachment, base64): peak extra memory while "
          f"rendering {peak / 1e6:.1f} MB = {peak / len(raw):.2f}x the message size (copy {len(out) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
