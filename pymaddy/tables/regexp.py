"""`table.regexp`: a Go (RE2) regular expression and replacement templates (internal/table/regexp.go).

The schema has already built the final pattern (`full_match` anchors, the
`case_insensitive` `(?i)` prefix); here it is translated from RE2 syntax to
Python's `re` and replacements are expanded like Go's `Regexp.ExpandString`
(`$1`, `$name`, `${name}`, `$$`). maddy's code, not its docs: without a
replacement a matching key still yields no value, so the table never matches.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pymaddy.runtime.module import Module, ModuleError
from pymaddy.tables.base import Table

if TYPE_CHECKING:
    from pymaddy.compiler.graph import ModuleInstance
    from pymaddy.runtime.module import RuntimeContext

MOD = "table.regexp"


class RE2Error(ValueError):
    """The pattern is not valid RE2 (or uses something pymaddy cannot translate)."""


# -- RE2 → Python translation -------------------------------------------------------

_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7f",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
# Go's Perl classes are ASCII-only; Python's are Unicode.
_PERL_IN_CLASS = {"d": "0-9", "w": "0-9A-Za-z_", "s": "\\t\\n\\f\\r "}
_PERL = {
    "d": "[0-9]",
    "D": "[^0-9]",
    "w": "[0-9A-Za-z_]",
    "W": "[^0-9A-Za-z_]",
    "s": "[\\t\\n\\f\\r ]",
    "S": "[^\\t\\n\\f\\r ]",
}
_UNICODE_CLASSES = {
    "L": ("[^\\W\\d_]", "[\\W\\d_]"),
    "N": ("\\d", "\\D"),
    "Nd": ("\\d", "\\D"),
}
_NAME_RE = re.compile(r"[A-Za-z0-9_]+")
_REPEAT_RE = re.compile(r"\{(\d+)(,(\d*))?\}")
_FLAG_RE = re.compile(r"\(\?([A-Za-z]*)(?:-([A-Za-z]*))?([:)])")


@dataclass
class _Group:
    flag_wraps: list[str] = field(default_factory=list)  # `(?flags:` opened for mid-group flag settings
    multiline: bool = False


@dataclass
class Translated:
    pattern: str
    groups: int
    names: list[tuple[str, int]]  # (name, group number) in order


def _escape_literal(ch: str) -> str:
    return re.escape(ch)


def translate(src: str) -> Translated:
    """Translate an RE2 pattern into an equivalent Python `re` pattern."""
    out: list[str] = []
    names: list[tuple[str, int]] = []
    ngroups = 0
    stack: list[_Group] = [_Group()]
    i = 0
    n = len(src)

    def unsupported(what: str) -> RE2Error:
        return RE2Error(f"error parsing regexp: invalid or unsupported Perl syntax: `{what}`")

    def escape(j: int, in_class: bool) -> tuple[str, int]:
        """Translate the escape at src[j] == '\\'; return (python text, next index)."""
        if j + 1 >= n:
            raise RE2Error("error parsing regexp: trailing backslash at end of expression: ``")
        c = src[j + 1]
        if c in _PERL:
            if in_class:
                if c in _PERL_IN_CLASS:
                    return _PERL_IN_CLASS[c], j + 2
                return "\\" + c, j + 2
            return _PERL[c], j + 2
        if c == "z":
            return ("z" if in_class else "\\Z"), j + 2
        if c in "pP":
            if j + 2 < n and src[j + 2] == "{":
                end = src.find("}", j + 3)
                if end < 0:
                    raise RE2Error(f"error parsing regexp: invalid character class range: `{src[j:]}`")
                name, nxt = src[j + 3 : end], end + 1
            else:
                name, nxt = src[j + 2 : j + 3], j + 3
            neg = c == "P"
            if name.startswith("^"):
                name, neg = name[1:], not neg
            pair = _UNICODE_CLASSES.get(name)
            if pair is None or in_class:
                raise RE2Error(f"{MOD}: unicode class `{src[j:nxt]}` is not supported yet")
            cls = pair[1] if neg else pair[0]
            return cls, nxt
        if c == "x":
            if j + 2 < n and src[j + 2] == "{":
                end = src.find("}", j + 3)
                digits = src[j + 3 : end] if end > 0 else ""
                if end < 0 or not digits or any(d not in "0123456789abcdefABCDEF" for d in digits):
                    bad = src[j : end + 1 if end > 0 else n]
                    raise RE2Error(f"error parsing regexp: invalid escape sequence: `{bad}`")
                cp = int(digits, 16)
                if cp > 0x10FFFF:
                    raise RE2Error(f"error parsing regexp: invalid escape sequence: `{src[j : end + 1]}`")
                return f"\\U{cp:08x}", end + 1
            return "\\x", j + 2
        if c == "Q":
            end = src.find("\\E", j + 2)
            lit = src[j + 2 :] if end < 0 else src[j + 2 : end]
            nxt = n if end < 0 else end + 2
            return "".join(_escape_literal(ch) for ch in lit), nxt
        if c in "123456789":
            raise RE2Error(f"error parsing regexp: invalid escape sequence: `\\{c}`")
        if c == "C":
            raise RE2Error(f"{MOD}: `\\C` is not supported")
        if c == "0":
            # Go: \0 followed by up to two more octal digits.
            k = j + 2
            while k < n and k < j + 4 and src[k] in "01234567":
                k += 1
            return f"\\U{int(src[j + 1 : k], 8):08x}", k
        if c.isascii() and c.isalnum() and c not in "aAbBfnrtv":
            raise RE2Error(f"error parsing regexp: invalid escape sequence: `\\{c}`")
        if c == "b" and in_class:
            raise RE2Error("error parsing regexp: invalid escape sequence: `\\b`")
        return "\\" + c, j + 2

    def multiline() -> bool:
        return stack[-1].multiline

    while i < n:
        ch = src[i]
        if ch == "\\":
            text, i = escape(i, in_class=False)
            out.append(text)
            continue
        if ch == "[":
            i = _class(src, i, out, escape)
            continue
        if ch == "(":
            if src.startswith("(?", i):
                m = _FLAG_RE.match(src, i)
                if src.startswith("(?P<", i) or (src.startswith("(?<", i) and not src.startswith(("(?<=", "(?<!"), i)):
                    start = i + (4 if src.startswith("(?P<", i) else 3)
                    end = src.find(">", start)
                    name = src[start:end] if end >= 0 else ""
                    if end < 0 or not _NAME_RE.fullmatch(name):
                        bad = src[i : end + 1 if end >= 0 else n]
                        raise RE2Error(f"error parsing regexp: invalid named capture: `{bad}`")
                    ngroups += 1
                    names.append((name, ngroups))
                    stack.append(_Group(multiline=multiline()))
                    out.append("(")
                    i = end + 1
                    continue
                if m is None:
                    raise unsupported(src[i : i + 3])
                on, off, term = m.group(1), m.group(2) or "", m.group(3)
                if set(on + off) - set("imsU") or (m.group(2) is not None and not off and term == ")"):
                    raise RE2Error(f"error parsing regexp: invalid or unsupported Perl syntax: `{m.group(0)}`")
                if "U" in on + off:
                    raise RE2Error(f"{MOD}: the U (ungreedy) flag is not supported")
                flags = on + ("-" + off if off else "")
                ml = ("m" in on) or (multiline() and "m" not in off)
                if term == ":":
                    stack.append(_Group(multiline=ml))
                    out.append(f"(?{flags}:" if flags else "(?:")
                else:
                    # `(?i)` in the middle of a group: scope it to the rest of the group.
                    if flags:
                        stack[-1].flag_wraps.append(f"(?{flags}:")
                        out.append(f"(?{flags}:")
                    stack[-1].multiline = ml
                i = m.end()
                continue
            ngroups += 1
            stack.append(_Group(multiline=multiline()))
            out.append("(")
            i += 1
            continue
        if ch == ")":
            if len(stack) == 1:
                raise RE2Error(f"error parsing regexp: unexpected ): `{src}`")
            g = stack.pop()
            out.append(")" * len(g.flag_wraps) + ")")
            i += 1
            continue
        if ch == "|":
            g = stack[-1]
            out.append(")" * len(g.flag_wraps) + "|" + "".join(g.flag_wraps))
            i += 1
            continue
        if ch == "$":
            out.append("$" if multiline() else "\\Z")
            i += 1
            continue
        if ch == "{":
            rep = _REPEAT_RE.match(src, i)
            if rep is None:
                out.append("\\{")  # not a repetition in RE2: a literal brace (Python would take `{,n}`)
                i += 1
                continue
            lo, hi = int(rep.group(1)), rep.group(3)
            if lo > 1000 or (hi and (int(hi) > 1000 or int(hi) < lo)):
                raise RE2Error(f"error parsing regexp: invalid repeat count: `{rep.group(0)}`")
            out.append(rep.group(0))
            i = rep.end()
            continue
        out.append(ch)
        i += 1
    if len(stack) != 1:
        raise RE2Error(f"error parsing regexp: missing closing ): `{src}`")
    out.append(")" * len(stack[0].flag_wraps))
    return Translated("".join(out), ngroups, names)


def _class(src: str, i: int, out: list[str], escape: Callable[[int, bool], tuple[str, int]]) -> int:
    """Translate the character class starting at src[i] == '['; return the index after it."""
    n = len(src)
    parts = ["["]
    j = i + 1
    if j < n and src[j] == "^":
        parts.append("^")
        j += 1
    first = True
    while True:
        if j >= n:
            raise RE2Error(f"error parsing regexp: missing closing ]: `{src[i:]}`")
        c = src[j]
        if c == "]" and not first:
            j += 1
            break
        first = False
        if c == "[" and src.startswith("[:", j):
            end = src.find(":]", j + 2)
            name = src[j + 2 : end] if end >= 0 else ""
            if end >= 0 and name in _POSIX_CLASSES:
                parts.append(_POSIX_CLASSES[name])
                j = end + 2
                continue
            if end >= 0 and name.startswith("^") and name[1:] in _POSIX_CLASSES:
                raise RE2Error(f"{MOD}: negated POSIX class `[:{name}:]` is not supported")
            parts.append("\\[")
            j += 1
            continue
        if c == "\\":
            text, j = escape(j, True)
            parts.append(text)
            continue
        if c in "[&~|":
            parts.append("\\" + c)  # literal in RE2; Python warns about set operations
            j += 1
            continue
        parts.append(c)
        j += 1
    parts.append("]")
    out.append("".join(parts))
    return j


# -- Go's Regexp.Expand ---------------------------------------------------------------


def _is_name_char(ch: str) -> bool:
    return ch == "_" or ch.isalpha() or unicodedata.category(ch) == "Nd"


def _extract(s: str) -> tuple[str, int, str] | None:
    """Go's regexp extract(): (name, number or -1, rest) for `name` / `{name}`, or None if malformed."""
    if not s:
        return None
    brace = s[0] == "{"
    if brace:
        s = s[1:]
    k = 0
    while k < len(s) and _is_name_char(s[k]):
        k += 1
    if k == 0:
        return None
    name = s[:k]
    if brace:
        if k >= len(s) or s[k] != "}":
            return None
        k += 1
    num = 0
    for c in name:
        if not ("0" <= c <= "9") or num >= 100_000_000:
            num = -1
            break
        num = num * 10 + ord(c) - ord("0")
    if name[0] == "0" and len(name) > 1:
        num = -1
    return name, num, s[k:]


def expand(template: str, match: re.Match[str], names: list[tuple[str, int]]) -> str:
    """`$1`, `${1}`, `$name`, `${name}` → the group's text ("" when absent or unmatched); `$$` → `$`."""
    out: list[str] = []
    while template:
        before, sep, after = template.partition("$")
        if not sep:
            break
        out.append(before)
        template = after
        if template.startswith("$"):
            out.append("$")
            template = template[1:]
            continue
        ext = _extract(template)
        if ext is None:
            out.append("$")  # malformed: the $ is literal text
            continue
        name, num, template = ext
        if num >= 0:
            if num <= (match.re.groups or 0):
                out.append(match.group(num) or "")
        else:
            for gname, gnum in names:
                if gname == name and match.group(gnum) is not None:
                    out.append(match.group(gnum))
                    break
    out.append(template)
    return "".join(out)


# -- the module -----------------------------------------------------------------------


class RegexpTable(Module, Table):
    def __init__(self, inst: ModuleInstance, ctx: RuntimeContext) -> None:
        super().__init__(inst, ctx)
        self.pattern: str = self.settings.get("pattern") or ""
        self.replacements: list[str] = list(self.settings.get("replacements") or [])
        self.expand_placeholders = bool(self.settings.get("expand_replaceholders", True))
        try:
            tr = translate(self.pattern)
            self.regex = re.compile(tr.pattern)
        except RE2Error as e:
            msg = str(e)
            raise ModuleError(msg if msg.startswith(MOD) else f"{MOD}: {msg}") from None
        except re.error as e:
            raise ModuleError(f"{MOD}: error parsing regexp: {e}") from None
        self.names = tr.names

    def log_name(self) -> str:
        return MOD

    async def lookup_multi(self, key: str) -> list[str]:
        m = self.regex.search(key)
        if m is None:
            return []
        if not self.expand_placeholders:
            return list(self.replacements)
        return [expand(r, m, self.names) for r in self.replacements]
