"""Server TLS contexts: one certificate pair, as both listeners that take TLS load it."""

from __future__ import annotations

import ssl


def server_context(cert_file: str | None, key_file: str | None) -> ssl.SSLContext | None:
    """A server context holding ``cert_file``/``key_file`` (PEM), or None without a certificate.
    Kept by its listener: SIGHUP loads a renewed pair into it."""
    if not cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx
