"""Property tests: no input makes the parser or the compiler raise.

Every outcome must be a tree or a list of located ConfigErrors; an uncaught
exception here would be a traceback in front of a user.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymaddy.compiler import compile_loaded
from pymaddy.config.errors import ConfigError
from pymaddy.config.expand import load_text

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "maddy-upstream"
CORPUS = sorted(
    p.read_text(encoding="utf-8", errors="replace")
    for pattern in ("default/maddy.conf", "tests-integration/*.conf", "docs-examples/*.conf")
    for p in FIXTURES.glob(pattern)
)

TOKENS = st.sampled_from(
    [
        "{", "}", "\n", " ", "\t", "\\", "\\\n", '"', '""', "#", "$(", ")", "$(m)", "$(m) =", "(s)",
        "import", "import s",
        "{env:X}", "{env:", "&", "&x", "smtp", "tcp://127.0.0.1:25", "tls", "off", "file", "deliver_to", "reject",
        "check", "modify", "source", "destination", "default_source", "default_destination", "dummy", "hostname",
        "x.org", "table.chain", "msgpipeline", "limits", "all", "rate", "20", "1s", "\r\n", "\ufeff", "é", "\x00",
    ]
)


def _check(text: str) -> None:
    loaded = load_text(text, "fuzz.conf", {"X": "v"})
    for e in loaded.errors:
        assert isinstance(e, ConfigError)
        assert str(e)
    if not loaded.errors:
        result = compile_loaded(loaded)
        for e in result.errors:
            assert isinstance(e, ConfigError)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TOKENS, max_size=60).map(" ".join))
def test_token_soup_never_raises(text: str) -> None:
    _check(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TOKENS, max_size=60).map("".join))
def test_glued_token_soup_never_raises(text: str) -> None:
    _check(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CORPUS), st.data())
def test_mutated_fixtures_never_raise(base: str, data: st.DataObject) -> None:
    text = base
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(text)))
        op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        if op == "insert":
            text = text[:pos] + data.draw(TOKENS) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + data.draw(st.integers(1, 20)) :]
        else:
            text = text[:pos] + data.draw(TOKENS) + text[pos + 1 :]
    _check(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_raises(text: str) -> None:
    _check(text)
