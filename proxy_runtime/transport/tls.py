"""TLS contexts: TLS 1.2 minimum, no null/export/anonymous ciphers, verified server names."""

from __future__ import annotations

import ssl

# Forward-secret AEAD suites only for TLS 1.2 (TLS 1.3 suites are fixed and all strong).
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!eNULL:!EXPORT:!DES:!RC4:!3DES:!MD5:!PSK:!SRP"


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """For the TLS listener (switches connecting to us on 5061)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    """For ClearIP and TLS carriers: the server's certificate and name are verified against the
    system CAs, or ``ca_file`` when given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
