"""Escaping untrusted strings for LDAP search filters (RFC 4515) and DNs (RFC 4514).

A username typed by a client ends up inside `filter` and `dn_template`; without
escaping, `*` or `)(uid=*` would widen the search (GHSA-5835-4gvc-32pc in
maddy) and `,` or `+` would change the DN bound to. Pure functions, no
configuration or I/O.
"""

from __future__ import annotations

__all__ = ["escape_dn_value", "escape_filter_value"]

# RFC 4515 §3: in an assertion value `*`, `(`, `)`, `\` and NUL must be written as
# `\XX`. Bytes outside printable ASCII are escaped too (permitted by the same
# section; the UTF-8 bytes of non-ASCII characters become `\c3\a9`), so the
# result is plain ASCII and no client library re-interprets it.
_FILTER_SPECIAL = frozenset(b"*()\\")


def escape_filter_value(value: str) -> str:
    """`value` as an RFC 4515 assertion value, safe to splice into a filter."""
    out: list[str] = []
    for b in value.encode("utf-8", "surrogatepass"):
        if b in _FILTER_SPECIAL or b < 0x20 or b >= 0x7F:
            out.append(f"\\{b:02x}")
        else:
            out.append(chr(b))
    return "".join(out)


# RFC 4514 §2.4: `"`, `+`, `,`, `;`, `<`, `>`, `\` are escaped with a backslash
# (as are `=` and `#` anywhere, allowed by the `special` production of §3, which
# strict parsers such as ldap3's expect); a leading and a trailing space too; NUL
# and other control characters as `\XX`.
_DN_SPECIAL = frozenset('"+,;<>\\=#')


def escape_dn_value(value: str) -> str:
    """`value` as an RFC 4514 attribute value, safe to splice into a DN."""
    out: list[str] = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in _DN_SPECIAL or (i == 0 and ch == " ") or (i == last and ch == " "):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)
