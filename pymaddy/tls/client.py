"""Client-side TLS: the `tls_client` block as an `ssl.SSLContext` (spec §B.10).

Outbound modules (target.remote, target.smtp/lmtp, …) call
`client_context(settings.get("tls_client"))` in `start()` and keep the result;
building it reads the CA and client-certificate files, so errors surface as
ModuleError at start, like maddy's config-time errors.

* `root_ca FILE…` replaces the system CA pool (each file must hold at least one
  certificate: "no certificates was loaded from FILE").
* `cert` + `key`: the client certificate offered when a server asks for one.
* `protocols`/`ciphers`/`curves`: as for servers (`pymaddy.tls.server.configure`).
  Without `protocols` the minimum is TLS 1.2, Go's client default (maddy leaves
  the versions unset in `tls_client`).
* Hostname checking and verification are on; callers that do opportunistic
  TLS (MX delivery) set `check_hostname = False` / `verify_mode = CERT_NONE`
  on their own copy as their policy requires.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pymaddy.runtime.module import ModuleError
from pymaddy.tls.loaders import load_into, parse_pair
from pymaddy.tls.server import configure

__all__ = ["client_context"]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ModuleError(f"tls_client: open {path}: {e.strerror or e}") from None


def _ca_pem(path: str) -> str:
    data = _read(path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ModuleError(f"tls_client: no certificates was loaded from {path}")
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certs)


def client_context(settings: Mapping[str, Any] | None = None) -> ssl.SSLContext:
    """A verifying client context for a `tls_client` block (None: defaults, system CAs)."""
    s: Mapping[str, Any] = settings or {}
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    present = getattr(s, "present", None)
    written = "protocols" in present if present is not None else s.get("protocols") is not None
    configure(
        ctx,
        s.get("protocols") if written else None,
        s.get("ciphers"),
        s.get("curves"),
        default_min="tls1.2",
    )
    roots = list(s.get("root_ca") or [])
    if roots:
        ctx.load_verify_locations(cadata="".join(_ca_pem(p) for p in roots))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    cert, key = s.get("cert"), s.get("key")
    if cert and key:
        try:
            pair = parse_pair(_read(cert), _read(key), f"{cert} and {key}")
            load_into(ctx, pair)
        except (ValueError, ssl.SSLError) as e:
            raise ModuleError(f"tls_client: failed to load {cert} and {key}: {e}") from None
    return ctx
