"""Value parsers for directive arguments (spec §A.6, §A.7): pure functions, no module knowledge.

Each raises ValueError with maddy's wording; callers attach the node's location.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

# Username/address normalization functions a config may name (spec §C).
NORMALIZERS = ("auto", "precis_casefold_email", "precis_casefold", "precis_email", "precis", "casefold", "noop")

TRUE_WORDS = frozenset({"1", "true", "on", "yes"})
FALSE_WORDS = frozenset({"0", "false", "off", "no"})


def parse_bool(s: str) -> bool:
    low = s.lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    raise ValueError("bool argument should be 'yes' or 'no'")


# Go's time.ParseDuration units; maddy has no 'd'.
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(args: list[str]) -> float:
    """Seconds from Go duration syntax; the arguments are joined without spaces (`1h 5m`)."""
    s = "".join(args)
    orig = s
    neg = False
    if s[:1] in "+-":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f'time: invalid duration "{orig}"')
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m or m.group(1) in ("", "."):
            if re.match(r"[0-9.]+$", s[pos:]):
                raise ValueError(f'time: missing unit in duration "{orig}"')
            raise ValueError(f'time: invalid duration "{orig}"')
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if neg and total != 0:
        raise ValueError("duration must not be negative")
    return total


_SIZE_UNITS = {"G": 1 << 30, "M": 1 << 20, "K": 1 << 10, "B": 1, "b": 1}


def parse_data_size(args: list[str]) -> int:
    """Bytes from `32M`, `3M 5K`, `0`; upper-case K/M/G are powers of 1024."""
    s = " ".join(args)
    if not s:
        raise ValueError("missing a number")
    total = 0
    for part in s.split(" "):
        m = re.fullmatch(r"([0-9]+)(.*)", part)
        if not m:
            if part.startswith("-"):
                raise ValueError("value must not be negative")
            raise ValueError("missing a number")
        num, suffix = int(m.group(1)), m.group(2)
        if suffix and any(c.isdigit() for c in suffix):
            raise ValueError("unexpected digit after a suffix")
        if not suffix:
            if num != 0:
                raise ValueError("unit suffix is required")
            continue
        if suffix not in _SIZE_UNITS:
            raise ValueError("unknown unit suffix: " + suffix)
        total += num * _SIZE_UNITS[suffix]
    return total


def parse_int(s: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", s):
        raise ValueError(f"invalid integer: {s}")
    return int(s)


def parse_float(s: str) -> float:
    try:
        if s.strip().lower() in ("nan", "inf", "+inf", "-inf", "infinity"):
            return float(s)
        if not re.fullmatch(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", s):
            raise ValueError
        return float(s)
    except ValueError:
        raise ValueError(f"invalid float: {s}") from None


@dataclass(frozen=True)
class Endpoint:
    """A network address as maddy writes it: tcp://h:p, tls://h:p, unix://path."""

    original: str
    scheme: str  # tcp | tls | unix
    host: str = ""
    port: str = ""
    path: str = ""

    @property
    def is_tls(self) -> bool:
        return self.scheme == "tls"

    @property
    def is_unix(self) -> bool:
        return self.scheme == "unix"

    def __str__(self) -> str:
        return self.original


def parse_endpoint(s: str) -> Endpoint:
    """Parse a maddy endpoint address (framework/config/endpoint.go semantics)."""
    try:
        u = urlsplit(s)
    except ValueError as e:
        raise ValueError(str(e)) from None
    scheme = u.scheme
    if scheme in ("tcp", "tls"):
        hostport = u.netloc or (u.path if not u.netloc else "")
        if not hostport:
            raise ValueError("port is required")
        host, port = _split_host_port(hostport)
        if not port:
            raise ValueError("port is required")
        if not port.isdigit() or int(port) > 65535:
            raise ValueError(f'invalid port "{port}"')
        return Endpoint(s, scheme, host, port)
    if scheme == "unix":
        path = u.netloc + u.path
        if not path:
            raise ValueError("path is required")
        return Endpoint(s, "unix", path=path)
    raise ValueError(f"unsupported scheme: {s} (+{scheme})" if scheme else f"unsupported scheme: {s}")


def _split_host_port(hp: str) -> tuple[str, str]:
    if hp.startswith("["):
        end = hp.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in address {hp}")
        host = hp[1:end]
        rest = hp[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"invalid address {hp}")
        return host, rest[1:]
    if hp.count(":") > 1:
        raise ValueError(f"address {hp}: too many colons in address")
    host, _, port = hp.partition(":")
    return host, port


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def parse_cidr(s: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(s, strict=False)
    except ValueError:
        raise ValueError(f"invalid CIDR: {s}") from None


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def validate_domain(s: str) -> str:
    """A domain name or IDN; returns the name with any trailing dot removed."""
    name = s.rstrip(".")
    if not name or len(name) > 253:
        raise ValueError(f"invalid domain: {s}")
    try:
        ascii_name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        raise ValueError(f"invalid domain: {s}") from None
    if not all(_LABEL.match(lbl) for lbl in ascii_name.split(".")):
        raise ValueError(f"invalid domain: {s}")
    return name
