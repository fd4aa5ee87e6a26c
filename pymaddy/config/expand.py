"""Macros, snippets, imports and ``{env:NAME}``: turning raw nodes into the final tree.

The order is maddy's (framework/cfgparser): macros are expanded while a file is
read, in file order and per file; snippets and imports are resolved once the
whole file is read; environment placeholders are replaced last, everywhere.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from pymaddy.config.errors import ConfigError, ErrorList
from pymaddy.config.ir import Node
from pymaddy.config.syntax import parse_text

# maddy gives up on imports nested deeper than this.
MAX_IMPORT_DEPTH = 255

_MACRO_IN_STRING = re.compile(r"\$\(([^$]+?)\)")
_ENV_DEFINED = re.compile(r"\{env:([^}]*)\}")
# maddy removes leftovers with a greedy `{env:([^$]+)}`; kept identical on purpose.
_ENV_LEFTOVER = re.compile(r"\{env:([^$]+)\}")


@dataclass
class Loaded:
    """The expanded tree of a config file and everything it was built from."""

    nodes: list[Node]
    files: list[str] = field(default_factory=list)
    errors: ErrorList = field(default_factory=ErrorList)


def validate_name(name: str) -> str | None:
    """maddy's directive-name rule: letters, digits, '.', '-', '_', not starting with a digit."""
    if not name:
        return "empty directive name"
    if unicodedata.category(name[0]) == "Nd":
        return "directive name cannot start with a digit"
    for ch in name:
        if ch in ".-_" or ch.isalpha() or ch.isdigit():
            continue
        return "character not allowed in directive name: " + ch
    return None


class _FileReader:
    """Reads one file: its own macro and snippet tables, as maddy gives each file."""

    def __init__(self, loader: _Loader, path: str, depth: int) -> None:
        self.loader = loader
        self.path = path
        self.depth = depth
        self.macros: dict[str, list[str]] = {}
        self.snippets: dict[str, list[Node] | None] = {}

    @property
    def errors(self) -> ErrorList:
        return self.loader.errors

    def read(self, text: str) -> list[Node]:
        try:
            raw = parse_text(text, self.path)
        except ConfigError as e:
            self.errors.add(e)
            return []
        out: list[Node] = []
        for node in raw:
            if node.name.startswith("$("):
                self._define_macro(node)
            elif _is_snippet(node.name):
                if node.args:
                    self.errors.at(node, "snippet declarations can't have arguments")
                    continue
                kids = None if node.children is None else [self._expand(c, 1) for c in node.children]
                self.snippets[node.name[1:-1]] = kids
            else:
                out.append(self._expand(node, 0))
        return self._imports(out, self.depth)

    def _define_macro(self, node: Node) -> None:
        if not node.name.endswith(")"):
            self.errors.at(node, "macro name must end with )")
            return
        if len(node.args) < 2:
            self.errors.at(node, "at least 2 arguments are required")
            return
        if node.args[0] != "=":
            self.errors.at(node, "missing = in macro declaration")
            return
        # Values may use macros defined earlier; they are expanded now, once.
        self.macros[node.name[2:-1]] = self._expand_args(node, node.args[1:])

    def _expand(self, node: Node, nesting: int) -> Node:
        """Macro-expand a directive and check its name, recursively."""
        if nesting > 0 and node.name.startswith("$("):
            self.errors.at(node, "macro declarations are only allowed at top-level")
        elif nesting > 0 and _is_snippet(node.name):
            self.errors.at(node, "snippet declarations are only allowed at top-level")
        else:
            problem = validate_name(node.name)
            if problem:
                self.errors.at(node, problem)
        node.args = self._expand_args(node, node.args)
        if node.children is not None:
            node.children = [self._expand(c, nesting + 1) for c in node.children]
        return node

    def _expand_args(self, node: Node, args: list[str]) -> list[str]:
        out: list[str] = []
        for arg in args:
            if arg.startswith("$(") and arg.endswith(")"):
                # A whole-argument macro splices all its values (or none).
                out.extend(self.macros.get(arg[2:-1], []))
            elif "$(" in arg and ")" in arg:
                out.append(self._expand_in_string(node, arg))
            else:
                out.append(arg)
        return out

    def _expand_in_string(self, node: Node, arg: str) -> str:
        for name in _MACRO_IN_STRING.findall(arg):
            values = self.macros.get(name)
            if values is not None and len(values) > 1:
                self.errors.at(node, "can't expand macro with multiple arguments inside a string")
                return arg
            arg = arg.replace("$(" + name + ")", values[0] if values else "")
        return arg

    def _imports(self, nodes: list[Node], depth: int) -> list[Node]:
        """Replace `import` directives at this level and below until none remain."""
        while True:
            found = False
            out: list[Node] = []
            for node in nodes:
                if node.children is not None:
                    node.children = self._imports(node.children, depth + 1)
                if node.name != "import":
                    out.append(node)
                    continue
                found = True
                if depth > MAX_IMPORT_DEPTH:
                    self.errors.at(node, "hit import expansion limit")
                    return out
                if len(node.args) != 1:
                    self.errors.at(node, "import directive requires exactly 1 argument")
                    continue
                out.extend(self._resolve(node, node.args[0], depth))
            nodes = out
            if not found:
                return nodes
            depth += 1

    def _resolve(self, node: Node, name: str, depth: int) -> list[Node]:
        if name in self.snippets:
            kids = self.snippets[name]
            return [] if kids is None else [k.clone() for k in kids]
        path = Path(name)
        if not path.is_absolute():
            path = Path(self.path).parent / path
        for candidate in (path, Path(str(path) + ".conf")):
            try:
                data = candidate.read_bytes() if candidate.is_file() else None
            except OSError as e:
                self.errors.at(node, f"open {candidate}: {e.strerror or e}")
                return []
            if data is None and candidate.is_dir():
                # maddy opens a directory fine and then reads nothing from it.
                return []
            if data is None:
                continue
            sub = _FileReader(self.loader, str(candidate), depth + 1)
            self.loader.files.append(str(candidate))
            nodes = sub.read(_decode(data, str(candidate), node, self.errors))
            self.snippets.update(sub.snippets)
            self.macros.update(sub.macros)
            return nodes
        self.errors.at(node, f"unknown import: {name}")
        return []


class _Loader:
    def __init__(self) -> None:
        self.errors = ErrorList()
        self.files: list[str] = []


def _is_snippet(name: str) -> bool:
    return len(name) >= 2 and name.startswith("(") and name.endswith(")")


def _decode(data: bytes, path: str, node: Node | None, errors: ErrorList) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        errors.add(ConfigError(path, line, "config is not valid UTF-8"))
        return data.decode("utf-8", errors="replace")


def expand_env(nodes: list[Node], environ: dict[str, str] | None = None) -> None:
    """Replace ``{env:NAME}`` in names and arguments, in place; unset names become ''."""
    env = os.environ if environ is None else environ

    def sub(s: str) -> str:
        if "{env:" not in s:
            return s
        s = _ENV_DEFINED.sub(lambda m: env.get(m.group(1), m.group(0)), s)
        return _ENV_LEFTOVER.sub("", s)

    stack = list(nodes)
    while stack:
        n = stack.pop()
        n.name = sub(n.name)
        n.args = [sub(a) for a in n.args]
        if n.children:
            stack.extend(n.children)


def load_text(text: str, path: str, environ: dict[str, str] | None = None) -> Loaded:
    loader = _Loader()
    loader.files.append(path)
    nodes = _FileReader(loader, path, 0).read(text)
    expand_env(nodes, environ)
    return Loaded(nodes, loader.files, loader.errors)


def load_file(path: str, environ: dict[str, str] | None = None) -> Loaded:
    """Read and expand a config file; I/O problems become located errors too."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        loaded = Loaded([], [path])
        loaded.errors.add(ConfigError("", 0, f"failed to read config {path}: {e.strerror or e}"))
        return loaded
    errs = ErrorList()
    text = _decode(data, path, None, errs)
    loaded = load_text(text, path, environ)
    loaded.errors.extend(errs)
    return loaded
