"""Helpers for tests that compile config text (no server process)."""

from __future__ import annotations

from pymaddy.compiler import CompileResult, compile_loaded
from pymaddy.config.expand import load_text

# Errors that a lone module block always gets when it stands outside a full config.
STANDALONE_NOISE = ("unused configuration block", "at least one endpoint should be configured")


def compile_text(text: str, path: str = "maddy.conf", environ: dict[str, str] | None = None) -> CompileResult:
    return compile_loaded(load_text(text, path, environ or {}))


def errors_of(text: str, path: str = "maddy.conf", standalone: bool = True) -> list[str]:
    """Every error as `FILE:LINE: message`; with standalone, the noise of a lone block is dropped."""
    res = compile_text(text, path)
    out = [str(e) for e in res.errors]
    if standalone:
        out = [e for e in out if not any(n in e for n in STANDALONE_NOISE)]
    return out


def settings_of(text: str, instance: str) -> dict[str, object]:
    """The typed settings of the top-level block named `instance`; fails on any real error."""
    res = compile_text(text)
    errs = [str(e) for e in res.errors if not any(n in str(e) for n in STANDALONE_NOISE)]
    assert not errs, errs
    assert res.graph is not None
    return dict(res.graph.blocks[instance].settings)
