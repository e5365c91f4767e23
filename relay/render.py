"""Render one recipient's copy from the spooled message: instrument (per its plan), add the copy's
signed reference (``X-Trackrelay-Ref``, ``relay.reference``), then DKIM-sign.

Each message is parsed once (an LRU cache keyed by message id); every copy is spliced from that
parse, so the hundredth copy costs a small fraction of the first.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import dkim

from relay import instrument, reference
from relay import message as m
from storage.queue import Claimed, Spooled
from core.config import Config
from core.links import Keyring

CACHE_SIZE = 32
#: Room kept under the upstream's SIZE for our DKIM-Signature (a 4096-bit key's is about 900 octets).
SIGNATURE_ROOM = 1024


class DkimSigner:
    def __init__(self, config: Config):
        self._keys = {d.domain.lower(): (d.selector.encode(), d.domain.encode(),
                                         Path(d.private_key_file).read_bytes()) for d in config.dkim}

    def __bool__(self) -> bool:
        return bool(self._keys)

    def sign(self, data: bytes) -> bytes:
        froms = m.addresses(m.get(data, "from"))
        if not froms:
            return data
        key = self._keys.get(froms[0].rpartition("@")[2])
        if key is None:
            return data
        selector, domain, private = key
        signature = dkim.sign(data, selector, domain, private,
                              include_headers=[b"from", b"to", b"cc", b"subject", b"date", b"message-id",
                                               b"reply-to", b"in-reply-to", b"references", b"mime-version",
                                               b"content-type", b"content-transfer-encoding"],
                              linesep=b"\r\n")
        return signature + data


class CopyRenderer:
    def __init__(self, config: Config, keyring: Keyring):
        self.config = config
        self.keyring = keyring
        self.dkim = DkimSigner(config)
        self._cache: OrderedDict[int, instrument.Parsed] = OrderedDict()
        #: Per message (by id): its spooled bytes and where a copy's reference goes (``_at``).
        self._heads: OrderedDict[int, tuple[bytes, int | None]] = OrderedDict()
        self.parses = 0
        #: The upstream's advertised SIZE once known: a copy that instrumentation would push past
        #: it goes out untouched (a message accepted is a message delivered).
        self.upstream_size: int | None = None

    def _parsed(self, raw: bytes, message: Spooled) -> instrument.Parsed:
        parsed = self._cache.get(message.id)
        if parsed is None or parsed.raw is not raw and parsed.raw != raw:
            parsed = instrument.parse(raw, self.config.tracker.public_url)
            self.parses += 1
            self._cache[message.id] = parsed
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(message.id)
        return parsed

    def _at(self, raw: bytes, message: Spooled) -> int | None:
        """Where every copy of this message gets its reference (``with_reference``'s offset), or
        None when a copy must be looked at itself: the spooled header holds a DKIM-Signature (a
        changed copy loses it, and with it maybe its first field) or a reference. Instrumentation
        changes nothing before a part's own header, and a part's header only in its
        Content-Transfer-Encoding field, so the first field stays where it was in every copy."""
        head = self._heads.get(message.id)
        if head is not None and (head[0] is raw or head[0] == raw):
            self._heads.move_to_end(message.id)
            return head[1]
        top = raw[:m.header_end(raw)].lower()
        at = None
        if b"x-trackrelay-ref" not in top and b"dkim-signature" not in top:
            fs = m.fields(raw)
            at = fs[0].end if fs and fs[0].name == "received" else 0
        self._heads[message.id] = (raw, at)
        while len(self._heads) > CACHE_SIZE:
            self._heads.popitem(last=False)
        return at

    def __call__(self, raw: bytes, message: Spooled, copy: Claimed) -> tuple[bytes, str | None]:
        note = None
        data = raw
        if copy.token and (copy.track_opens or copy.track_clicks):
            t = self.config.tracking
            result = instrument.render(self._parsed(raw, message), instrument.Plan(
                token=copy.token, opens=copy.track_opens, clicks=copy.track_clicks,
                public_url=self.config.tracker.public_url, keyring=self.keyring,
                pixel_position=t.pixel_position, skip_url_text_links=t.skip_url_text_links))
            data = result.data
            note = result.note
            if result.skipped:
                note = "; ".join(filter(None, [note, "skipped: " + ", ".join(sorted(set(result.skipped)))]))
            if data is not raw and self.upstream_size and len(data) + SIGNATURE_ROOM > self.upstream_size:
                note = f"instrumented copy of {len(data)} octets would pass the upstream's SIZE " \
                       f"{self.upstream_size}: delivered untouched"
                data = raw
            elif data is not raw and self._at(raw, message) is None:
                # A body change breaks every signature that came with the message.
                data = m.remove(data, {"dkim-signature"})
        if message.kind == "mail":
            line = reference.header_line(self.keyring, copy.id)
            at = self._at(raw, message)
            data = with_reference(data, line) if at is None else data[:at] + line + b"\r\n" + data[at:]
        if self.dkim:
            data = self.dkim.sign(data)
        return data, note


def with_reference(data: bytes, line: bytes) -> bytes:
    """The copy with our ``X-Trackrelay-Ref`` (``relay.reference``) right below the spooled form's
    first field, our own ``Received:`` (near the top, so a bounce that returns only the first part
    of the headers still has it); a reference that came with the message is removed. It is left
    out of our DKIM signature on purpose: its own MAC is its proof, and a gateway that strips
    X- headers must not break the signature."""
    if b"x-trackrelay-ref" in data[:m.header_end(data)].lower():
        data = m.remove(data, {"x-trackrelay-ref"})
    fs = m.fields(data)
    at = fs[0].end if fs and fs[0].name == "received" else 0
    return data[:at] + line + b"\r\n" + data[at:]
