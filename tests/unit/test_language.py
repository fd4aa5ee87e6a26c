"""The config language beyond maddy's own cases: lexing, imports, env, macro scope."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pymaddy.config.expand import load_file, load_text
from pymaddy.config.ir import Node


def parse(text: str, env: dict[str, str] | None = None) -> list[Node]:
    loaded = load_text(text, "t.conf", env or {})
    assert not loaded.errors, [str(e) for e in loaded.errors]
    return loaded.nodes


def errors(text: str) -> list[str]:
    return [str(e) for e in load_text(text, "t.conf", {}).errors]


def flat(nodes: list[Node]) -> list[tuple[str, list[str]]]:
    return [(n.name, n.args) for n in nodes]


def test_comment_cuts_a_word_in_the_middle() -> None:
    assert flat(parse("a b#c d\ne")) == [("a", ["b"]), ("e", [])]


def test_hash_inside_quotes_is_text() -> None:
    assert flat(parse('pass "p#ss word"')) == [("pass", ["p#ss word"])]


def test_only_escaped_quote_is_an_escape() -> None:
    assert flat(parse(r'a "x\"y" "\n" "\\"')) == [("a", ['x"y', r"\n", r"\\"])]


def test_empty_string_is_an_argument() -> None:
    assert flat(parse('a ""')) == [("a", [""])]


def test_quote_opens_only_at_token_start() -> None:
    assert flat(parse('a ab"c d"')) == [("a", ['ab"c', 'd"'])]


def test_unterminated_quote_at_eof_is_kept() -> None:
    assert flat(parse('a "open end')) == [("a", ["open end"])]


def test_multiline_quoted_token_keeps_next_token_on_its_line() -> None:
    nodes = parse('a "x\ny" z\nb')
    assert flat(nodes) == [("a", ["x\ny", "z"]), ("b", [])]
    assert nodes[1].line == 3


def test_glued_braces_are_words() -> None:
    assert flat(parse("a x{ }y")) == [("a", ["x{", "}y"])]


def test_glued_backslash_does_not_continue() -> None:
    assert flat(parse("a b\\\nc")) == [("a", ["b\\"]), ("c", [])]


def test_continuation_skips_blank_and_comment_lines() -> None:
    assert flat(parse("a b \\ # note\n\n   # more\n  c\nd")) == [("a", ["b", "c"]), ("d", [])]


def test_crlf_and_bom() -> None:
    nodes = parse("\ufeffa b\r\nc {\r\n d\r\n}\r\n")
    assert [(n.name, n.args, n.line) for n in nodes] == [("a", ["b"], 1), ("c", [], 2)]


def test_unicode_directive_names_allowed() -> None:
    assert flat(parse("név_1.x-y z")) == [("név_1.x-y", ["z"])]


def test_env_in_names_args_and_quotes() -> None:
    nodes = parse('a "{env:X}/y" pre{env:X}', {"X": "val"})
    assert flat(nodes) == [("a", ["val/y", "preval"])]


def test_unset_env_becomes_empty_argument() -> None:
    assert flat(parse("dir {env:NOPE}")) == [("dir", [""])]


def test_env_leftover_removal_is_greedy_like_maddy() -> None:
    assert flat(parse("a x{env:NOPE}y}z")) == [("a", ["xz"])]


def test_macros_expand_before_env() -> None:
    nodes = parse("$(h) = {env:HOST}\nhostname $(h)\npath /x/$(h)/y", {"HOST": "mx.example.org"})
    assert flat(nodes) == [("hostname", ["mx.example.org"]), ("path", ["/x/mx.example.org/y"])]


def test_macro_redefinition_overwrites_from_that_point() -> None:
    assert flat(parse("$(a) = 1\nx $(a)\n$(a) = 2\ny $(a)")) == [("x", ["1"]), ("y", ["2"])]


def test_syntax_error_reports_file_and_line() -> None:
    assert errors("a {\n b\n}\n}\n") == ["t.conf:4: Error during parsing: unexpected }"]


def test_every_name_error_is_reported() -> None:
    errs = errors("1a x\nb@ y\nok z\n")
    assert errs == [
        "t.conf:1: directive name cannot start with a digit",
        "t.conf:2: character not allowed in directive name: @",
    ]


class TestImports:
    def test_relative_to_importing_file_with_conf_fallback(self, tmp_path: Path) -> None:
        (tmp_path / "sub").mkdir()
        (tmp_path / "main.conf").write_text("import sub/a\nafter 1\n")
        (tmp_path / "sub" / "a.conf").write_text("from_a 1\nimport b\n")
        (tmp_path / "sub" / "b").write_text("from_b 2\n")
        loaded = load_file(str(tmp_path / "main.conf"), {})
        assert not loaded.errors
        assert flat(loaded.nodes) == [("from_a", ["1"]), ("from_b", ["2"]), ("after", ["1"])]
        assert [(n.file, n.line) for n in loaded.nodes] == [
            (str(tmp_path / "sub" / "a.conf"), 1),
            (str(tmp_path / "sub" / "b"), 1),
            (str(tmp_path / "main.conf"), 2),
        ]
        assert len(loaded.files) == 3

    def test_no_globbing(self, tmp_path: Path) -> None:
        (tmp_path / "conf.d").mkdir()
        (tmp_path / "conf.d" / "x.conf").write_text("x 1\n")
        (tmp_path / "main.conf").write_text("import conf.d/*\n")
        errs = [str(e) for e in load_file(str(tmp_path / "main.conf"), {}).errors]
        assert errs == [f"{tmp_path / 'main.conf'}:1: unknown import: conf.d/*"]

    def test_directory_imports_nothing(self, tmp_path: Path) -> None:
        (tmp_path / "d").mkdir()
        (tmp_path / "main.conf").write_text("import d\nz 1\n")
        loaded = load_file(str(tmp_path / "main.conf"), {})
        assert not loaded.errors and flat(loaded.nodes) == [("z", ["1"])]

    def test_imported_file_does_not_see_importer_macros(self, tmp_path: Path) -> None:
        (tmp_path / "main.conf").write_text("$(m) = v\nimport other\nuse $(m)\n")
        (tmp_path / "other.conf").write_text("inner $(m)\n")
        loaded = load_file(str(tmp_path / "main.conf"), {})
        assert flat(loaded.nodes) == [("inner", []), ("use", ["v"])]

    def test_snippet_from_imported_file_usable_later(self, tmp_path: Path) -> None:
        (tmp_path / "main.conf").write_text("import snips\nblk {\n import s\n}\n")
        (tmp_path / "snips.conf").write_text("(s) {\n  child 1\n}\n")
        loaded = load_file(str(tmp_path / "main.conf"), {})
        assert not loaded.errors
        assert loaded.nodes[0].children is not None and flat(loaded.nodes[0].children) == [("child", ["1"])]

    def test_snippet_shadows_file(self, tmp_path: Path) -> None:
        (tmp_path / "main.conf").write_text("(x) {\n from_snippet\n}\nimport x\n")
        (tmp_path / "x.conf").write_text("from_file\n")
        assert flat(load_file(str(tmp_path / "main.conf"), {}).nodes) == [("from_snippet", [])]

    def test_import_needs_one_argument(self) -> None:
        assert errors("import a b\n") == ["t.conf:1: import directive requires exactly 1 argument"]

    def test_self_import_hits_the_limit(self, tmp_path: Path) -> None:
        (tmp_path / "loop.conf").write_text("import loop\n")
        errs = [str(e) for e in load_file(str(tmp_path / "loop.conf"), {}).errors]
        assert any("hit import expansion limit" in e for e in errs)

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
    def test_unreadable_import_is_an_error(self, tmp_path: Path) -> None:
        (tmp_path / "secret.conf").write_text("x\n")
        (tmp_path / "secret.conf").chmod(0)
        (tmp_path / "main.conf").write_text("import secret.conf\n")
        errs = [str(e) for e in load_file(str(tmp_path / "main.conf"), {}).errors]
        assert errs and errs[0].startswith(f"{tmp_path / 'main.conf'}:1: open")


def test_missing_config_file() -> None:
    errs = [str(e) for e in load_file("/nonexistent/maddy.conf", {}).errors]
    assert errs == ["failed to read config /nonexistent/maddy.conf: No such file or directory"]


def test_render_round_trips() -> None:
    text = 'a "b c" "" x\\y {\n  d "#e" {\n    f\n  }\n}\n'
    nodes = parse(text)
    again = parse("\n".join(line for n in nodes for line in n.render(with_origin=True)))
    assert flat(again) == flat(nodes)
    assert again[0].children is not None and nodes[0].children is not None
    assert flat(again[0].children) == flat(nodes[0].children)
