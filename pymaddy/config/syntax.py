"""Parse one config file's text into raw nodes with the Lark grammar.

Raw nodes still hold macro definitions, snippet definitions and imports;
`pymaddy.config.expand` resolves those, as maddy does after parsing.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

# Lark imports the third-party `regex` module when it is installed (8 ms of a
# 150 ms check-config budget) although this grammar needs only `re`; hide it
# while Lark loads, unless something imported it already.
_hid_regex = "regex" not in sys.modules
if _hid_regex:
    sys.modules["regex"] = None  # type: ignore[assignment]
try:
    from lark import Lark, Token, Transformer
    from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
finally:
    if _hid_regex:
        del sys.modules["regex"]

from pymaddy.config.errors import ConfigError  # noqa: E402 - after the Lark import above
from pymaddy.config.ir import Node  # noqa: E402

GRAMMAR = Path(__file__).resolve().parent.parent.parent / "grammar" / "maddy.lark"
_PACKAGED_GRAMMAR = Path(__file__).resolve().parent / "maddy.lark"

# maddy refuses blocks nested deeper than this (framework/cfgparser).
MAX_NESTING = 256


def _grammar_path() -> Path:
    # In a source checkout the grammar lives in grammar/; an installed wheel
    # carries a copy inside the package (see pyproject.toml).
    return GRAMMAR if GRAMMAR.exists() else _PACKAGED_GRAMMAR


@functools.lru_cache(maxsize=1)
def _parser() -> tuple[Lark, _Build]:
    # The transformer runs at each LALR reduction, so no parse tree is built
    # and 1000 nested blocks cost no Python recursion.
    build = _Build()
    lark = Lark(
        _grammar_path().read_text(encoding="utf-8"),
        parser="lalr",
        lexer="basic",
        propagate_positions=False,
        maybe_placeholders=False,
        transformer=build,
        cache=True,
    )
    return lark, build


def _unquote(tok: Token) -> str:
    s = str(tok)
    if tok.type != "QUOTED":
        return s
    body = s[1:]
    if body.endswith('"') and not _escaped_at_end(body):
        body = body[:-1]
    # Only \" is an escape; every other backslash stays as written.
    return body.replace('\\"', '"')


def _escaped_at_end(body: str) -> bool:
    # `"abc\"` is an unterminated token whose text ends with an escaped quote.
    n = 0
    i = len(body) - 2
    while i >= 0 and body[i] == "\\":
        n += 1
        i -= 1
    return n % 2 == 1


class _Build(Transformer[Token, Any]):
    """Runs inside the LALR parser at each reduction, so deep nesting costs no recursion."""

    file = ""

    def simple(self, toks: list[Token]) -> Node:
        return Node(_unquote(toks[0]), [_unquote(t) for t in toks[1:]], None, self.file, toks[0].line or 0)

    def blockdir(self, items: list[Any]) -> Node:
        *toks, (children, depth, _) = items
        node = Node(_unquote(toks[0]), [_unquote(t) for t in toks[1:]], children, self.file, toks[0].line or 0)
        if depth > MAX_NESTING:
            raise ConfigError(self.file, node.line, "Error during parsing: nesting limit reached")
        return node

    def block(self, items: list[Any]) -> tuple[list[Node], int, int]:
        kids = [i for i in items if isinstance(i, Node)]
        depth = 1 + max((_depth(k) for k in kids), default=0)
        return kids, depth, 0

    def start(self, items: list[Node]) -> list[Node]:
        return items


def _depth(n: Node) -> int:
    # Depth is memoised on the node so the check stays linear.
    d = getattr(n, "_depth", None)
    if d is None:
        d = 0 if n.children is None else 1 + max((_depth(k) for k in n.children), default=0)
        n._depth = d  # type: ignore[attr-defined]
    return d


def _prepare(text: str) -> str:
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r", "")


def parse_text(text: str, file: str) -> list[Node]:
    """Parse config text; raise ConfigError with maddy's wording on bad syntax."""
    text = _prepare(text)
    lark, build = _parser()
    build.file = file
    try:
        result: list[Node] = lark.parse(text)  # type: ignore[assignment]
        return result
    except UnexpectedInput as e:
        raise _syntax_error(e, text, file) from None


def _syntax_error(e: UnexpectedInput, text: str, file: str) -> ConfigError:
    line = getattr(e, "line", 0) or 0
    if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
        line = text.rstrip().count("\n") + 1  # the last token, as maddy reports it
        return ConfigError(file, line, "Error during parsing: unexpected EOF when looking for }")
    if isinstance(e, UnexpectedToken):
        tok = e.token
        prev = text[: tok.start_pos or 0].rstrip(" \t\f\v")
        if prev.endswith("}") and (len(prev) == 1 or prev[-2].isspace()) and tok.type != "_NL":
            return ConfigError(file, line, "Error during parsing: newline is required after closing brace")
        if tok.type == "LBRACE":
            return ConfigError(file, line, "Syntax error: Unexpected token '{', expecting 'block header'")
        if tok.type == "RBRACE":
            return ConfigError(file, line, "Error during parsing: unexpected }")
        return ConfigError(file, line, f"Syntax error: unexpected token {str(tok)!r}")
    if isinstance(e, UnexpectedCharacters):
        return ConfigError(file, line, f"Syntax error: unexpected character {e.char!r}")
    return ConfigError(file, line, "Syntax error")  # pragma: no cover
