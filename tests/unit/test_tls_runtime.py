"""TLS at run time: loaders, the server context (SNI, re-read certificates, tuning), the client context.

Every handshake is real: an asyncio TLS server on 127.0.0.1 with the context
`server_context` built from compiled config text, and an `ssl` client.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import re
import ssl
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from pymaddy.compiler.graph import Graph
from pymaddy.runtime import metrics
from pymaddy.runtime.log import Logger, Output
from pymaddy.runtime.module import ModuleError, RuntimeContext
from pymaddy.runtime.options import RunOptions
from pymaddy.tls.client import client_context
from pymaddy.tls.loaders import FileLoader, SelfSignedLoader, TLSLoader
from pymaddy.tls.schema import TLSServerConfig
from pymaddy.tls.server import server_context
from tests.confhelp import compile_text

T = TypeVar("T")
HOST = "hostname mx.example.org\n"
LOADERS: dict[str, type[TLSLoader]] = {"tls.loader.file": FileLoader, "tls.loader.self_signed": SelfSignedLoader}


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# -- certificates -------------------------------------------------------------------------------

KeyMaker = Callable[[], Any]
KEYS: dict[str, tuple[KeyMaker, serialization.PrivateFormat]] = {
    "rsa-pkcs8": (lambda: rsa.generate_private_key(65537, 2048), serialization.PrivateFormat.PKCS8),
    "rsa-pkcs1": (lambda: rsa.generate_private_key(65537, 2048), serialization.PrivateFormat.TraditionalOpenSSL),
    "ec-sec1": (lambda: ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.TraditionalOpenSSL),
    "ec-pkcs8": (lambda: ec.generate_private_key(ec.SECP384R1()), serialization.PrivateFormat.PKCS8),
    "ed25519": (ed25519.Ed25519PrivateKey.generate, serialization.PrivateFormat.PKCS8),
}


def write_pair(cert_path: Path, key_path: Path, cn: str, names: list[str], kind: str = "ec-sec1") -> x509.Certificate:
    """A self-signed cert (CN identifies it in assertions), replaced by rename like a renewal would."""
    make, fmt = KEYS[kind]
    key = make()
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(key, None if kind == "ed25519" else hashes.SHA256())
    for path, data in (
        (cert_path, cert.public_bytes(serialization.Encoding.PEM)),
        (key_path, key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())),
    ):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return cert


def cn_of(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# -- runtime objects from config text ---------------------------------------------------------------


class Capture(Output):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, stamp: float, debug: bool, msg: str) -> None:
        self.lines.append(msg)


class Env:
    """A compiled config's loaders, started, and the endpoint's `tls` setting."""

    def __init__(self, graph: Graph, tmp: Path) -> None:
        self.out = Capture()
        self.ctx = RuntimeContext(
            options=RunOptions(config="maddy.conf"),
            graph=graph,
            generation=1,
            logger=Logger(out=self.out, debug=True),
            metrics=metrics.REGISTRY,
            state_dir=str(tmp),
            runtime_dir=str(tmp),
        )
        self.tls: TLSServerConfig | None = graph.endpoints[0].settings["tls"] if graph.endpoints else None
        self.loaders: list[TLSLoader] = []
        for inst in graph.instances:
            cls = LOADERS.get(inst.schema.name)
            if cls is not None:
                obj = cls(inst, self.ctx)
                self.ctx.objects[id(inst)] = obj
                self.loaders.append(obj)

    @property
    def loader(self) -> TLSLoader:
        assert self.tls is not None and self.tls.loader is not None
        return self.ctx.objects[id(self.tls.loader)]  # type: ignore[return-value]

    async def start(self, interval: float | None = None) -> None:
        for obj in self.loaders:
            if interval is not None and isinstance(obj, FileLoader):
                obj.reload_interval = interval
            await obj.start()

    async def stop(self) -> None:
        for obj in self.loaders:
            await obj.stop()


def env_of(text: str, tmp: Path) -> Env:
    res = compile_text(text)
    assert not [str(e) for e in res.errors]
    assert res.graph is not None
    return Env(res.graph, tmp)


def smtp(tls: str) -> str:
    return HOST + f"smtp tcp://127.0.0.1:0 {{\n {tls}\n deliver_to dummy\n}}\n"


def no_verify(
    lo: ssl.TLSVersion | None = None, hi: ssl.TLSVersion | None = None, ciphers: str | None = None
) -> ssl.SSLContext:
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if ciphers:
            c.set_ciphers(ciphers)
        if lo is not None:
            c.minimum_version = lo
        if hi is not None:
            c.maximum_version = hi
    return c


class TLSServer:
    """An asyncio TLS server that greets and closes; `handshake()` returns what the client saw."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> TLSServer:
        async def greet(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                w.write(b"hi\n")
                await w.drain()
            finally:
                w.close()

        self.server = await asyncio.start_server(greet, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def handshake(self, sni: str | None, client: ssl.SSLContext | None = None) -> ssl.SSLObject:
        r, w = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", self.port, ssl=client or no_verify(), server_hostname=sni or "", ssl_handshake_timeout=5
            ),
            5,
        )
        try:
            assert await asyncio.wait_for(r.readline(), 5) == b"hi\n"
            obj: ssl.SSLObject = w.get_extra_info("ssl_object")
            return obj
        finally:
            w.close()

    async def cn(self, sni: str | None) -> str:
        der = (await self.handshake(sni)).getpeercert(binary_form=True)
        assert der is not None
        return cn_of(der)


# -- tls.loader.file: SNI ----------------------------------------------------------------------------


@pytest.fixture
def two_pairs(tmp_path: Path) -> tuple[Path, ...]:
    a_crt, a_key, b_crt, b_key = (tmp_path / n for n in ("a.crt", "a.key", "b.crt", "b.key"))
    write_pair(a_crt, a_key, "A", ["mail.a.test"])
    write_pair(b_crt, b_key, "B", ["*.b.test", "b.test"], kind="rsa-pkcs8")
    return a_crt, a_key, b_crt, b_key


def test_sni_picks_certificate(tmp_path: Path, two_pairs: tuple[Path, ...]) -> None:
    env = env_of(smtp("tls file " + " ".join(f'"{p}"' for p in two_pairs)), tmp_path)

    async def main() -> None:
        await env.start()
        ctx = server_context(env.tls, env.ctx)
        assert ctx is not None
        async with TLSServer(ctx) as srv:
            assert await srv.cn("mail.a.test") == "A"
            assert await srv.cn("MAIL.A.TEST.") == "A"
            assert await srv.cn("mx.b.test") == "B"  # wildcard
            assert await srv.cn("b.test") == "B"
            assert await srv.cn("deep.mx.b.test") == "A"  # `*.` covers one label only: first pair
            assert await srv.cn("other.test") == "A"
            assert await srv.cn(None) == "A"  # no SNI
        await env.stop()

    run(main())


def test_certs_and_keys_directives(tmp_path: Path, two_pairs: tuple[Path, ...]) -> None:
    a_crt, a_key, b_crt, b_key = two_pairs
    text = smtp(f'tls {{\n  loader file "{b_crt}" "{b_key}" {{\n   certs "{a_crt}"\n   keys "{a_key}"\n  }}\n }}')
    env = env_of(text, tmp_path)

    async def main() -> None:
        await env.start()
        assert [p.leaf.subject.rfc4514_string() for p in env.loader.pairs] == ["CN=A", "CN=B"]
        await env.stop()

    run(main())


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_key_formats(tmp_path: Path, kind: str) -> None:
    crt, key = tmp_path / "c.pem", tmp_path / "k.pem"
    write_pair(crt, key, kind, ["mx.example.org"], kind=kind)
    env = env_of(smtp(f'tls file "{crt}" "{key}"'), tmp_path)

    async def main() -> None:
        await env.start()
        ctx = server_context(env.tls, env.ctx)
        assert ctx is not None
        async with TLSServer(ctx) as srv:
            assert await srv.cn("mx.example.org") == kind
        await env.stop()

    run(main())


def test_combined_cert_and_key_file(tmp_path: Path) -> None:
    crt, key, both = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "both.pem"
    write_pair(crt, key, "C", ["mx.example.org"])
    both.write_bytes(crt.read_bytes() + key.read_bytes())
    env = env_of(smtp(f'tls file "{both}" "{both}"'), tmp_path)

    async def main() -> None:
        await env.start()
        assert env.loader.pairs[0].dns_names == ("mx.example.org",)
        await env.stop()

    run(main())


# -- tls.loader.file: errors, renewal --------------------------------------------------------------------


def test_bad_files_refuse_start(tmp_path: Path) -> None:
    crt, key, other = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "o.pem"
    write_pair(crt, key, "C", ["x.test"])
    write_pair(other, tmp_path / "o.key", "O", ["x.test"])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (tmp_path / "missing.pem", key, "no such file or directory"),
        (garbage, key, "failed to find any PEM data in certificate input"),
        (crt, garbage, "failed to find any PEM data in key input"),
        (other, key, "private key does not match public key"),
    ]
    for c, k, why in cases:
        env = env_of(smtp(f'tls file "{c}" "{k}"'), tmp_path)

        async def main(env: Env = env) -> None:
            try:
                await env.start()
            finally:
                await env.stop()

        with pytest.raises(ModuleError) as ei:
            run(main())
        msg = str(ei.value)
        assert msg.startswith(f"tls.loader.file: failed to load {c} and {k}: "), msg
        assert why.lower() in msg.lower(), msg


def test_renewed_files_served_after_reread(tmp_path: Path) -> None:
    crt, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    write_pair(crt, key, "OLD", ["mx.example.org"])
    env = env_of(smtp(f'tls file "{crt}" "{key}"'), tmp_path)

    async def main() -> None:
        await env.start(interval=0)  # no timer: reloads only when asked
        ctx = server_context(env.tls, env.ctx)
        assert ctx is not None
        loader = env.loader
        assert isinstance(loader, FileLoader)
        async with TLSServer(ctx) as srv:
            assert await srv.cn("mx.example.org") == "OLD"
            write_pair(crt, key, "NEW", ["mx.example.org"], kind="rsa-pkcs1")  # acme.sh renews
            assert await srv.cn("mx.example.org") == "OLD"  # not re-read yet
            assert await loader.reload() is True
            assert await srv.cn("mx.example.org") == "NEW"
            assert await srv.cn(None) == "NEW"
            # A re-read of unchanged files keeps the same objects (and cached contexts).
            version = loader.version
            assert await loader.reload() is True
            assert loader.version == version
        await env.stop()

    run(main())


def test_periodic_reread(tmp_path: Path) -> None:
    crt, key = tmp_path / "c.pem", tmp_path / "k.pem"
    write_pair(crt, key, "OLD", ["mx.example.org"])
    env = env_of(smtp(f'tls file "{crt}" "{key}"'), tmp_path)

    async def main() -> None:
        await env.start(interval=0.05)
        ctx = server_context(env.tls, env.ctx)
        assert ctx is not None
        async with TLSServer(ctx) as srv:
            write_pair(crt, key, "NEW", ["mx.example.org"])
            for _ in range(100):
                if env.loader.version > 1:
                    break
                await asyncio.sleep(0.02)
            assert await srv.cn("mx.example.org") == "NEW"
        await env.stop()

    run(main())
    assert any("tls.loader.file: reloading certs" in line for line in env.out.lines)


def test_broken_renewal_keeps_old_certificate(tmp_path: Path) -> None:
    crt, key = tmp_path / "c.pem", tmp_path / "k.pem"
    write_pair(crt, key, "OLD", ["mx.example.org"])
    env = env_of(smtp(f'tls file "{crt}" "{key}"'), tmp_path)

    async def main() -> None:
        await env.start(interval=0)
        ctx = server_context(env.tls, env.ctx)
        assert ctx is not None
        loader = env.loader
        assert isinstance(loader, FileLoader)
        async with TLSServer(ctx) as srv:
            crt.write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")  # half-written renewal
            assert await loader.reload() is False
            assert await srv.cn("mx.example.org") == "OLD"
            write_pair(tmp_path / "other.pem", key, "MISMATCH", ["mx.example.org"])
            write_pair(crt, tmp_path / "other.key", "NEW", ["mx.example.org"])  # key not renewed yet
            assert await loader.reload() is False
            assert await srv.cn("mx.example.org") == "OLD"
        await env.stop()

    run(main())
    errors = [line for line in env.out.lines if "reload failed" in line]
    assert len(errors) == 2
    assert errors[0].startswith(f'tls.loader.file: reload failed\t{{"reason":"failed to load {crt} and {key}: ')


# -- server tuning ---------------------------------------------------------------------------------------


def test_tls_off_and_no_tls() -> None:
    env = env_of(smtp("tls off"), Path("/tmp"))
    assert server_context(env.tls, env.ctx) is None
    assert server_context(TLSServerConfig(None, ("tls1.0", None), None, None), env.ctx) is None


def _offer(srv: TLSServer, version: ssl.TLSVersion) -> Coroutine[Any, Any, ssl.SSLObject]:
    return srv.handshake("mx.example.org", no_verify(version, version, "DEFAULT:@SECLEVEL=0"))


def test_protocols_min_max(tmp_path: Path) -> None:
    strict = env_of(smtp("tls self_signed {\n  protocols tls1.2 tls1.3\n }"), tmp_path)
    legacy = env_of(smtp("tls self_signed"), tmp_path)  # maddy's default: TLS 1.0 and up
    only12 = env_of(smtp("tls self_signed {\n  protocols tls1.2 tls1.2\n }"), tmp_path)

    async def main() -> str | None:
        for e in (strict, legacy, only12):
            await e.start()
        s_ctx, l_ctx, o_ctx = (server_context(e.tls, e.ctx) for e in (strict, legacy, only12))
        assert s_ctx is not None and l_ctx is not None and o_ctx is not None
        assert s_ctx.options & ssl.OP_NO_TICKET
        skipped = None
        async with TLSServer(s_ctx) as s, TLSServer(l_ctx) as lg, TLSServer(o_ctx) as o:
            assert (await _offer(s, ssl.TLSVersion.TLSv1_2)).version() == "TLSv1.2"
            assert (await _offer(s, ssl.TLSVersion.TLSv1_3)).version() == "TLSv1.3"
            assert (await _offer(o, ssl.TLSVersion.TLSv1_2)).version() == "TLSv1.2"
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await _offer(o, ssl.TLSVersion.TLSv1_3)
            try:  # can this OpenSSL speak TLS 1.1 at all? The default config must accept it.
                legacy_ok = (await _offer(lg, ssl.TLSVersion.TLSv1_1)).version() == "TLSv1.1"
            except (ssl.SSLError, ConnectionError, ValueError) as err:
                legacy_ok, skipped = False, f"local OpenSSL cannot offer TLS 1.1: {err!r}"
            if legacy_ok:
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    await _offer(s, ssl.TLSVersion.TLSv1_1)
        for e in (strict, legacy, only12):
            await e.stop()
        return skipped

    skipped = run(main())
    if skipped:
        pytest.skip(skipped)


def test_ciphers_and_curves(tmp_path: Path) -> None:
    crt, key = tmp_path / "c.pem", tmp_path / "k.pem"
    write_pair(crt, key, "R", ["mx.example.org"], kind="rsa-pkcs8")
    tuning = "protocols tls1.2 tls1.2\n  ciphers ECDHE-RSA-WITH-AES256-GCM-SHA384 ECDHE-RSA-WITH-AES128-GCM-SHA256"
    env = env_of(smtp(f'tls file "{crt}" "{key}" {{\n  {tuning}\n  curves p384 X25519\n }}'), tmp_path)

    async def main() -> None:
        await env.start()
        ctx = server_context(env.tls, env.ctx)
        assert ctx is not None
        assert [c["name"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"] == [
            "ECDHE-RSA-AES256-GCM-SHA384",
            "ECDHE-RSA-AES128-GCM-SHA256",
        ]
        async with TLSServer(ctx) as srv:
            client = no_verify(ciphers="ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384")
            obj = await srv.handshake("mx.example.org", client)
            cipher = obj.cipher()
            assert cipher is not None and cipher[0] == "ECDHE-RSA-AES256-GCM-SHA384"  # server order
        await env.stop()

    run(main())


def test_unavailable_ciphers_refuse_start(tmp_path: Path) -> None:
    env = env_of(smtp("tls self_signed {\n  ciphers RSA-WITH-RC4128-SHA\n }"), tmp_path)

    async def main() -> None:
        await env.start()
        try:
            server_context(env.tls, env.ctx)
        finally:
            await env.stop()

    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        probe.set_ciphers("RC4-SHA:@SECLEVEL=0")
    except ssl.SSLError:
        with pytest.raises(ModuleError, match="tls: none of the ciphers RSA-WITH-RC4128-SHA is available in "):
            run(main())
    else:
        pytest.skip("this OpenSSL still has RC4")


# -- tls.loader.self_signed --------------------------------------------------------------------------------


def test_self_signed_properties(tmp_path: Path) -> None:
    env = env_of(smtp("tls self_signed mx.example.org 127.0.0.1 ::1"), tmp_path)

    async def main() -> None:
        await env.start()
        ctx = server_context(env.tls, env.ctx)
        assert ctx is not None
        async with TLSServer(ctx) as srv:
            der = (await srv.handshake("mx.example.org")).getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
        assert cert.subject.rfc4514_string() == "O=Maddy Self-Signed"
        assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=7)
        assert abs(cert.not_valid_before_utc - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["mx.example.org"]
        assert san.get_values_for_type(x509.IPAddress) == [
            ipaddress.ip_address("127.0.0.1"),
            ipaddress.ip_address("::1"),
        ]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
        await env.stop()

    run(main())


def test_self_signed_default_name_and_fresh_each_start(tmp_path: Path) -> None:
    env = env_of(smtp("tls self_signed"), tmp_path)

    async def main() -> None:
        await env.start()
        first = env.loader.pairs[0]
        assert first.dns_names == ("mx.example.org",)
        await env.stop()
        again = env_of(smtp("tls self_signed"), tmp_path)
        await again.start()
        assert again.loader.pairs[0].leaf.serial_number != first.leaf.serial_number
        await again.stop()

    run(main())


# -- tls_client --------------------------------------------------------------------------------------------


def test_client_root_ca_and_client_certificate(tmp_path: Path) -> None:
    srv_crt, srv_key = tmp_path / "srv.crt", tmp_path / "srv.key"
    cli_crt, cli_key = tmp_path / "cli.crt", tmp_path / "cli.key"
    write_pair(srv_crt, srv_key, "SRV", ["mx.example.org"])
    write_pair(cli_crt, cli_key, "CLIENT", ["client.example.org"], kind="rsa-pkcs1")
    text = HOST + f'tls_client {{\n root_ca "{srv_crt}"\n cert "{cli_crt}"\n key "{cli_key}"\n}}\n'
    env = env_of(text + smtp(f'tls file "{srv_crt}" "{srv_key}"').removeprefix(HOST), tmp_path)
    settings = env.ctx.globals["tls_client"]

    async def main() -> None:
        await env.start()

        def ask_client_cert(c: ssl.SSLContext) -> None:
            # The server asks for a client certificate signed by the client's own (self-signed) CA.
            c.verify_mode = ssl.CERT_REQUIRED
            c.load_verify_locations(cafile=str(cli_crt))

        ctx = server_context(env.tls, env.ctx, customize=ask_client_cert)
        assert ctx is not None
        client = client_context(settings)
        assert client.minimum_version == ssl.TLSVersion.TLSv1_2  # Go's client default
        async with TLSServer(ctx) as srv:
            obj = await srv.handshake("mx.example.org", client)
            der = obj.getpeercert(binary_form=True)
            assert der is not None and cn_of(der) == "SRV"
            with pytest.raises(ssl.SSLCertVerificationError):
                await srv.handshake("wrong.example.org", client)
            with pytest.raises(ssl.SSLCertVerificationError):  # the system pool does not know it
                await srv.handshake("mx.example.org", client_context(None))
        await env.stop()

    run(main())


def test_client_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing here\n")
    with pytest.raises(ModuleError, match=re.escape(f"tls_client: no certificates was loaded from {empty}")):
        client_context({"root_ca": [str(empty)]})
    with pytest.raises(ModuleError, match=re.escape("tls_client: open /nonexistent.pem: No such file")):
        client_context({"root_ca": ["/nonexistent.pem"]})
    crt, key = tmp_path / "c.pem", tmp_path / "k.pem"
    write_pair(crt, key, "C", ["x.test"])
    with pytest.raises(ModuleError, match=re.escape(f"failed to load {crt} and {empty}")):
        client_context({"cert": str(crt), "key": str(empty)})
    pinned = client_context({"protocols": ("tls1.3", "tls1.3")})
    assert pinned.minimum_version == pinned.maximum_version == ssl.TLSVersion.TLSv1_3


def test_key_material_stays_off_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pymaddy.tls.loaders import load_into, make_self_signed

    pair = make_self_signed(["localhost"])
    before = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()
    load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), pair)  # memfd where available
    if before:
        assert set(os.listdir("/proc/self/fd")) == before
    # Without memfd: a private temp file, removed at once.
    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_into(ctx, pair)
    assert list(tmp_path.iterdir()) == []
