"""Every registered module name, gathered from the schema files of each layer.

Schemas are plain data in `<layer>/schema.py` files that import nothing heavy,
so `check-config` loads them all in a few milliseconds; the implementations
named by `ModuleSchema.runtime` are imported only by `run`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

from pymaddy.compiler.runtimes import RUNTIMES
from pymaddy.config.schema import ModuleSchema

SCHEMA_PACKAGES = (
    "pymaddy.endpoints.schema",
    "pymaddy.pipeline.schema",
    "pymaddy.checks.schema",
    "pymaddy.modify.schema",
    "pymaddy.tables.schema",
    "pymaddy.auth.schema",
    "pymaddy.storage.schema",
    "pymaddy.targets.schema",
    "pymaddy.tls.schema",
)


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, ModuleSchema]:
    out: dict[str, ModuleSchema] = {}
    for pkg in SCHEMA_PACKAGES:
        try:
            mod = importlib.import_module(pkg)
        except ModuleNotFoundError as e:
            if e.name != pkg:
                raise
            continue
        for declared in getattr(mod, "SCHEMAS", ()):
            schema = declared
            if schema.runtime is None and schema.name in RUNTIMES:
                schema = dataclasses.replace(schema, runtime=RUNTIMES[schema.name])
            if schema.name in out:
                raise RuntimeError(f"module {schema.name} registered twice ({pkg})")
            out[schema.name] = schema
    return out


def endpoint_names() -> frozenset[str]:
    return frozenset(n for n, s in registry().items() if "endpoint" in s.roles)
