"""`pymaddy dns` (beyond maddy): the DNS records to publish for the configured mail domains.

For the config given by `-config` it prints, in zone-file form, per local
domain: MX (to the mail host), SPF, the DKIM key of every `modify.dkim` block,
DMARC, MTA-STS and TLS-RPT; for the mail host: A/AAAA (from `--ip`/`--ipv6`,
else a commented placeholder), an SPF record for its HELO name and the DANE
TLSA `3 1 1` record of the certificate the port-25 endpoint serves.

* Mail host: the `hostname` of the smtp endpoint on port 25 (the global one).
* Local domains: `--domain` flags, else the `$(primary_domain)` and
  `$(local_domains)` macros of the main config file, else the domains of the
  `destination` rules that (maybe through msgpipelines) deliver to a storage.
* DKIM: a missing key is created exactly as modify.dkim does at first start
  (the module itself is run, and logs the same lines on stderr), unless
  `--no-create-keys`; the record is the `.dns` file next to the key.
* TLSA: SHA-256 of the certificate's SubjectPublicKeyInfo (`tls file`);
  `self_signed` gets a new key at every start, so it has none.

The output is deterministic (configuration order, no timestamps); the MTA-STS
`id` is a hash of the policy, so it changes exactly when the policy does.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pymaddy.compiler.graph import Graph, ModuleInstance

EXIT_FAIL = 1
EXIT_USAGE = 2
DEFAULT_TTL = 3600
MX_PREFERENCE = 10
TXT_CHUNK = 255  # a zone file's character-string limit (RFC 1035 §3.3)
MTA_STS_MAX_AGE = 604800
LOCAL_DELIVERY = ("target.lmtp",)  # besides any module with the `storage` role
# Errors about running the config as a server, which do not change its records.
SERVER_ONLY = ("unused configuration block", "at least one endpoint should be configured")

HEADER = """\
; DNS records for the mail domains of {config}
; made by `pymaddy dns`; add them to the zone of each domain.
;
;   MX       where other servers deliver mail for the domain: the mail host
;   A/AAAA   the addresses of the mail host
;   SPF      TXT: which hosts may send mail from the domain (RFC 7208; `mx` = the MX hosts);
;            the mail host gets one too, for the bounces it sends with its HELO name
;   DKIM     TXT SELECTOR._domainkey: public key for the signatures modify.dkim adds (RFC 6376)
;   DMARC    TXT _dmarc: policy for mail failing SPF/DKIM alignment, failure reports to postmaster (RFC 7489)
;   MTA-STS  TXT _mta-sts: senders must use TLS with a valid certificate (RFC 8461); the policy shown
;            must also be served at https://mta-sts.DOMAIN/.well-known/mta-sts.txt
;   TLS-RPT  TXT _smtp._tls: where senders report TLS problems (RFC 8460)
;   TLSA     _25._tcp.HOST: DANE pin of the host's certificate key (RFC 7672); only in a DNSSEC-signed zone
;
; Long TXT values are split into several strings, as zone files require; resolvers join them."""


class DNSCommandError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def register(sub: Any, add_globals: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "dns",
        help="print the DNS records to publish for the mail domains (pymaddy extension)",
        description="Print, in zone-file form, the MX, A/AAAA, SPF, DKIM, DMARC, MTA-STS, TLS-RPT and TLSA "
        "records the configuration needs. Missing DKIM keys are created as at the first start: run it as the "
        "user the server runs as (e.g. sudo -u maddy), so the server can read them.",
    )
    add_globals(p)
    p.add_argument("--domain", "-domain", dest="domains", action="append", default=[], metavar="DOMAIN",
                   help="a mail domain (repeatable); replaces the domains found in the config")
    p.add_argument("--ip", "-ip", dest="ips", action="append", default=[], metavar="IPV4",
                   help="IPv4 address of the mail host (repeatable)")
    p.add_argument("--ipv6", "-ipv6", dest="ipv6s", action="append", default=[], metavar="IPV6",
                   help="IPv6 address of the mail host (repeatable)")
    p.add_argument("--ttl", "-ttl", dest="ttl", type=int, default=DEFAULT_TTL, help="TTL of every record")
    p.add_argument("--no-create-keys", "-no-create-keys", dest="no_create", action="store_true",
                   help="do not create missing DKIM keys; say how instead")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace, config_path: str) -> int:
    try:
        out = asyncio.run(build(ns, config_path))
    except DNSCommandError as e:
        for line in e.message.splitlines() or [""]:
            sys.stderr.write(f"Error: {line}\n")
        return e.code
    sys.stdout.write(out)
    return 0


# -- what the config says --------------------------------------------------------------------------


def config_macros(path: str) -> dict[str, list[str]]:
    """The macros the main config file defines (imports included), with `{env:…}` replaced."""
    from pymaddy.config.expand import _FileReader, _Loader, expand_env
    from pymaddy.config.ir import Node

    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    reader = _FileReader(_Loader(), path, 0)
    reader.read(text)
    nodes = [Node(name, list(vals)) for name, vals in reader.macros.items()]
    expand_env(nodes)
    return {n.name: n.args for n in nodes}


def _settings_values(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        yield from value.values()
    elif isinstance(value, list | tuple):
        yield from value


def _pipelines(value: Any) -> Iterator[Any]:
    """Every Pipeline inside a settings value."""
    from pymaddy.pipeline.config import Pipeline

    if isinstance(value, Pipeline):
        yield value
    else:
        for v in _settings_values(value):
            yield from _pipelines(v)


def _delivers_locally(target: Any, seen: set[int]) -> bool:
    """Whether a deliver_to target stores mail here: a storage, LMTP, or a pipeline that does."""
    from pymaddy.pipeline.config import Pipeline

    if id(target) in seen:
        return False
    seen.add(id(target))
    if isinstance(target, Pipeline):
        return any(_rcpt_local(b, seen) for _, b in _rcpt_blocks(target))
    if isinstance(target, ModuleInstance):
        if "storage" in target.schema.roles or target.name in LOCAL_DELIVERY:
            return True
        return any(_delivers_locally(p, seen) for p in _pipelines(target.settings))
    return False


def _rcpt_local(block: Any, seen: set[int]) -> bool:
    return any(_delivers_locally(t, seen) for t in block.targets)


def _rcpt_blocks(pipe: Any) -> Iterator[tuple[str | None, Any]]:
    """(rule key or None for defaults, RcptBlock) of every source of a pipeline."""
    sources = [*pipe.per_source.values(), *(b for _, b in pipe.source_in), pipe.default_source]
    for src in sources:
        if src is None:
            continue
        yield from src.per_rcpt.items()
        for _, b in src.rcpt_in:
            yield None, b
        if src.default_rcpt is not None:
            yield None, src.default_rcpt


def destination_domains(graph: Graph) -> list[str]:
    """Domains named by `destination` rules whose mail ends in a local storage, in config order."""
    out: list[str] = []
    for inst in graph.walk():
        for pipe in _pipelines(inst.settings):
            for key, block in _rcpt_blocks(pipe):
                if key is None or key == "postmaster" or not _rcpt_local(block, set()):
                    continue
                domain = key.rpartition("@")[2]
                if domain and domain not in out:
                    out.append(domain)
    return out


def _port25_endpoint(graph: Graph) -> ModuleInstance | None:
    smtp = [e for e in graph.endpoints if e.name == "smtp"]
    for e in smtp:
        if any(str(getattr(a, "port", "")) == "25" for a in e.settings.get("listen") or []):
            return e
    return smtp[0] if smtp else None


# -- records -----------------------------------------------------------------------------------------


def ascii_name(name: str) -> str:
    """A-label, lower-case form, as zone files want."""
    from pymaddy.mail.address import AddressError, to_ascii_domain

    try:
        return to_ascii_domain(name.rstrip(".").lower())
    except AddressError as e:
        raise DNSCommandError(str(e)) from None


def txt(value: str) -> str:
    """A TXT rdata: quoted strings of at most 255 bytes (parenthesised when split)."""
    chunks = [value[i : i + TXT_CHUNK] for i in range(0, len(value), TXT_CHUNK)] or [""]
    quoted = ['"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks]
    return quoted[0] if len(quoted) == 1 else "( " + " ".join(quoted) + " )"


def tlsa_311(cert_der_spki: bytes) -> str:
    return hashlib.sha256(cert_der_spki).hexdigest()


def mta_sts_policy(mx: str, mode: str = "enforce") -> str:
    return f"version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: {MTA_STS_MAX_AGE}\n"


def _tls_loader(endpoint: ModuleInstance | None) -> str:
    """How the port-25 endpoint gets its certificate: a tls.loader.* name, or "off"."""
    loader = getattr(endpoint.settings.get("tls") if endpoint is not None else None, "loader", None)
    return loader.name if isinstance(loader, ModuleInstance) else "off"


@dataclass
class Zone:
    ttl: int
    lines: list[str] = field(default_factory=list)

    def rr(self, owner: str, rtype: str, rdata: str) -> None:
        self.lines.append(f"{owner + '.':<40} {self.ttl:>6} IN {rtype:<5} {rdata}")

    def note(self, text: str) -> None:
        self.lines.extend(f"; {line}".rstrip() for line in text.splitlines())

    def blank(self) -> None:
        self.lines.append("")


@dataclass
class DKIMEntry:
    domain: str
    selector: str
    value: str | None  # None: no key (yet)
    notes: list[str] = field(default_factory=list)


def _tlsa_records(endpoint: ModuleInstance | None) -> tuple[list[tuple[str, str]], list[str]]:
    """([(hash, source)], notes) for the certificate of the port-25 endpoint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if endpoint is None:
        return [], ["no smtp endpoint in the config: no TLSA record"]
    loader = getattr(endpoint.settings.get("tls"), "loader", None)
    if not isinstance(loader, ModuleInstance):
        return [], ["the smtp endpoint has no TLS (`tls off`): no TLSA record; DANE senders need STARTTLS"]
    if loader.name == "tls.loader.self_signed":
        return [], ["TLS is `self_signed`: its key changes at every start, so no TLSA record can pin it",
                    "(not suitable for DANE or MTA-STS; use `tls file` with a CA-issued certificate)"]
    if loader.name != "tls.loader.file":
        return [], [f"TLS comes from {loader.name}: its key may change at every renewal, so no TLSA record "
                    "is printed; pin it only if the key is reused across renewals"]
    out: list[tuple[str, str]] = []
    notes: list[str] = []
    for cert_path in loader.settings.get("certs") or []:
        try:
            with open(cert_path, "rb") as f:
                data = f.read()
            leaf = x509.load_pem_x509_certificates(data)[0]
        except OSError as e:
            notes.append(f"WARNING: cannot read {cert_path}: {e.strerror or e}; no TLSA record for it")
            continue
        except (ValueError, IndexError) as e:
            notes.append(f"WARNING: {cert_path} holds no PEM certificate ({e}); no TLSA record for it")
            continue
        spki = leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        digest = tlsa_311(spki)
        if digest not in (d for d, _ in out):
            out.append((digest, cert_path))
    if out:
        notes.append("3 1 1 pins the key, not the certificate: renewals with the same key keep it valid;")
        notes.append("before a new key goes live, publish its TLSA record next to this one and wait a TTL")
    return out, notes


async def _dkim_entries(graph: Graph, create: bool, libexec: str) -> list[DKIMEntry]:
    """The DKIM TXT value of every (domain, selector) of every modify.dkim block, creating missing
    keys by starting the module as the server does."""
    from pymaddy.dkim.keys import DKIMKeyError, dns_path_for, dns_record, load_key
    from pymaddy.mail.address import AddressError, domain_for_lookup
    from pymaddy.modify.dkim import DKIMSigner
    from pymaddy.runtime import metrics
    from pymaddy.runtime.log import Logger
    from pymaddy.runtime.module import ModuleError, RuntimeContext
    from pymaddy.runtime.options import RunOptions

    state_dir = str(graph.globals["state_dir"])
    ctx = RuntimeContext(
        options=RunOptions(config="", libexec=libexec, management=True), graph=graph, generation=0,
        logger=Logger(), metrics=metrics.REGISTRY, state_dir=state_dir,
        runtime_dir=str(graph.globals["runtime_dir"]),
    )
    entries: list[DKIMEntry] = []
    seen: set[tuple[str, str]] = set()
    dirs_ready = False
    for inst in graph.walk():
        if inst.name != "modify.dkim":
            continue
        signer = DKIMSigner(inst, ctx)
        paths = {d: signer._abs(signer.key_path.replace("{domain}", d).replace("{selector}", signer.selector))
                 for d in signer.domains}
        missing = [d for d, p in paths.items() if not os.path.exists(p)]
        keys: dict[str, Any] = {}
        if create or not missing:
            if missing and not dirs_ready:
                _init_dirs(graph, libexec)
                dirs_ready = True
            try:
                await signer.start()  # loads every key, generates (and logs) the missing ones
            except ModuleError as e:
                raise DNSCommandError(f"{inst.node.file}:{inst.node.line}: {e}") from None
            keys = dict(signer.signers)
        else:
            for d, p in paths.items():
                if d not in missing:
                    try:
                        keys[domain_for_lookup(d)] = load_key(p)
                    except (DKIMKeyError, AddressError, OSError) as e:
                        raise DNSCommandError(f"{inst.node.file}:{inst.node.line}: {e}") from None
        for domain, full in paths.items():
            try:
                norm = domain_for_lookup(domain)
            except AddressError as e:
                raise DNSCommandError(f"{inst.node.file}:{inst.node.line}: {e}") from None
            if (norm, signer.selector) in seen:
                continue
            seen.add((norm, signer.selector))
            rel = os.path.relpath(full, state_dir) if full.startswith(state_dir.rstrip("/") + "/") else full
            key = keys.get(norm)
            if key is None:
                entries.append(DKIMEntry(norm, signer.selector, None, [
                    f"no DKIM key yet ({rel} is missing): run `pymaddy dns` without --no-create-keys,",
                    "or start the server once (modify.dkim creates it), then publish the .dns file's contents",
                ]))
                continue
            dns_file = dns_path_for(full)
            computed = dns_record(key)
            try:
                with open(dns_file, encoding="ascii", errors="replace") as f:
                    value = f.read().strip()
            except OSError:
                entries.append(DKIMEntry(norm, signer.selector, computed,
                                         [f"computed from {rel} ({dns_path_for(rel)} is missing)"]))
                continue
            notes = [f"contents of {dns_path_for(rel)}"]
            if value != computed:
                notes = [f"WARNING: {dns_path_for(rel)} does not match the key in {rel};",
                         "the value below is computed from the key, which is what signs"]
                value = computed
            entries.append(DKIMEntry(norm, signer.selector, value, notes))
    return entries


def _init_dirs(graph: Graph, libexec: str) -> None:
    from pymaddy.runtime.supervisor import StartFailure, init_dirs

    try:
        init_dirs(str(graph.globals["state_dir"]), str(graph.globals["runtime_dir"]), libexec)
    except StartFailure as e:
        raise DNSCommandError("; ".join(e.lines)) from None


def _addresses(values: Iterable[str], version: int, flag: str) -> list[str]:
    out: list[str] = []
    for v in values:
        try:
            addr = ipaddress.ip_address(v)
        except ValueError:
            addr = None
        if addr is None or addr.version != version:
            raise DNSCommandError(f"{flag}: not an IPv{version} address: {v}", EXIT_USAGE)
        if str(addr) not in out:
            out.append(str(addr))
    return out


def _local_domains(ns: argparse.Namespace, config_path: str, graph: Graph) -> tuple[list[str], str]:
    """(domains in U-label lower-case form, where they came from)."""
    from pymaddy.mail.address import AddressError, domain_for_lookup

    found: list[str]
    if ns.domains:
        found, source = list(ns.domains), "--domain"
    else:
        macros = config_macros(config_path)
        found = [*macros.get("primary_domain", []), *macros.get("local_domains", [])]
        source = "the $(primary_domain) and $(local_domains) macros"
        if not found:
            found, source = destination_domains(graph), "the destination rules that deliver to a local storage"
    out: list[str] = []
    for d in found:
        try:
            norm = domain_for_lookup(d)
        except AddressError as e:
            raise DNSCommandError(str(e), EXIT_USAGE) from None
        if norm and norm not in out:
            out.append(norm)
    return out, source


async def build(ns: argparse.Namespace, config_path: str) -> str:
    """The whole zone text for the config at `config_path`."""
    from pymaddy.compiler.compile import compile_file
    from pymaddy.compiler.globals import DEFAULT_LIBEXEC_DIR

    if ns.ttl < 0:
        raise DNSCommandError("--ttl must not be negative", EXIT_USAGE)
    ips, ip6s = _addresses(ns.ips, 4, "--ip"), _addresses(ns.ipv6s, 6, "--ipv6")
    if not os.path.exists(config_path):
        raise DNSCommandError(f"failed to open config: open {config_path}: no such file or directory", EXIT_USAGE)
    config_path = os.path.abspath(config_path)
    res = await asyncio.to_thread(compile_file, config_path)
    ordered = sorted(res.errors, key=lambda e: (e.file != config_path, e.file, e.line))
    errors = [str(e) for e in ordered if not any(s in str(e) for s in SERVER_ONLY)]
    if res.graph is None or errors:
        raise DNSCommandError("\n".join(errors) or "configuration could not be loaded")
    graph = res.graph
    endpoint = _port25_endpoint(graph)
    hostname = (endpoint.settings.get("hostname") if endpoint is not None else None) or graph.globals.get("hostname")
    if not hostname:
        raise DNSCommandError("the config sets no hostname: it names the mail host the MX records point to")
    host = ascii_name(str(hostname))
    domains, source = _local_domains(ns, config_path, graph)
    if not domains:
        raise DNSCommandError("no local domains found in the config: name them with --domain", EXIT_USAGE)
    dkim = await _dkim_entries(graph, not ns.no_create, ns.libexec or DEFAULT_LIBEXEC_DIR)
    tlsa, tlsa_notes = _tlsa_records(endpoint)

    z = Zone(ns.ttl)
    z.lines.extend(HEADER.format(config=config_path).splitlines())
    z.blank()
    z.note(f"mail host: {host}")
    z.note(f"domains: {', '.join(ascii_name(d) for d in domains)} (from {source})")
    z.blank()
    z.note(f"=== mail host {host} ===")
    for a in ips:
        z.rr(host, "A", a)
    if not ips:
        z.note(f"UNKNOWN IPv4 address: {host}. {ns.ttl} IN A <address>  -- give it with --ip")
    for a in ip6s:
        z.rr(host, "AAAA", a)
    if not ip6s:
        z.note(f"UNKNOWN IPv6 address: {host}. {ns.ttl} IN AAAA <address>  -- give it with --ipv6 (if it has one)")
    z.note("set the reverse DNS (PTR) of these addresses to the mail host name too")
    if host not in {ascii_name(d) for d in domains}:
        z.rr(host, "TXT", txt("v=spf1 a ~all"))
    for note in tlsa_notes:
        z.note(note)
    for digest, src in tlsa:
        z.note(f"TLSA from {src}")
        z.rr(f"_25._tcp.{host}", "TLSA", f"3 1 1 {digest}")

    ca_tls = _tls_loader(endpoint) in ("tls.loader.file", "tls.loader.acme")
    policy = mta_sts_policy(host, "enforce" if ca_tls else "testing")
    sts_id = hashlib.sha256(policy.encode()).hexdigest()[:20]
    for d in domains:
        name = ascii_name(d)
        z.blank()
        z.note(f"=== domain {name}" + (f" ({d})" if name != d else "") + " ===")
        z.rr(name, "MX", f"{MX_PREFERENCE} {host}.")
        z.rr(name, "TXT", txt("v=spf1 mx ~all"))
        mine = [e for e in dkim if e.domain == d]
        if not mine:
            z.note("no modify.dkim block signs for this domain: no DKIM record")
        for e in mine:
            for n in e.notes:
                z.note(n)
            if e.value is not None:
                z.rr(f"{ascii_name(e.selector)}._domainkey.{name}", "TXT", txt(e.value))
        z.rr(f"_dmarc.{name}", "TXT", txt(f"v=DMARC1; p=quarantine; ruf=mailto:postmaster@{name}"))
        z.rr(f"_mta-sts.{name}", "TXT", txt(f"v=STSv1; id={sts_id}"))
        if not ca_tls:
            z.note("mode testing: MTA-STS enforce needs a certificate from a public CA on the mail host")
        z.note(f"serve at https://mta-sts.{name}/.well-known/mta-sts.txt (valid certificate for mta-sts.{name}):")
        for line in policy.splitlines():
            z.note(f"    {line}")
        z.rr(f"_smtp._tls.{name}", "TXT", txt(f"v=TLSRPTv1; rua=mailto:postmaster@{name}"))

    others = [e for e in dkim if e.domain not in domains]
    if others:
        z.blank()
        z.note("=== DKIM keys of other signing domains ===")
        for e in others:
            for n in e.notes:
                z.note(n)
            if e.value is not None:
                z.rr(f"{ascii_name(e.selector)}._domainkey.{ascii_name(e.domain)}", "TXT", txt(e.value))
    return "\n".join(z.lines) + "\n"
