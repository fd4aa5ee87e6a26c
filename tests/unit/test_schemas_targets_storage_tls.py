"""Schemas of targets, mx_auth policies, storage, blob stores, IMAP filters and TLS loaders.

Defaults and error messages follow maddy 0.9.4's Configure() code, not its docs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from pymaddy.compiler import compile_file
from pymaddy.compiler.graph import ModuleInstance
from pymaddy.compiler.registry import registry
from pymaddy.config.values import Endpoint
from pymaddy.storage.schema import Compression, look_path
from pymaddy.targets.schema import SASLAuth
from tests.confhelp import STANDALONE_NOISE, compile_text, errors_of
from tests.confhelp import settings_of as _settings_of

FIXTURES = Path("/work/shared/fixtures/maddy-upstream")
HOST = "hostname mx.example.org\n"


def inline_instances(text: str, module: str) -> list[ModuleInstance]:
    """Every instance of `module` in a config that must compile without real errors."""
    res = compile_text(text)
    errs = [str(e) for e in res.errors if not any(n in str(e) for n in STANDALONE_NOISE)]
    assert not errs, errs
    assert res.graph is not None
    return [i for i in res.graph.instances if i.name == module]


def settings_of(text: str, instance: str) -> dict[str, Any]:
    return _settings_of(text, instance)


def smtp_with(body: str) -> str:
    return HOST + "smtp tcp://127.0.0.1:2525 {\n    tls off\n" + body + "\n}\n"


def only(text: str) -> list[str]:
    """Errors of a config expected to fail, minus the noise of a lone block."""
    errs = errors_of(text)
    assert errs, "expected errors"
    return errs


# -- registry --------------------------------------------------------------------------


def test_every_module_of_these_layers_is_registered() -> None:
    names = {
        "target.remote",
        "target.queue",
        "target.smtp",
        "target.lmtp",
        "target.imapsql",
        "storage.imapsql",
        "storage.blob.fs",
        "storage.blob.s3",
        "imap.filter.command",
        "tls.loader.file",
        "tls.loader.self_signed",
        "tls.loader.acme",
        *(f"mx_auth.{p}" for p in ("mtasts", "dane", "dnssec", "local_policy", "sts_preload")),
        *(f"libdns.{p}" for p in ("cloudflare", "digitalocean", "gandi", "gcore", "hetzner", "namecheap", "vultr")),
        *(f"libdns.{p}" for p in ("acmedns", "alidns", "googleclouddns", "leaseweb", "metaname", "namedotcom")),
        *(f"libdns.{p}" for p in ("rfc2136", "route53")),
    }
    reg = registry()
    assert names <= set(reg)
    for n in names:
        assert reg[n].doc


# -- target.remote -----------------------------------------------------------------------


def test_remote_code_defaults() -> None:
    s = settings_of(HOST + "target.remote r { }", "r")
    assert s["hostname"] == "mx.example.org"  # inherited
    assert s["conn_max_idle_count"] == 5  # docs: 10
    assert s["submission_timeout"] == 300.0  # docs: 12m
    assert s["connect_timeout"] == 300.0
    assert s["command_timeout"] == 300.0
    assert s["conn_reuse_limit"] == 10
    assert s["conn_max_idle_time"] == 150
    assert s["requiretls_override"] is True
    assert s["relaxed_requiretls"] is True
    assert s["force_ipv4"] is False
    assert s["local_ip"] is None
    assert s["mx_auth"] is None
    assert s["limits"] is None
    assert s["tls_client"] is None
    assert s["debug"] is False


def test_remote_inherits_debug_and_tls_client() -> None:
    s = settings_of(HOST + "debug yes\ntls_client {\n root_ca /ca.pem\n}\ntarget.remote r { }", "r")
    assert s["debug"] is True
    assert s["tls_client"]["root_ca"] == ["/ca.pem"]


def test_remote_hostname_is_required() -> None:
    assert errors_of("target.remote r { }") == ["maddy.conf:1: missing required directive: hostname"]


def test_remote_block_values() -> None:
    text = HOST + (
        "target.remote r {\n"
        " hostname other.example.org\n local_ip 192.0.2.1\n force_ipv4\n"
        " conn_max_idle_count 3\n submission_timeout 1h 5m\n requiretls_override no\n"
        " mx_auth {\n  dane\n  mtasts {\n   cache ram\n  }\n  local_policy {\n   min_tls_level authenticated\n  }\n }\n"
        " limits {\n  all rate 10 1s\n }\n"
        "}\n"
    )
    s = settings_of(text, "r")
    assert s["hostname"] == "other.example.org"
    assert s["force_ipv4"] is True
    assert s["conn_max_idle_count"] == 3
    assert s["submission_timeout"] == 3900.0
    assert s["requiretls_override"] is False
    group = s["mx_auth"]
    assert isinstance(group, ModuleInstance) and group.name == "mx_auth"
    policies = {m.name: m for m in group.settings["members"]}
    assert set(policies) == {"mx_auth.dane", "mx_auth.mtasts", "mx_auth.local_policy"}
    assert policies["mx_auth.mtasts"].settings["cache"] == "ram"
    assert policies["mx_auth.mtasts"].settings["fs_dir"] == "mtasts_cache"
    assert policies["mx_auth.local_policy"].settings["min_tls_level"] == "authenticated"
    assert policies["mx_auth.local_policy"].settings["min_mx_level"] == "none"
    assert s["limits"].name == "limits"


def test_remote_rejects_inline_arguments() -> None:
    errs = errors_of(smtp_with("deliver_to remote x"))
    assert errs == ["maddy.conf:4: remote: inline arguments are not used"]


@pytest.mark.parametrize("ip", ["192.0.2.1", "[2001:db8::1]", "mail.example.org"])
def test_remote_local_ip_accepted(ip: str) -> None:
    assert settings_of(HOST + f"target.remote r {{\n local_ip {ip}\n}}", "r")["local_ip"] == ip


def test_remote_local_ip_bare_ipv6_fails_like_go_resolve_tcp_addr() -> None:
    errs = errors_of(HOST + "target.remote r {\n local_ip 2001:db8::1\n}")
    assert errs == ["maddy.conf:3: remote: failed to parse local IP: address 2001:db8::1:0: too many colons in address"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("conn_reuse_limit ten", "invalid integer: ten"),
        ("connect_timeout 5d", 'time: unknown unit "d" in duration "5d"'),
        ("force_ipv4 maybe", "bool argument should be 'yes' or 'no'"),
        ("tls_client {\n cert /c.pem\n}", "both cert and key must be set for client authentication"),
        ("unknown_thing 1", "unexpected directive: unknown_thing"),
        ("mx_auth &nowhere", "unknown configuration block: nowhere"),
    ],
)
def test_remote_invalid_values_are_located(line: str, message: str) -> None:
    errs = only(HOST + "target.remote r {\n" + line + "\n}")
    assert len(errs) == 1
    assert re.fullmatch(r"maddy\.conf:\d+: .+", errs[0])
    if "unknown unit" in message:
        assert errs[0].startswith("maddy.conf:3: time:")
    else:
        assert errs[0].endswith(message)


# -- mx_auth policies ------------------------------------------------------------------


def policies_of(body: str) -> dict[str, ModuleInstance]:
    inst = inline_instances(HOST + "target.remote r {\n mx_auth {\n" + body + "\n }\n}\n", "mx_auth")
    return {m.name: m for m in inst[0].settings["members"]}


def test_policy_defaults() -> None:
    p = policies_of("mtasts\ndane\ndnssec\nlocal_policy\nsts_preload")
    assert p["mx_auth.mtasts"].settings["cache"] == "fs"
    assert p["mx_auth.local_policy"].settings["min_tls_level"] == "encrypted"
    assert p["mx_auth.local_policy"].settings["min_mx_level"] == "none"
    assert p["mx_auth.sts_preload"].settings["source"] == "eff"
    assert p["mx_auth.sts_preload"].settings["enforce_testing"] is True
    assert p["mx_auth.dane"].settings["debug"] is False


def test_policies_ignore_inline_arguments() -> None:
    # The docs' `local_policy off` works only because the code ignores inline arguments.
    p = policies_of("local_policy off\ndnssec whatever")
    assert p["mx_auth.local_policy"].settings["min_tls_level"] == "encrypted"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("dnssec {\n debug\n}", "unexpected directive: debug"),
        ("mtasts {\n cache disk\n}", "invalid argument, valid values are: [ram fs]"),
        ("local_policy {\n min_mx_level dane\n}", "invalid argument, valid values are: [none mtasts dnssec]"),
        ("dane\ndane", "duplicate policy block: dane"),
    ],
)
def test_policy_errors(body: str, message: str) -> None:
    errs = only(HOST + "target.remote r {\n mx_auth {\n" + body + "\n }\n}\n")
    assert len(errs) == 1 and errs[0].endswith(message), errs
    assert re.match(r"maddy\.conf:\d+: ", errs[0])


# -- target.queue --------------------------------------------------------------------------

QUEUE = HOST + "target.remote r { }\n"


def test_queue_code_defaults() -> None:
    s = settings_of(QUEUE + "target.queue q {\n target &r\n}", "q")
    assert s["target"].name == "target.remote"
    assert s["retry_time_scale"] == 1.25  # docs: 1.2
    assert s["initial_retry_time"] == 900.0
    assert s["max_tries"] == 20
    assert s["max_parallelism"] == 16
    assert s["post_init_delay"] == 10.0
    assert s["hostname"] == "mx.example.org"
    assert s["bounce"] is None
    assert s["autogenerated_msg_domain"] is None
    assert s["location"] == "/var/lib/maddy/q"
    assert "@inline" not in s


def test_queue_default_location_uses_state_dir_and_module_name() -> None:
    s = settings_of("state_dir /srv/m\n" + QUEUE + "target.queue {\n target &r\n}", "target.queue")
    assert s["location"] == "/srv/m/target.queue"


def test_queue_requires_target_and_hostname() -> None:
    assert errors_of("target.queue q { }") == [
        "maddy.conf:1: missing required directive: target",
        "maddy.conf:1: missing required directive: hostname",
    ]


def test_queue_inline_location_argument() -> None:
    [q] = inline_instances(smtp_with("deliver_to queue /var/spool/q {\n target dummy\n}"), "target.queue")
    assert q.settings["location"] == "/var/spool/q"
    assert q.settings["target"].name == "dummy"


def test_queue_location_directive_beats_inline_argument() -> None:
    [q] = inline_instances(smtp_with("deliver_to queue /a {\n target dummy\n location /b\n}"), "target.queue")
    assert q.settings["location"] == "/b"


def test_queue_inline_needs_a_location() -> None:
    errs = errors_of(smtp_with("deliver_to queue {\n target dummy\n}"))
    assert errs == ["maddy.conf:4: queue: need explicit location directive or inline argument if defined inline"]


def test_queue_too_many_inline_arguments() -> None:
    errs = errors_of(smtp_with("deliver_to queue /a /b {\n target dummy\n}"))
    assert errs == ["maddy.conf:4: queue: wrong amount of inline arguments"]


def test_queue_bounce_needs_autogenerated_msg_domain() -> None:
    text = QUEUE + "target.queue q {\n target &r\n bounce {\n  deliver_to dummy\n }\n}"
    assert errors_of(text) == ["maddy.conf:3: queue: autogenerated_msg_domain is required if bounce {} is specified"]


def test_queue_bounce_with_inherited_domain() -> None:
    text = (
        "autogenerated_msg_domain example.org\n"
        + QUEUE
        + "target.queue q {\n target &r\n bounce {\n  deliver_to dummy\n }\n}"
    )
    s = settings_of(text, "q")
    assert s["autogenerated_msg_domain"] == "example.org"
    assert s["bounce"] is not None


def test_queue_bounce_pipeline_errors_are_located() -> None:
    text = (
        "autogenerated_msg_domain example.org\n" + QUEUE + "target.queue q {\n target &r\n bounce {\n  nonsense\n }\n}"
    )
    errs = errors_of(text)
    assert any(e.startswith("maddy.conf:6: ") for e in errs), errs


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("target &r\n max_tries many", "maddy.conf:5: invalid integer: many"),
        ("target &r\n retry_time_scale fast", "maddy.conf:5: invalid float: fast"),
        ("target &r\n initial_retry_time -5m", "maddy.conf:5: duration must not be negative"),
        ("target &r\n target &r", "maddy.conf:5: duplicate directive: target"),
        ("target", "maddy.conf:4: at least one argument is required"),
        ("target &nowhere", "maddy.conf:4: unknown configuration block: nowhere"),
        ("target &r\n location a b", "maddy.conf:5: expected 1 argument"),
    ],
)
def test_queue_invalid_values(body: str, message: str) -> None:
    assert errors_of(QUEUE + "target.queue q {\n " + body + "\n}") == [message]


# -- target.smtp / target.lmtp ---------------------------------------------------------------


def test_smtp_target_defaults() -> None:
    s = settings_of(HOST + "target.smtp s {\n targets tcp://127.0.0.1:2525\n}", "s")
    assert s["starttls"] is True
    assert s["auth"] is None
    assert s["submission_timeout"] == 300.0
    assert s["targets"] == [Endpoint("tcp://127.0.0.1:2525", "tcp", "127.0.0.1", "2525")]
    assert "@inline" not in s


def test_lmtp_target_starttls_defaults_off() -> None:
    s = settings_of(HOST + "target.lmtp l {\n targets unix:///run/dovecot/lmtp\n}", "l")
    assert s["starttls"] is False
    assert s["targets"][0].is_unix


def test_smtp_target_host_names_allowed() -> None:
    s = settings_of(HOST + "target.smtp s {\n targets tls://smtp.example.org:465 tcp://relay:25\n}", "s")
    assert [t.host for t in s["targets"]] == ["smtp.example.org", "relay"]


def test_smtp_target_needs_an_endpoint() -> None:
    assert errors_of(HOST + "target.smtp s { }") == [
        "maddy.conf:2: target.smtp: at least one target endpoint is required"
    ]
    assert errors_of(HOST + "target.lmtp s { }") == [
        "maddy.conf:2: target.lmtp: at least one target endpoint is required"
    ]


def test_smtp_target_inline_endpoints_are_appended_to_targets() -> None:
    text = smtp_with("deliver_to smtp tcp://127.0.0.1:1 tcp://127.0.0.1:2 {\n targets tcp://127.0.0.1:3\n}")
    [t] = inline_instances(text, "target.smtp")
    assert [e.port for e in t.settings["targets"]] == ["3", "1", "2"]


def test_lmtp_inline_form() -> None:
    [t] = inline_instances(smtp_with("deliver_to lmtp unix:/run/l.sock"), "target.lmtp")
    assert t.settings["targets"][0].path == "/run/l.sock"


def test_smtp_target_bad_targets() -> None:
    errs = errors_of(HOST + "target.smtp s {\n targets tcp://h:1 tcp://h\n}")
    assert errs == ["maddy.conf:3: tcp://h: port is required"]


def test_smtp_target_bad_inline_endpoint() -> None:
    errs = errors_of(smtp_with("deliver_to smtp smtp://127.0.0.1:25"))
    assert len(errs) == 1 and errs[0].startswith("maddy.conf:4: smtp://127.0.0.1:25: unsupported scheme"), errs


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("auth off", None),
        ("auth plain user secret", SASLAuth("plain", "user", "secret")),
        ("auth login user secret", SASLAuth("login", "user", "secret")),
        ("auth forward", SASLAuth("forward")),
        ("auth external", SASLAuth("external")),
    ],
)
def test_smtp_target_auth(line: str, value: SASLAuth | None) -> None:
    s = settings_of(HOST + f"target.smtp s {{\n targets tcp://127.0.0.1:1\n {line}\n}}", "s")
    assert s["auth"] == value


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("auth", "at least one argument required"),
        ("auth plain user", "two additional arguments are required (username, password)"),
        ("auth forward me", "no additional arguments required"),
        ("auth cram-md5", "unknown authentication mechanism: cram-md5"),
        ("attempt_starttls a b", "expected exactly 1 argument"),
    ],
)
def test_smtp_target_invalid(line: str, message: str) -> None:
    errs = only(HOST + f"target.smtp s {{\n targets tcp://127.0.0.1:1\n {line}\n}}")
    assert len(errs) == 1 and errs[0].startswith("maddy.conf:4: ") and message in errs[0], errs


def test_smtp_target_deprecated_directives() -> None:
    text = HOST + (
        "target.lmtp s {\n targets tcp://127.0.0.1:1\n starttls no\n"
        " attempt_starttls no\n attempt_starttls\n require_tls yes\n require_tls\n}"
    )
    s = settings_of(text, "s")
    assert s["starttls"] is True  # the last attempt_starttls wins over starttls


# -- storage.imapsql -------------------------------------------------------------------------

IMAPSQL = "storage.imapsql m {\n driver sqlite3\n dsn imapsql.db\n"


def test_imapsql_code_defaults() -> None:
    s = settings_of(IMAPSQL + "}", "m")
    assert s["driver"] == "sqlite3"
    assert s["dsn"] == ["imapsql.db"]
    assert s["compression"] == Compression("off")
    assert s["appendlimit"] == 32 << 20
    assert s["junk_mailbox"] == "Junk"
    assert s["disable_recent"] is True
    assert s["sqlite3_cache_size"] == 0
    assert s["sqlite3_busy_timeout"] == 5000
    assert s["auth_normalize"] == "auto"  # docs: precis_casefold_email
    assert s["delivery_normalize"] == "precis_casefold_email"
    assert s["delivery_map"] is None
    assert s["imap_filter"] is None
    store = s["msg_store"]
    assert isinstance(store, ModuleInstance) and store.name == "storage.blob.fs"
    assert store.settings["root"] == "messages"


def test_target_imapsql_is_the_same_module() -> None:
    s = settings_of("target.imapsql m {\n driver postgres\n dsn host=db user=maddy\n}", "m")
    assert s["dsn"] == ["host=db", "user=maddy"]


def test_imapsql_inline_driver_and_dsn() -> None:
    # `imapsql` in a deliver_to resolves to target.imapsql (namespace first).
    [m] = inline_instances(smtp_with("deliver_to imapsql sqlite3 /var/lib/x.db"), "target.imapsql")
    assert m.settings["driver"] == "sqlite3"
    assert m.settings["dsn"] == ["/var/lib/x.db"]


def test_imapsql_block_directives_override_inline() -> None:
    [m] = inline_instances(smtp_with("deliver_to imapsql sqlite3 a.db {\n dsn b.db\n}"), "target.imapsql")
    assert m.settings["dsn"] == ["b.db"]


def test_imapsql_one_inline_argument() -> None:
    errs = errors_of(smtp_with("deliver_to imapsql sqlite3"))
    assert errs[0] == "maddy.conf:4: imapsql: expected at least 2 arguments"


def test_imapsql_requires_driver_and_dsn() -> None:
    assert errors_of("storage.imapsql m { }") == [
        "maddy.conf:1: imapsql: dsn is required",
        "maddy.conf:1: imapsql: driver is required",
    ]


def test_imapsql_unknown_driver() -> None:
    assert errors_of("storage.imapsql m {\n driver oracle\n dsn x\n}") == [
        'maddy.conf:2: imapsql: unknown driver "oracle"'
    ]


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("compression lz4", Compression("lz4")),
        ("compression zstd 3", Compression("zstd", 3)),
        ("compression off", Compression("off")),
    ],
)
def test_imapsql_compression(line: str, value: Compression) -> None:
    assert settings_of(IMAPSQL + line + "\n}", "m")["compression"] == value


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("compression zstd fast", "imapsql: first argument for lz4 and zstd is compression level"),
        ("compression zstd 3 4", "imapsql: expected at most 2 arguments"),
        ("compression off 1", "imapsql: expected at most 1 arguments"),
        ("compression gzip", "imapsql: unknown compression algorithm"),
        ("delivery_normalize lower", "imapsql: unknown normalization function: lower"),
        ("auth_normalize a b", "expected 1 argument"),
        ("appendlimit 4G", "imapsql: appendlimit value is too big"),
        ("appendlimit 10k", "unknown unit suffix: k"),
        ("sqlite_cache_size 100", "unexpected directive: sqlite_cache_size"),  # docs' name
        ("sqlite3_busy_timeout 5s", "invalid integer: 5s"),
        ("driver sqlite3", "duplicate directive: driver"),
    ],
)
def test_imapsql_invalid(line: str, message: str) -> None:
    assert errors_of(IMAPSQL + line + "\n}") == [f"maddy.conf:4: {message}"]


def test_imapsql_msg_store_forms() -> None:
    s = settings_of(IMAPSQL + " msg_store fs /srv/blobs\n}", "m")
    assert s["msg_store"].settings["root"] == "/srv/blobs"
    s = settings_of(
        IMAPSQL + " msg_store s3 {\n endpoint s3.example.org\n access_key a\n secret_key b\n bucket c\n }\n}", "m"
    )
    assert s["msg_store"].name == "storage.blob.s3"
    s = settings_of("storage.blob.fs b {\n root /x\n}\n" + IMAPSQL + " msg_store &b\n}", "m")
    assert s["msg_store"].instance == "b"


def test_imapsql_fsstore_alone_is_overwritten_by_the_default() -> None:
    # maddy applies the msg_store default after the block and it replaces fsstore's store.
    s = settings_of(IMAPSQL + " fsstore /old\n}", "m")
    assert s["msg_store"].settings["root"] == "messages"
    assert s["fsstore"][0].settings["root"] == "/old"


def test_imapsql_fsstore_after_msg_store_wins() -> None:
    s = settings_of(IMAPSQL + " msg_store fs /new\n fsstore /old\n}", "m")
    assert s["msg_store"].settings["root"] == "/old"
    s = settings_of(IMAPSQL + " fsstore /old\n msg_store fs /new\n}", "m")
    assert s["msg_store"].settings["root"] == "/new"


def test_imapsql_maps_and_filters() -> None:
    text = (
        "storage.imapsql m {\n driver sqlite\n dsn x.db\n delivery_map dummy\n auth_map dummy\n"
        " imap_filter {\n  command /bin/sh -c true\n }\n}"
    )
    s = settings_of(text, "m")
    assert s["delivery_map"].name == "dummy"
    filters = s["imap_filter"]
    assert filters.name == "imap_filters"
    [cmd] = filters.settings["members"]
    assert cmd.settings["command"] == "/bin/sh"
    assert cmd.settings["args"] == ["-c", "true"]


def test_imapsql_filter_reference_to_a_command_block() -> None:
    # A top-level imap.filter.command block can never work: it gets no inline command.
    errs = errors_of("imap.filter.command f { }\n" + IMAPSQL + " imap_filter &f\n}")
    assert errs == ["maddy.conf:1: command: at least one argument is required (command name)"]


# -- imap.filter.command ------------------------------------------------------------------------


def test_filter_command_must_exist() -> None:
    errs = errors_of(IMAPSQL + " imap_filter {\n  command /nonexistent/filter {account_name}\n }\n}")
    assert errs == [
        'maddy.conf:5: command: exec: "/nonexistent/filter": stat /nonexistent/filter: no such file or directory'
    ]
    errs = errors_of(IMAPSQL + " imap_filter {\n  command no-such-filter-binary\n }\n}")
    assert errs == ['maddy.conf:5: command: exec: "no-such-filter-binary": executable file not found in $PATH']


def test_filter_command_takes_no_directives() -> None:
    errs = errors_of(IMAPSQL + " imap_filter {\n  command /bin/sh {\n   run_on body\n  }\n }\n}")
    assert errs == ["maddy.conf:6: unexpected directive: run_on"]


def test_look_path(tmp_path: Path) -> None:
    exe = tmp_path / "f"
    exe.write_text("#!/bin/sh\n")
    with pytest.raises(ValueError, match="permission denied"):
        look_path(str(exe))
    exe.chmod(0o755)
    assert look_path("f", str(tmp_path)) == str(exe)
    with pytest.raises(ValueError, match="is a directory"):
        look_path(str(tmp_path))
    with pytest.raises(ValueError, match="not found in"):
        look_path("f", "/nonexistent")


# -- blob stores -----------------------------------------------------------------------------


def test_blob_fs_forms() -> None:
    assert settings_of("storage.blob.fs b {\n root /srv/x\n}", "b")["root"] == "/srv/x"
    assert errors_of("storage.blob.fs b { }") == ["maddy.conf:1: storage.blob.fs: directory not set"]
    errs = errors_of(IMAPSQL + " msg_store fs a b\n}")
    assert errs == ["maddy.conf:4: storage.blob.fs: 1 or 0 arguments expected"]


def test_blob_s3_defaults_and_required() -> None:
    s = settings_of("storage.blob.s3 b {\n endpoint play.min.io\n access_key a\n secret_key s\n bucket x\n}", "b")
    assert s["secure"] is True
    assert s["creds"] == "access_key"
    assert s["region"] == ""
    assert s["object_prefix"] == ""
    assert errors_of("storage.blob.s3 b {\n endpoint play.min.io\n}") == [
        "maddy.conf:1: missing required directive: access_key",
        "maddy.conf:1: missing required directive: secret_key",
        "maddy.conf:1: missing required directive: bucket",
    ]


def test_blob_s3_unknown_creds_fall_back_to_access_key() -> None:
    text = "storage.blob.s3 b {\n endpoint e\n access_key a\n secret_key s\n bucket x\n creds vault\n}"
    assert settings_of(text, "b")["creds"] == "access_key"
    assert settings_of(text.replace("vault", "iam"), "b")["creds"] == "iam"


def test_blob_s3_errors() -> None:
    errs = errors_of(IMAPSQL + " msg_store s3 x {\n endpoint e\n access_key a\n secret_key s\n bucket x\n }\n}")
    assert errs == ["maddy.conf:4: storage.blob.s3: expected 0 arguments"]
    errs = errors_of(
        "storage.blob.s3 b {\n endpoint https://s3.example.org\n access_key a\n secret_key s\n bucket x\n}"
    )
    assert errs == ["maddy.conf:2: storage.blob.s3: Endpoint url cannot have fully qualified paths."]


# -- TLS loaders --------------------------------------------------------------------------------


def test_tls_file_inline_pairs() -> None:
    [f] = inline_instances(
        HOST + "tls file /c1 /k1 /c2 /k2\nsmtp tcp://127.0.0.1:25 {\n deliver_to dummy\n}", "tls.loader.file"
    )
    assert f.settings["certs"] == ["/c1", "/c2"]
    assert f.settings["keys"] == ["/k1", "/k2"]


def test_tls_file_directives_then_inline() -> None:
    text = (
        HOST
        + "tls {\n loader file /c2 k2 {\n  certs /c1\n  keys k1\n }\n}\nsmtp tcp://127.0.0.1:25 {\n deliver_to dummy\n}"
    )
    [f] = inline_instances(text, "tls.loader.file")
    assert f.settings["certs"] == ["/c1", "/c2"]
    assert f.settings["keys"] == ["k1", "k2"]  # only certificate paths must be absolute


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("/c1 /k1 /c2", "tls.loader.file: odd amount of arguments"),
        ("cert.pem key.pem", "tls.loader.file: only absolute paths allowed in certificate paths: sorry :("),
    ],
)
def test_tls_file_inline_errors(args: str, message: str) -> None:
    assert errors_of(f"tls file {args}\n") == [f"maddy.conf:1: {message}"]


def test_tls_file_block_errors() -> None:
    assert errors_of("tls.loader.file f { }") == ["maddy.conf:1: tls.loader.file: at least one certificate required"]
    assert errors_of("tls.loader.file f {\n certs /a /b\n keys /k\n}") == [
        "maddy.conf:1: tls.loader.file: mismatch in certs and keys count"
    ]


def test_tls_self_signed() -> None:
    [s] = inline_instances(
        HOST + "tls self_signed mx.example.org 127.0.0.1\nsmtp tcp://127.0.0.1:25 {\n deliver_to dummy\n}",
        "tls.loader.self_signed",
    )
    assert s.settings["names"] == ["mx.example.org", "127.0.0.1"]
    assert settings_of("tls.loader.self_signed s { }", "s")["names"] == []
    assert errors_of("tls.loader.self_signed s {\n names a\n}") == ["maddy.conf:2: unexpected directive: names"]


ACME = "tls.loader.acme a {\n challenge dns-01\n dns cloudflare {\n  api_token T\n }\n"


def test_acme_defaults() -> None:
    s = settings_of(HOST + ACME + "}", "a")
    assert s["hostname"] == "mx.example.org"
    assert s["store_path"] == "/var/lib/maddy/acme"
    assert s["ca"] == "https://acme-v02.api.letsencrypt.org/directory"
    assert s["test_ca"] == "https://acme-staging-v02.api.letsencrypt.org/directory"
    assert s["agreed"] is False
    assert s["email"] == ""
    assert s["challenge"] == "dns-01"
    assert s["extra_names"] is None
    dns = s["dns"]
    assert dns.name == "libdns.cloudflare" and dns.settings["api_token"] == "T"


def test_acme_errors() -> None:
    assert errors_of(HOST + "tls.loader.acme a { }") == ["maddy.conf:2: missing required directive: challenge"]
    assert errors_of(HOST + "tls.loader.acme a {\n challenge dns-01\n}") == [
        "maddy.conf:2: tls.loader.acme: dns-01 challenge requires a configured DNS provider"
    ]
    assert errors_of(HOST + "tls.loader.acme a {\n challenge http-01\n}") == [
        "maddy.conf:3: invalid argument, valid values are: [dns-01]"
    ]
    assert errors_of(ACME + "}") == ["maddy.conf:1: missing required directive: hostname"]


def test_acme_no_inline_args() -> None:
    errs = errors_of(HOST + "tls acme x {\n}\n")
    assert errs[0] == "maddy.conf:2: tls.loader.acme: no inline args expected"


@pytest.mark.parametrize(
    ("provider", "body", "message"),
    [
        ("gandi", "", "libdns.gandi: either api_token or personal_token should be specified"),
        ("gcore", "", "libdns.gcore: api_key should be specified"),
        ("namecheap", "api_key k", "missing required directive: api_username"),
        ("rfc2136", "key_name n\n key k\n key_alg hmac-sha256", "missing required directive: server"),
        ("cloudflare", "api_key k", "unexpected directive: api_key"),
    ],
)
def test_dns_provider_errors(provider: str, body: str, message: str) -> None:
    errs = errors_of(HOST + f"tls.loader.acme a {{\n challenge dns-01\n dns {provider} {{\n {body}\n }}\n}}")
    assert len(errs) == 1 and errs[0].startswith("maddy.conf:") and errs[0].endswith(message), errs


def test_dns_provider_forms() -> None:
    s = settings_of(
        HOST + "tls.loader.acme a {\n challenge dns-01\n dns gandi ignored {\n  personal_token P\n }\n}", "a"
    )
    assert s["dns"].settings["personal_token"] == "P"
    assert s["dns"].settings["api_token"] == ""
    text = "libdns.route53 r53 {\n access_key_id A\n}\n" + HOST + "tls.loader.acme a {\n challenge dns-01\n dns &r53\n}"
    assert settings_of(text, "a")["dns"].settings["access_key_id"] == "A"


# -- fixtures -----------------------------------------------------------------------------------------

LOCATED = re.compile(r"^.+\.conf:\d+: .+")


def fixture_errors(name: str) -> list[str]:
    path = FIXTURES / "docs-examples" / name
    res = compile_file(str(path), {})
    return [str(e).replace(str(path), name) for e in res.errors if not any(n in str(e) for n in STANDALONE_NOISE)]


def test_fixture_storage_imapsql_is_complete() -> None:
    for name in ("reference__storage__imapsql__1.conf", "reference__modules__4.conf", "reference__blob__s3__1.conf"):
        assert fixture_errors(name) == [], name


def test_fixture_blob_fs_template_is_taken_literally() -> None:
    # `root <directory>` is just a string to maddy (it would create that directory).
    assert fixture_errors("reference__blob__fs__1.conf") == []


def test_fixture_remote_minimal() -> None:
    assert fixture_errors("reference__targets__remote__1.conf") == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("reference__blob__s3__2.conf", "reference__blob__s3__2.conf:2: unexpected directive: ..."),
        (
            "reference__storage__imap-filters__1.conf",
            "reference__storage__imap-filters__1.conf:2: unexpected directive: ...",
        ),
        (
            "reference__targets__queue__1.conf",
            "reference__targets__queue__1.conf:2: missing required directive: hostname",
        ),
        ("reference__targets__smtp__2.conf", "reference__targets__smtp__2.conf:4: unexpected directive: ..."),
        (
            "reference__targets__remote__8.conf",
            "reference__targets__remote__8.conf:1: unknown module or global directive: local_policy",
        ),
        (
            "reference__targets__smtp__1.conf",
            "reference__targets__smtp__1.conf:1: unknown module or global directive: deliver_to",
        ),
        (
            "reference__tls-acme__1.conf",
            "reference__tls-acme__1.conf:1: tls.loader.acme: dns-01 challenge requires a configured DNS provider",
        ),
        (
            "reference__tls-acme__2.conf",
            "reference__tls-acme__2.conf:2: tls.loader.acme: dns-01 challenge requires a configured DNS provider",
        ),
        (
            "reference__tls-acme__3.conf",
            "reference__tls-acme__3.conf:5: unknown module: PROVIDER_NAME (namespace: libdns)",
        ),
        ("reference__tls-acme__4.conf", "reference__tls-acme__4.conf:10: unknown module: ... (namespace: libdns)"),
        (
            "reference__tls__1.conf",
            "reference__tls__1.conf:1: tls.loader.file: only absolute paths allowed in certificate paths: sorry :(",
        ),
        ("reference__tls__2.conf", "reference__tls__2.conf:3: unknown cipher: ..."),
        (
            "reference__config-syntax__11.conf",
            "reference__config-syntax__11.conf:2: unknown module: long_path_to_certificate (namespace: tls.loader)",
        ),
        (
            "reference__modules__1.conf",
            "reference__modules__1.conf:10: queue: need explicit location directive or inline argument"
            " if defined inline",
        ),
        ("third-party__dovecot__2.conf", "third-party__dovecot__2.conf:1: missing required directive: hostname"),
    ],
)
def test_fixture_templates_and_fragments_fail_located(name: str, expected: str) -> None:
    errs = fixture_errors(name)
    assert expected in errs, errs
    assert all(LOCATED.match(e) for e in errs), errs


def test_fixture_dovecot_lmtp_target_with_hostname() -> None:
    text = HOST + (FIXTURES / "docs-examples" / "third-party__dovecot__2.conf").read_text()
    s = settings_of(text, "local_mailboxes")
    assert s["targets"][0].path == "/var/run/dovecot/lmtp-maddy"
    assert s["starttls"] is False


def test_fixture_smtp_target_all_directives_once_placeholder_removed() -> None:
    text = (FIXTURES / "docs-examples" / "reference__targets__smtp__2.conf").read_text()
    text = HOST + text.replace("tls_client {\n        ...\n    }", "tls_client {\n    }")
    s = settings_of(text, "target.smtp")
    assert s["submission_timeout"] == 720.0
    assert s["starttls"] is True


ENV: dict[str, Any] = {"TEST_PWD": "/tmp", "TEST_STATE_DIR": "/tmp/st", "TEST_RUNTIME_DIR": "/tmp/rt"}


@pytest.mark.parametrize(
    "name",
    [
        "TestIssue321.conf",
        "TestIssue327.conf",
        "TestLMTPClient_Is_Actually_LMTP.conf",
        "TestLMTPClient_Issue308.conf",
        "TestImapsqlDelivery.conf",
        "TestImapStorageSwitch.conf",
        "TestMTA_Outbound.conf",
        "TestConfigCycle.conf",
    ],
)
def test_integration_configs_have_no_errors_from_these_modules(name: str) -> None:
    path = FIXTURES / "tests-integration" / name
    text = path.read_text()
    env = dict(ENV)
    for i, var in enumerate(sorted(set(re.findall(r"\{env:(TEST_PORT_\w+)\}", text)))):
        env[var] = str(20000 + i)
    res = compile_file(str(path), env)
    mine = ("target.", "queue", "remote", "imapsql", "lmtp", "mx_auth", "tls", "storage.blob", "location")
    errs = [str(e) for e in res.errors if any(m in str(e) for m in mine)]
    assert errs == []


def test_default_config_has_no_errors_from_these_modules() -> None:
    res = compile_file(str(FIXTURES / "default" / "maddy.conf"), dict(os.environ))
    assert res.graph is not None
    names = {i.name for i in res.graph.instances}
    assert {"target.remote", "target.queue", "storage.imapsql", "tls.loader.file", "storage.blob.fs"} <= names
    assert {"mx_auth.mtasts", "mx_auth.local_policy"} <= names
    mine = [i for i in res.graph.instances if i.name.startswith(("target.", "storage.", "tls.", "mx_auth."))]
    lines = {i.node.line for i in mine}
    assert not [str(e) for e in res.errors if e.line in lines]
    queue = next(i for i in mine if i.name == "target.queue")
    assert queue.settings["location"] == "/var/lib/maddy/remote_queue"
    assert queue.settings["bounce"] is not None


def test_acme_in_global_tls_sees_no_globals() -> None:
    # maddy reads the global `tls` with an empty globals map, before state_dir is applied.
    body = " loader acme {\n  challenge dns-01\n  dns cloudflare\n"
    tail = " }\n}\nsmtp tcp://127.0.0.1:25 {\n deliver_to dummy\n}\n"
    errs = errors_of(HOST + "tls {\n" + body + tail)
    assert errs == ["maddy.conf:3: missing required directive: hostname"]
    [a] = inline_instances(HOST + "tls {\n" + body + "  hostname mx.example.org\n" + tail, "tls.loader.acme")
    assert a.settings["store_path"] == "acme"  # relative to state_dir after the chdir
