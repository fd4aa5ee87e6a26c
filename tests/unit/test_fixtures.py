"""Every maddy config in ../shared/fixtures/maddy-upstream gets the verdict maddy 0.9.4 gives it.

- default/ and tests-integration/: valid (with the env the upstream harness sets);
- pipeline-cases/: maddy's msgpipeline config tests, as smtp endpoint bodies;
- docs-examples/: complete blocks are valid (apart from standing alone), the ones
  0.9.4 rejects fail with a located message naming the problem, fragments are valid
  in the context they were written for, and templates fail with located messages only.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from pymaddy.compiler import compile_loaded
from pymaddy.config.expand import load_file, load_text
from tests.confhelp import STANDALONE_NOISE

FIX = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "maddy-upstream"
LOCATED = re.compile(r"^[^:]+:\d+: ")


def errors_for(path: Path, env: dict[str, str], prefix: str = "") -> list[str]:
    loaded = load_text(prefix + path.read_text(), str(path), env) if prefix else load_file(str(path), env)
    if loaded.errors:
        return [str(e) for e in loaded.errors]
    return [str(e) for e in compile_loaded(loaded).errors]


def test_default_config_is_valid() -> None:
    assert errors_for(FIX / "default" / "maddy.conf", {}) == []


def test_docker_default_config_is_valid() -> None:
    env = {"MADDY_HOSTNAME": "mx.example.org", "MADDY_DOMAIN": "example.org"}
    assert errors_for(FIX / "default" / "maddy.conf.docker", env) == []


def test_old_kubernetes_chart_config_is_refused() -> None:
    errs = errors_for(FIX / "contrib" / "kubernetes-chart-maddy.conf", {})
    assert any("kubernetes-chart-maddy.conf:61: unknown module: require_matching_ehlo" in e for e in errs), errs


@pytest.fixture(scope="module")
def integration_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What maddy's tests/ harness sets: ports, TEST_PWD with the check_command.sh script, state dir."""
    pwd = tmp_path_factory.mktemp("pwd")
    (pwd / "testdata").mkdir()
    script = pwd / "testdata" / "check_command.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    env = {"TEST_PWD": str(pwd), "TEST_STATE_DIR": str(pwd / "state"), "DOVECOT_SASL_SOCK": str(pwd / "sasl.sock")}
    for name in ("smtp", "submission", "imap", "lmtp", "target", "ldap"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env[f"TEST_PORT_{name}"] = str(s.getsockname()[1])
    return env


INTEGRATION = sorted((FIX / "tests-integration").glob("*.conf"))


@pytest.mark.parametrize("path", INTEGRATION, ids=lambda p: p.stem)
def test_integration_config_is_valid(path: Path, integration_env: dict[str, str]) -> None:
    prefix = f"state_dir {integration_env['TEST_STATE_DIR']}\nruntime_dir {integration_env['TEST_STATE_DIR']}/run\n"
    text = path.read_text()
    if "{BUFFER_OPT}" in text:
        for opt in ("ram", "fs"):
            res = compile_loaded(load_text(prefix + text.replace("{BUFFER_OPT}", opt), str(path), integration_env))
            assert [str(e) for e in res.errors] == []
        return
    assert errors_for(path, integration_env, prefix) == []


PIPELINE_FAILURES = {
    "04": "missing or empty default source block",
    "05": "missing or empty default destination block",
    "06": "invalid destination match rule: ..",
    "07": "invalid destination match rule: @example.",
    "08": "invalid destination match rule: @example.",
    "09": "error code should start with either 4 or 5",
    "10": "can't put handling directives together with source rules",
    "11": "expected at least one destination match rule",
}


@pytest.mark.parametrize("path", sorted((FIX / "pipeline-cases").glob("*.conf")), ids=lambda p: p.stem)
def test_pipeline_case(path: Path) -> None:
    body = path.read_text()
    text = "hostname mx.example.org\ntls off\nsmtp tcp://127.0.0.1:2525 {\n" + body + "\n}\n"
    errs = [str(e) for e in compile_loaded(load_text(text, path.name, {})).errors]
    if "-ok-" in path.name:
        assert errs == []
    else:
        assert any(PIPELINE_FAILURES[path.name[:2]] in e for e in errs), errs
        assert all(LOCATED.match(e) for e in errs), errs


DOCS = FIX / "docs-examples"

# Complete module blocks: valid; alone they only lack an endpoint that uses them.
COMPLETE = {
    "reference__auth__external__1", "reference__auth__netauth__1", "reference__auth__netauth__2",
    "reference__auth__pam__2", "reference__auth__shadow__1", "reference__blob__fs__1", "reference__blob__s3__1",
    "reference__checks__dnsbl__1", "reference__checks__spf__1", "reference__endpoints__openmetrics__1",
    "reference__modifiers__dkim__2", "reference__modules__4", "reference__storage__imapsql__1",
    "reference__table__chain__1", "reference__table__chain__2", "reference__table__email_localpart__1",
    "reference__table__regexp__3", "reference__table__sql_query__3", "reference__targets__remote__1",
    "tutorials__pam__2", "tutorials__pam__5",
}

# Fragments of an endpoint's pipeline: valid once put inside `smtp … { }`.
PIPELINE_FRAGMENTS = {
    "reference__modifiers__envelope__2", "reference__checks__dnsbl__2", "reference__checks__dnsbl__3",
    "reference__targets__smtp__1", "reference__table__file__3", "reference__table__sql_query__2",
}

# What maddy 0.9.4 refuses although the documentation shows it.
INVALID = {
    "reference__auth__dovecot_sasl__1": ":1: unknown module or global directive: auth.dovecot_sasl",
    "reference__auth__ldap__1": "search directives set when dn_template is used",
    "reference__checks__authorize_sender__1": ":8: unexpected directive: malformed_action",
    "reference__checks__dkim__1": ":4: unexpected directive: allow_body_subset",
    "reference__endpoints__imap__1": ":2: unknown module: /etc/ssl/private/cert.pem (namespace: tls.loader)",
    "reference__endpoints__smtp__1": "unknown limit scope: endpoint",
    "reference__endpoints__smtp__6": "unsupported scheme: smtp://0.0.0.0:25",
    "reference__table__regexp__1": ":4: unexpected directive: expand_placeholders",
    "third-party__smtp-servers__1": ":2: unknown module or global directive: table.pass_table",
    "upgrading__5": ":1: unknown module or global directive: imapsql",
    "upgrading__6": ":1: unknown module or global directive: pass_table",
}
INVALID_AS_FRAGMENT = {
    "reference__table__email_with_domain__2": "unknown module: email_local_part (namespace: table)",
}


@pytest.mark.parametrize("name", sorted(COMPLETE))
def test_complete_docs_block_is_valid(name: str) -> None:
    errs = errors_for(DOCS / f"{name}.conf", {})
    assert [e for e in errs if not any(n in e for n in STANDALONE_NOISE)] == []


@pytest.mark.parametrize("name", sorted(PIPELINE_FRAGMENTS | set(INVALID_AS_FRAGMENT)))
def test_docs_pipeline_fragment(name: str) -> None:
    body = (DOCS / f"{name}.conf").read_text()
    text = "hostname mx.example.org\ntls off\nsmtp tcp://127.0.0.1:2525 {\n" + body + "\n deliver_to dummy\n}\n"
    errs = [str(e) for e in compile_loaded(load_text(text, f"{name}.conf", {})).errors]
    if name in INVALID_AS_FRAGMENT:
        assert any(INVALID_AS_FRAGMENT[name] in e for e in errs), errs
    else:
        assert errs == []


@pytest.mark.parametrize("name", sorted(INVALID))
def test_docs_example_refused_like_maddy(name: str) -> None:
    errs = errors_for(DOCS / f"{name}.conf", {})
    assert any(INVALID[name] in e and LOCATED.match(e) for e in errs), errs


OTHERS = sorted(
    p.stem
    for p in DOCS.glob("*.conf")
    if p.stem not in COMPLETE | PIPELINE_FRAGMENTS | set(INVALID) | set(INVALID_AS_FRAGMENT)
)


@pytest.mark.parametrize("name", OTHERS)
def test_docs_template_or_fragment_errors_are_located(name: str) -> None:
    # Templates (`...`, `<placeholders>`) and fragments that need the rest of a config:
    # whatever is wrong must be reported with its file and line, never crash.
    for e in errors_for(DOCS / f"{name}.conf", {}):
        assert LOCATED.match(e) or any(n in e for n in STANDALONE_NOISE), e


def test_every_docs_example_is_classified() -> None:
    assert len(OTHERS) + len(COMPLETE) + len(PIPELINE_FRAGMENTS) + len(INVALID) + len(INVALID_AS_FRAGMENT) == len(
        list(DOCS.glob("*.conf"))
    )
    assert len(OTHERS) < 60
