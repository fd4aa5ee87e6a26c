"""An authoritative DNS server on 127.0.0.1 for the tests, built on dnspython.

It answers real DNS packets over UDP and TCP (one thread each) from records
loaded as zone-file text or added one by one, so the server under test can be
pointed at it with `-debug.dnsoverride 127.0.0.1:PORT`. It can also misbehave
on purpose: SERVFAIL or silence (a timeout) for chosen names, truncation of
UDP answers above a size, and the AD bit for chosen zones (for DANE tests).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SPF
import dns.rdtypes.ANY.TXT
import dns.rrset
import dns.zone


@dataclass
class QueryLog:
    """Every question seen, as (name without final dot, type text, transport)."""

    entries: list[tuple[str, str, str]] = field(default_factory=list)

    def count(self, name: str, rdtype: str | None = None) -> int:
        name = name.rstrip(".").lower()
        return sum(1 for n, t, _ in self.entries if n == name and (rdtype is None or t == rdtype))


def _name(n: str | dns.name.Name) -> dns.name.Name:
    if isinstance(n, dns.name.Name):
        return n
    return dns.name.from_text(n)


class DNSServer:
    """Thread-based authoritative server. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        records: dict[str, list[tuple[str, str]]] | None = None,
        zones: dict[str, str] | None = None,
        ttl: int = 300,
        negative_ttl: int = 60,
        udp_limit: int = 512,
    ) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.udp_limit = udp_limit  # without EDNS; with EDNS min(payload, 4096)
        self.rrsets: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
        self.zone_origins: set[dns.name.Name] = set()
        self.servfail: set[tuple[dns.name.Name, int | None]] = set()
        self.timeout: set[tuple[dns.name.Name, int | None]] = set()
        self.ad_zones: set[dns.name.Name] = set()
        self.log = QueryLog()
        self._lock = threading.Lock()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.port = 0
        for zname, text in (zones or {}).items():
            self.add_zone_text(zname, text)
        for name, recs in (records or {}).items():
            for rdtype, value in recs:
                self.add(name, rdtype, value)

    # -- data -----------------------------------------------------------------------------

    def add_zone_text(self, origin: str, text: str) -> None:
        """Load a zone written in master-file syntax (RFC 1035 §5); `$TTL` and `@` work as usual."""
        zone = dns.zone.from_text(text, origin=origin, relativize=False, check_origin=False)
        with self._lock:
            self.zone_origins.add(zone.origin or dns.name.root)
            for name, node in zone.nodes.items():
                for rds in node.rdatasets:
                    rrs = dns.rrset.RRset(_name(name), rds.rdclass, rds.rdtype)
                    for rd in rds:
                        rrs.add(rd, rds.ttl)
                    self.rrsets[(rrs.name, rds.rdtype)] = rrs

    def add(self, name: str, rdtype: str, value: str | dns.rdata.Rdata, ttl: int | None = None) -> None:
        """Add one record; `value` in presentation format (`"v=spf1 -all"` must be quoted for TXT)."""
        n = _name(name)
        rdt = dns.rdatatype.from_text(rdtype)
        rd = value if isinstance(value, dns.rdata.Rdata) else dns.rdata.from_text(dns.rdataclass.IN, rdt, value)
        with self._lock:
            rrs = self.rrsets.get((n, rdt))
            if rrs is None:
                rrs = dns.rrset.RRset(n, dns.rdataclass.IN, rdt)
                self.rrsets[(n, rdt)] = rrs
            rrs.add(rd, self.ttl if ttl is None else ttl)

    def add_txt(self, name: str, *strings: bytes | str, ttl: int | None = None, rdtype: str = "TXT") -> None:
        """A TXT (or SPF, type 99) record made of these character-strings (no quoting needed)."""
        parts = [s.encode() if isinstance(s, str) else s for s in strings]
        if not parts:
            raise ValueError("a TXT record needs at least one string")
        cls = dns.rdtypes.ANY.SPF.SPF if rdtype == "SPF" else dns.rdtypes.ANY.TXT.TXT
        rd = cls(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), parts)
        self.add(name, rdtype, rd, ttl)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        n = _name(name)
        with self._lock:
            rdt = dns.rdatatype.from_text(rdtype) if rdtype else None
            for key in [k for k in self.rrsets if k[0] == n and (rdt is None or k[1] == rdt)]:
                del self.rrsets[key]

    def fail(self, name: str, rdtype: str | None = None) -> None:
        """Answer SERVFAIL for `name` (all types, or only `rdtype`)."""
        self.servfail.add((_name(name), dns.rdatatype.from_text(rdtype) if rdtype else None))

    def drop(self, name: str, rdtype: str | None = None) -> None:
        """Never answer queries for `name` (the client times out)."""
        self.timeout.add((_name(name), dns.rdatatype.from_text(rdtype) if rdtype else None))

    def authenticate(self, zone: str) -> None:
        """Set the AD bit on answers for names at or below `zone` (a stand-in for a validating resolver)."""
        self.ad_zones.add(_name(zone))

    # -- answering ---------------------------------------------------------------------------

    def _matches(self, rules: set[tuple[dns.name.Name, int | None]], name: dns.name.Name, rdt: int) -> bool:
        return (name, None) in rules or (name, rdt) in rules

    def _soa(self, name: dns.name.Name) -> dns.rrset.RRset:
        """The SOA of the closest loaded zone, or a synthetic one at the root."""
        best = dns.name.root
        for origin in self.zone_origins:
            if name.is_subdomain(origin) and len(origin) > len(best):
                best = origin
        rrs = self.rrsets.get((best, dns.rdatatype.SOA))
        if rrs is not None:
            return rrs
        text = f"ns.invalid. hostmaster.invalid. 1 3600 600 86400 {self.negative_ttl}"
        return dns.rrset.from_text(best, self.negative_ttl, "IN", "SOA", text)

    def _exists(self, name: dns.name.Name) -> bool:
        """RFC 8020: a name exists when it or any name below it has records (empty non-terminals)."""
        return any(n == name or n.is_subdomain(name) for n, _ in self.rrsets)

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """The response to one query packet; None means stay silent."""
        try:
            q = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not q.question:
            r = dns.message.make_response(q)
            r.set_rcode(dns.rcode.FORMERR)
            return r.to_wire()
        qrrs = q.question[0]
        qname, rdt = qrrs.name, qrrs.rdtype
        self.log.entries.append((qname.to_text(omit_final_dot=True).lower(), dns.rdatatype.to_text(rdt), transport))
        r = dns.message.make_response(q)
        r.flags |= dns.flags.AA
        r.flags &= ~dns.flags.AD
        with self._lock:
            if self._matches(self.timeout, qname, rdt):
                return None
            if self._matches(self.servfail, qname, rdt):
                r.set_rcode(dns.rcode.SERVFAIL)
                return r.to_wire()
            target = qname
            for _ in range(16):
                rrs = self.rrsets.get((target, rdt))
                if rrs is not None:
                    r.answer.append(rrs)
                    break
                cn = self.rrsets.get((target, dns.rdatatype.CNAME))
                if cn is None or rdt == dns.rdatatype.CNAME:
                    break
                r.answer.append(cn)
                target = cn[0].target
                if not any(target.is_subdomain(o) for o in self.zone_origins) and not self._exists(target):
                    break  # out of our data: the client asks again
            has_data = any(a.rdtype == rdt for a in r.answer)
            if not has_data and (not r.answer or self._exists(target)):
                if not self._exists(target):
                    r.set_rcode(dns.rcode.NXDOMAIN)
                r.authority.append(self._soa(target))
            # AD only when every name in the answer is in a "signed" zone (RFC 4035 §3.2.3)
            names = [a.name for a in r.answer] or [qname]
            if all(any(n.is_subdomain(z) for z in self.ad_zones) for n in names):
                r.flags |= dns.flags.AD
        limit = 65535
        if transport == "udp":
            limit = min(q.payload, 4096) if q.edns >= 0 else self.udp_limit
        try:
            return r.to_wire(max_size=limit)
        except dns.exception.TooBig:
            t = dns.message.make_response(q)
            t.flags |= dns.flags.AA | dns.flags.TC
            return t.to_wire()

    # -- transport --------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def override(self) -> str:
        """The value for `-debug.dnsoverride`."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> DNSServer:
        """Bind UDP and TCP on the same free port of 127.0.0.1 and serve from one thread."""
        for _ in range(20):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:  # the UDP side of this port is taken: try another
                tcp.close()
                udp.close()
                continue
            break
        else:
            raise OSError("no free port for the DNS server")
        tcp.listen(16)
        self.port = port
        self._tcp, self._udp = tcp, udp
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._serve, name="dns-server", daemon=True)]
        self._threads[0].start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError, AttributeError):
            self._wake_w.send(b"x")
        for t in self._threads:
            t.join(timeout=5)
        for s in (self._udp, self._tcp, getattr(self, "_wake_r", None), getattr(self, "_wake_w", None)):
            if s is not None:
                s.close()
        self._udp = self._tcp = None
        self._threads = []

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        udp, tcp = self._udp, self._tcp
        assert udp is not None and tcp is not None
        while not self._stopping.is_set():
            ready, _, _ = select.select([udp, tcp, self._wake_r], [], [])
            if self._stopping.is_set():
                return
            if udp in ready:
                try:
                    data, peer = udp.recvfrom(65535)
                except OSError:
                    continue
                out = self.answer(data, "udp")
                if out is not None:
                    with contextlib.suppress(OSError):
                        udp.sendto(out, peer)
            if tcp in ready:
                try:
                    conn, _ = tcp.accept()
                except OSError:
                    continue
                threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        """RFC 1035 §4.2.2 / RFC 7766: length-prefixed messages, several per connection."""
        conn.settimeout(2)
        with conn:
            while not self._stopping.is_set():
                try:
                    hdr = _recv_exact(conn, 2)
                    if hdr is None:
                        return
                    data = _recv_exact(conn, struct.unpack("!H", hdr)[0])
                    if data is None:
                        return
                except OSError:
                    return
                out = self.answer(data, "tcp")
                if out is None:
                    continue
                try:
                    conn.sendall(struct.pack("!H", len(out)) + out)
                except OSError:
                    return


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def records_from(pairs: Iterable[tuple[str, str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Group (name, type, value) triples into the `records` argument of DNSServer."""
    out: dict[str, list[tuple[str, str]]] = {}
    for name, rdtype, value in pairs:
        out.setdefault(name, []).append((rdtype, value))
    return out


__all__ = ["DNSServer", "QueryLog", "records_from"]
