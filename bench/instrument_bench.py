"""Instrumentation cost, measured in one run:

- throughput (MB/s of HTML) of parse + render for 10 KB, 100 KB and 1 MB HTML bodies, beside a
  plain lxml parse + serialize of the same HTML;
- the cost of 100 recipients' copies against 1 (one parse, then splicing per copy);
- peak memory (tracemalloc) rendering a message with a 50 MB attachment.

    .venv/bin/python bench/instrument_bench.py
"""

from __future__ import annotations

import base64
import os
import sys
import time
import tracemalloc
from pathlib import Path

import lxml.html

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay import instrument  # noqa: E402
from trackrelay.links import Keyring  # noqa: E402

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
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time and n >= 3:
            return elapsed / n


def main() -> None:
    print("| HTML size | trackrelay parse+render MB/s | lxml parse+serialize MB/s | ratio |")
    print("|---|---:|---:|---:|")
    for size in (10_000, 100_000, 1_000_000):
        html = html_of(size)
        raw = message_of(html)
        ours = timeit(lambda: instrument.render(instrument.parse(raw, PUBLIC), plan("T" * 27)))
        theirs = timeit(lambda: lxml.html.tostring(lxml.html.document_fromstring(html)))
        mb = len(html.encode()) / 1e6
        print(f"| {size // 1000} KB | {mb / ours:.1f} | {mb / theirs:.1f} | {theirs / ours:.2f} |")

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
