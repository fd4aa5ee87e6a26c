"""Every module that claims an implementation really has one."""

from __future__ import annotations

import importlib

import pytest

from pymaddy.compiler.registry import registry
from pymaddy.runtime.module import Module

CLAIMED = sorted((name, s.runtime) for name, s in registry().items() if s.runtime)


@pytest.mark.parametrize(("name", "runtime"), CLAIMED, ids=[n for n, _ in CLAIMED])
def test_runtime_class_exists(name: str, runtime: str) -> None:
    modname, _, cls = runtime.partition(":")
    obj = getattr(importlib.import_module(modname), cls)
    assert isinstance(obj, type) and issubclass(obj, Module)
