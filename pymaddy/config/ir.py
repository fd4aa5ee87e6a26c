"""The IR every later stage works on: one node per directive, with its origin."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Node:
    """A directive: ``name arg... [{ children }]``.

    ``children is None`` means the directive had no block; ``[]`` means an
    empty block (maddy distinguishes them, though almost no module cares).
    """

    name: str
    args: list[str] = field(default_factory=list)
    children: list[Node] | None = None
    file: str = ""
    line: int = 0

    @property
    def has_block(self) -> bool:
        return self.children is not None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def clone(self, **changes: object) -> Node:
        """A deep copy, so expansion never aliases a snippet's nodes."""
        kids = None if self.children is None else [c.clone() for c in self.children]
        n = Node(self.name, list(self.args), kids, self.file, self.line)
        for k, v in changes.items():
            setattr(n, k, v)
        return n

    def synth(self, name: str, args: list[str], children: list[Node] | None = None) -> Node:
        """A directive made up from this one (inline arguments), keeping its origin."""
        return Node(name, args, children, self.file, self.line)

    def render(self, indent: int = 0, with_origin: bool = True) -> list[str]:
        """Lines of config text for this node, quoted so it re-parses the same."""
        pad = "    " * indent
        head = " ".join(quote(t) for t in [self.name, *self.args])
        origin = f"  # {self.file}:{self.line}" if with_origin else ""
        if self.children is None:
            return [f"{pad}{head}{origin}"]
        lines = [f"{pad}{head} {{{origin}"]
        for c in self.children:
            lines.extend(c.render(indent + 1, with_origin))
        lines.append(f"{pad}}}")
        return lines


_SAFE_SPECIAL = set('"#{}\\')


def quote(tok: str) -> str:
    """Quote a token if the lexer would not give it back verbatim otherwise."""
    if tok and not any(ch.isspace() or ch in _SAFE_SPECIAL for ch in tok):
        return tok
    if tok.endswith("\\"):
        # Only \" is an escape; a trailing backslash would swallow the quote.
        return '"' + tok.replace('"', '\\"') + ' "'  # pragma: no cover - best effort
    return '"' + tok.replace('"', '\\"') + '"'
