"""The signed per-copy reference: ``X-Trackrelay-Ref: tr1.<kid>.<copy id>.<mac>`` on every copy we
deliver, so that a bounce that returns the copy's headers proves which copy it is about.

``mac`` is the first 128 bits of HMAC-SHA256 (unpadded base64url) with the tracker keyring's key
``kid`` (the first key signs, every key verifies, so ``tracker.secret_keys`` can rotate) over
``ref.v1:<copy id>`` — a payload no click URL can have (they hold no ``:``). It cannot be forged or
guessed; it names the copy (``recipients.id``) and nothing else: not the address, not the user.
The form is self-delimiting, so it is found anywhere in a returned message (headers as text,
quoted with ``>``, in the notice).
"""

from __future__ import annotations

import hmac
import re

from core.links import Keyring, _b64e, mac

HEADER = b"X-Trackrelay-Ref"
_FIND = re.compile(rb"(?<![\w.])tr1\.([0-9a-f]{8})\.([0-9]{1,18})\.([A-Za-z0-9_-]{22})(?![\w-])")
#: More than this many candidates in one message is not a bounce of ours: the rest are ignored.
MAX_FOUND = 20


def _payload(copy_id: int) -> bytes:
    return f"ref.v1:{copy_id}".encode("ascii")


def make(keyring: Keyring, copy_id: int) -> str:
    kid = keyring.signing_id
    return f"tr1.{kid}.{copy_id}.{_b64e(mac(keyring.pads[kid], _payload(copy_id)))}"


def header_line(keyring: Keyring, copy_id: int) -> bytes:
    return HEADER + b": " + make(keyring, copy_id).encode("ascii")


def verify(keyring: Keyring, value: str | bytes) -> int | None:
    """The copy id a reference names, or None when it is not one we signed."""
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    found = _FIND.fullmatch(value.strip())
    if found is None:
        return None
    kid, copy_id, sig = found.group(1).decode(), int(found.group(2)), found.group(3)
    pads = keyring.pads.get(kid)
    if pads is None:
        return None
    expected = _b64e(mac(pads, _payload(copy_id))).encode("ascii")
    return copy_id if hmac.compare_digest(expected, sig) else None


def candidates(data: bytes | str) -> list[bytes]:
    """Every string in ``data`` that has the form of a reference (unverified), at most MAX_FOUND."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    out = []
    for m in _FIND.finditer(data):
        if m.group(0) not in out:
            out.append(m.group(0))
            if len(out) >= MAX_FOUND:
                break
    return out


def verified(keyring: Keyring, texts) -> set[int]:
    """The copy ids of the verified references in these texts."""
    ids = set()
    for text in texts:
        for c in candidates(text):
            copy_id = verify(keyring, c)
            if copy_id is not None:
                ids.add(copy_id)
    return ids
