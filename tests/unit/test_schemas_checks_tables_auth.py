"""Schemas of checks, modifiers, tables and auth providers (spec §B.4-§B.7).

Defaults, inline forms and error messages follow maddy 0.9.4's Configure() code,
not its docs (spec §L.10).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest

from pymaddy.auth.schema import LDAPBind
from pymaddy.checks.schema import (
    IGNORE,
    QUARANTINE,
    REJECT,
    CheckAction,
    DNSBLList,
    SMTPReply,
    parse_check_action,
    parse_reject_reply,
)
from pymaddy.compiler import compile_file
from pymaddy.compiler.graph import ModuleInstance
from pymaddy.compiler.registry import registry
from pymaddy.config.values import Endpoint
from pymaddy.modify.schema import OVERSIGN_DEFAULT, SIGN_DEFAULT
from pymaddy.tables.schema import ChainStep, go_atoi, valid_domain
from tests.confhelp import STANDALONE_NOISE, compile_text, errors_of
from tests.confhelp import settings_of as _settings_of

FIXTURES = Path("/work/shared/fixtures/maddy-upstream")
DOCS = FIXTURES / "docs-examples"


def settings_of(text: str, instance: str) -> dict[str, Any]:
    return _settings_of(text, instance)


def members(text: str, group: str) -> list[ModuleInstance]:
    """The inline modules of a top-level `checks`/`modifiers` group that must compile."""
    out: list[ModuleInstance] = settings_of(text, group)["members"]
    return out


def member(line: str, group: str = "checks") -> dict[str, Any]:
    """Settings of one module written inline inside a group block."""
    (inst,) = members(f"{group} g {{\n{line}\n}}\n", "g")
    return dict(inst.settings)


def step_settings(line: str) -> dict[str, Any]:
    """Settings of one table written inline as a table.chain step."""
    steps: list[ChainStep] = settings_of(f"table.chain c {{\n{line}\n}}\n", "c")["steps"]
    assert len(steps) == 1 and steps[0].table is not None
    return dict(steps[0].table.settings)


def inline_errors(line: str, group: str = "checks") -> list[str]:
    return errors_of(f"{group} g {{\n{line}\n}}\n")


# -- registry ---------------------------------------------------------------------------


LAYER_ROLES = {
    "check.spf": {"check"},
    "check.dkim": {"check"},
    "check.dnsbl": {"check"},
    "check.milter": {"check"},
    "check.rspamd": {"check"},
    "check.command": {"check"},
    "check.authorize_sender": {"check"},
    "require_mx_record": {"check"},
    "require_matching_rdns": {"check"},
    "require_tls": {"check"},
    "modify.dkim": {"modifier"},
    "modify.replace_rcpt": {"modifier"},
    "modify.replace_sender": {"modifier"},
    "table.static": {"table"},
    "table.file": {"table"},
    "table.regexp": {"table"},
    "table.chain": {"table"},
    "table.identity": {"table"},
    "table.email_localpart": {"table"},
    "table.email_localpart_optional": {"table"},
    "table.email_with_domain": {"table"},
    "table.sql_query": {"table", "mutable_table"},
    "table.sql_table": {"table", "mutable_table"},
    "auth.pass_table": {"auth", "table", "mutable_table"},
    "auth.ldap": {"auth", "table"},
    "table.ldap": {"auth", "table"},
    "auth.external": {"auth"},
    "auth.pam": {"auth"},
    "auth.shadow": {"auth"},
    "auth.plain_separate": {"auth", "table"},
    "auth.netauth": {"auth", "table"},
    "table.netauth": {"auth", "table"},
    "dovecot_sasl": {"auth"},
}


def test_every_module_of_these_layers_is_registered_with_its_roles() -> None:
    reg = registry()
    for name, expected in LAYER_ROLES.items():
        assert name in reg, name
        assert set(reg[name].roles) == expected, name
        assert reg[name].doc


def test_names_that_do_not_exist_in_maddy_are_not_registered() -> None:
    reg = registry()
    for name in ("auth.dovecot_sasl", "check.require_tls", "table.pass_table", "require_matching_ehlo"):
        assert name not in reg


def test_reports_module_name_quirk() -> None:
    reg = registry()
    quirky = {
        "table.static",
        "table.regexp",
        "table.identity",
        "table.email_localpart",
        "table.email_localpart_optional",
        "table.email_with_domain",
    }
    for name in LAYER_ROLES:
        assert reg[name].reports_module_name == (name in quirky), name
    # A named top-level block of such a module registers under the module name.
    res = compile_text("table.static mytable {\n    entry a b\n}\n")
    assert res.graph is not None
    assert "table.static" in res.graph.blocks and "mytable" not in res.graph.blocks


def test_schema_files_are_import_cheap() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import pymaddy.checks.schema, pymaddy.modify.schema, pymaddy.tables.schema, pymaddy.auth.schema\n"
        "import pymaddy.endpoints.schema, pymaddy.targets.schema, pymaddy.pipeline.schema, pymaddy.storage.schema\n"
        "import pymaddy.compiler.globals\n"
        "heavy = [m for m in ('cryptography', 'dns', 'aiosmtplib', 'sqlite3', 'ldap3', 'asyncio')\n"
        "         if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# -- check actions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["ignore"], IGNORE),
        (["ignore", "whatever", "else"], IGNORE),  # extra words are ignored, as in maddy
        (["quarantine"], QUARANTINE),
        (["reject"], REJECT),
        (["reject", "550"], CheckAction("reject", SMTPReply(550, (5, 7, 0), "Message rejected due to a local policy"))),
        (["reject", "450"], CheckAction("reject", SMTPReply(450, (4, 7, 0), "Message rejected due to a local policy"))),
        (
            ["quarantine", "451", "4.7.1"],
            CheckAction("quarantine", SMTPReply(451, (4, 7, 1), "Message rejected due to a local policy")),
        ),
        (["reject", "550", "5.7.23", "No SPF"], CheckAction("reject", SMTPReply(550, (5, 7, 23), "No SPF"))),
    ],
)
def test_parse_check_action(args: list[str], expected: CheckAction) -> None:
    assert parse_check_action(args) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "expected at least 1 argument"),
        (["drop"], "invalid action"),
        (["reject", "200"], "error code should start with either 4 or 5"),
        (["reject", "abc"], 'invalid error code integer: strconv.Atoi: parsing "abc": invalid syntax'),
        (["reject", "550", "2.0.0"], "enhanced code should use either 4 or 5 as a first number"),
        (["reject", "550", "5.7"], "wrong amount of enhanced code parts"),
        (["reject", "550", "5.x.0"], 'strconv.Atoi: parsing "x": invalid syntax'),
        (["reject", "550", "5.7.0", ""], "message can't be empty"),
        (["reject", "550", "5.7.0", "a", "b"], "invalid count of arguments"),
    ],
)
def test_parse_check_action_errors(args: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_check_action(args)


def test_parse_reject_reply_defaults() -> None:
    assert parse_reject_reply([]) == SMTPReply(554, (5, 7, 0), "Message rejected due to a local policy")
    assert parse_reject_reply(["410"]) == SMTPReply(410, (4, 7, 0), "Message rejected due to a local policy")
    assert str(parse_reject_reply(["550", "5.1.1", "User doesn't exist"])) == "550 5.1.1 User doesn't exist"


def test_go_atoi_and_valid_domain() -> None:
    assert go_atoi("+12") == 12
    assert go_atoi("-3") == -3
    for bad in ("", "+", "1.0", "\uff11\uff12", "0x10"):
        with pytest.raises(ValueError, match="invalid syntax"):
            go_atoi(bad)
    assert valid_domain("example.org")
    assert valid_domain("пример.рф")
    assert not valid_domain("")
    assert not valid_domain(".example.org")
    assert not valid_domain("a..b")
    assert not valid_domain("a" * 65 + ".org")


# -- check.spf --------------------------------------------------------------------------------


def test_spf_code_defaults() -> None:
    s = settings_of("check.spf s {\n}\n", "s")
    assert s["debug"] is False
    assert s["enforce_early"] is False
    assert s["fail_action"] == QUARANTINE
    assert s["permerr_action"] == IGNORE  # docs: reject
    assert s["temperr_action"] == IGNORE  # docs: reject
    for name in ("none_action", "neutral_action", "softfail_action"):
        assert s[name] == IGNORE


def test_spf_actions_and_debug_inheritance() -> None:
    s = settings_of(
        "debug yes\ncheck.spf s {\n    fail_action reject 550\n    temperr_action reject 451 4.7.23\n}\n", "s"
    )
    assert s["debug"] is True
    assert s["fail_action"] == CheckAction(
        "reject", SMTPReply(550, (5, 7, 0), "Message rejected due to a local policy")
    )
    assert s["temperr_action"].override == SMTPReply(451, (4, 7, 23), "Message rejected due to a local policy")
    assert settings_of("debug yes\ncheck.spf s {\n    debug no\n}\n", "s")["debug"] is False


def test_bad_action_values_are_located() -> None:
    text = (
        "check.spf s {\n    fail_action reject 200\n    softfail_action maybe\n"
        "    none_action reject 550 {\n        x\n    }\n    neutral_action ignore { }\n}\n"
    )
    assert errors_of(text) == [
        "maddy.conf:2: error code should start with either 4 or 5",
        "maddy.conf:3: invalid action",
        "maddy.conf:4: can't declare block here",
    ]


def test_spf_inline_arguments_are_ignored() -> None:
    s = member("spf whatever {\n    enforce_early\n}")
    assert s["enforce_early"] is True


# -- check.dkim ---------------------------------------------------------------------------------


def test_check_dkim_defaults_and_docs_only_directive() -> None:
    s = settings_of("check.dkim d {\n}\n", "d")
    assert s["required_fields"] == ["From", "Subject"]
    assert s["fail_open"] is False
    assert s["no_sig_action"] == IGNORE
    assert s["broken_sig_action"] == IGNORE
    assert errors_of("check.dkim d {\n    allow_body_subset no\n}\n") == [
        "maddy.conf:2: unexpected directive: allow_body_subset"
    ]


def test_check_dkim_rejects_inline_arguments() -> None:
    assert inline_errors("dkim example.org") == ["maddy.conf:2: check.dkim: inline arguments are not used"]


# -- check.dnsbl -------------------------------------------------------------------------------


def test_dnsbl_list_blocks() -> None:
    s = settings_of(
        "check.dnsbl b {\n"
        "    reject_threshold 5\n"
        "    zen.example.org other.example.org {\n"
        "        client_ipv6 no\n"
        "        score 3\n"
        "        responses 127.0.0.2 127.0.1.0/24\n"
        "    }\n"
        "    plain.example.org\n"
        "}\n",
        "b",
    )
    assert s["debug"] is False and s["check_early"] is False
    assert s["quarantine_threshold"] == 1 and s["reject_threshold"] == 5
    zen, other, plain = s["lists"]
    assert zen.zone == "zen.example.org" and other.zone == "other.example.org"
    assert zen.client_ipv4 and not zen.client_ipv6 and zen.score == 3
    assert zen.responses == (ipaddress.ip_network("127.0.0.2/32"), ipaddress.ip_network("127.0.1.0/24"))
    # A list without a block gets the list defaults (both IP families, score 1, 127.0.0.1/24).
    assert plain == DNSBLList("plain.example.org", True, True, False, False, 1, (ipaddress.ip_network("127.0.0.0/24"),))


def test_dnsbl_debug_is_not_inherited() -> None:
    assert settings_of("debug yes\ncheck.dnsbl b {\n}\n", "b")["debug"] is False


def test_dnsbl_inline_zones_are_shortcuts_with_score_zero() -> None:
    s = member("dnsbl a.example.org b.example.org {\n    c.example.org\n}")
    a, b, c = s["lists"]
    assert a == DNSBLList("a.example.org", client_ipv4=True, client_ipv6=False, score=0, shortcut=True)
    assert b.zone == "b.example.org" and b.shortcut
    assert c.zone == "c.example.org" and c.score == 1 and not c.shortcut


def test_dnsbl_response_rules() -> None:
    (lst,) = settings_of(
        "check.dnsbl b {\n"
        "    zen.example.org {\n"
        "        response 127.0.0.2 127.0.0.3/31 ::1 {\n"
        "            score 10\n"
        '            message "listed"\n'
        "        }\n"
        "        response 127.0.0.10 {\n"
        "            score 5\n"
        "        }\n"
        "    }\n"
        "}\n",
        "b",
    )["lists"]
    r1, r2 = lst.rules
    assert r1.networks == (
        ipaddress.ip_network("127.0.0.2/32"),
        ipaddress.ip_network("127.0.0.2/31"),
        ipaddress.ip_network("::1/128"),
    )
    assert (r1.score, r1.message) == (10, "listed")
    assert (r2.score, r2.message) == (5, "")


def test_dnsbl_errors_are_all_collected() -> None:
    text = (
        "check.dnsbl b {\n"
        "    quarantine_threshold x\n"
        "    one.example.org {\n"
        "        response {\n"
        "            score 1\n"
        "        }\n"
        "        response 127.0.0.300 {\n"
        "            score 1\n"
        "        }\n"
        "        response 127.0.0.2 {\n"
        '            message "no score"\n'
        "        }\n"
        "        responses 10.0.0.0/99\n"
        "        bogus yes\n"
        "    }\n"
        "    two.example.org {\n"
        "        score -1\n"
        "        ehlo\n"
        "    }\n"
        "}\n"
    )
    assert errors_of(text) == [
        "maddy.conf:2: invalid integer: x",
        "maddy.conf:4: response block requires at least one IP address or CIDR as argument",
        "maddy.conf:7: invalid IP address or CIDR: 127.0.0.300: invalid CIDR address: 127.0.0.300/32",
        "maddy.conf:10: missing required directive: score",
        "maddy.conf:13: invalid CIDR address: 10.0.0.0/99",
        "maddy.conf:14: unexpected directive: bogus",
        "maddy.conf:16: dnsbl: 'ehlo' should not be used with negative score",
    ]


def test_dnsbl_negative_score_whitelist_is_fine_without_domain_lookups() -> None:
    (lst,) = settings_of("check.dnsbl b {\n    white.example.org {\n        score -5\n    }\n}\n", "b")["lists"]
    assert lst.score == -5
    assert errors_of("check.dnsbl b {\n    w.example.org {\n        score -1\n        mailfrom\n    }\n}\n") == [
        "maddy.conf:2: dnsbl: 'mailfrom' should not be used with negative score"
    ]


# -- check.milter / check.rspamd / check.command ---------------------------------------------------


def test_milter() -> None:
    s = settings_of("check.milter m {\n    endpoint tcp://127.0.0.1:7357\n}\n", "m")
    assert s["endpoint"] == Endpoint("tcp://127.0.0.1:7357", "tcp", "127.0.0.1", "7357")
    assert s["fail_open"] is False
    inline = member("milter unix:///run/milter.sock")
    assert inline["endpoint"].scheme == "unix" and inline["endpoint"].path == "/run/milter.sock"
    # The block's directive wins over the inline argument.
    both = member("milter tcp://127.0.0.1:1 {\n    endpoint tcp://127.0.0.1:2\n}")
    assert both["endpoint"].port == "2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("check.milter m {\n}\n", "maddy.conf:1: check.milter: milter endpoint is not set"),
        (
            "check.milter m {\n    endpoint tls://127.0.0.1:1\n}\n",
            "maddy.conf:1: check.milter: scheme unsupported: tls",
        ),
        ("check.milter m {\n    endpoint tcp://127.0.0.1\n}\n", "maddy.conf:1: check.milter: port is required"),
        (
            "checks g {\n    milter tcp://a:1 tcp://b:2\n}\n",
            "maddy.conf:2: check.milter: unexpected amount of arguments, want 1 or 0",
        ),
    ],
)
def test_milter_errors(text: str, message: str) -> None:
    assert errors_of(text) == [message]


def test_rspamd_defaults_inline_and_inheritance() -> None:
    s = settings_of("check.rspamd r {\n}\n", "r")
    assert s["api_path"] == "http://127.0.0.1:11333"
    assert s["tag"] == "maddy" and s["settings_id"] == "" and s["hostname"] == ""
    assert s["flags"] == ["pass_all"]
    assert s["io_error_action"] == IGNORE and s["error_resp_action"] == IGNORE
    assert s["add_header_action"] == QUARANTINE and s["rewrite_subj_action"] == QUARANTINE
    assert s["reject_action"] == REJECT and s["soft_reject_action"] == REJECT
    assert s["tls_client"] is None
    assert "debug" not in s  # check.rspamd has no debug directive
    inherited = settings_of(
        "hostname mx.example.org\ntls_client {\n    protocols tls1.2\n}\ncheck.rspamd r {\n}\n", "r"
    )
    assert inherited["hostname"] == "mx.example.org"
    assert inherited["tls_client"]["protocols"] == ("tls1.2", "tls1.2")
    assert member("rspamd http://spam:11333")["api_path"] == "http://spam:11333"
    assert member("rspamd http://a:1 {\n    api_path http://b:2\n}")["api_path"] == "http://b:2"
    assert inline_errors("rspamd http://a:1 http://b:2") == [
        "maddy.conf:2: check.rspamd: unexpected amount of inline arguments"
    ]
    assert errors_of("check.rspamd r {\n    debug yes\n}\n") == ["maddy.conf:2: unexpected directive: debug"]


def test_command() -> None:
    s = member(
        "command /usr/bin/check {sender} {rcpts} {\n    run_on sender\n"
        "    code 12 reject 550 5.7.1 no\n    code 1 ignore\n}"
    )
    assert s["command"] == "/usr/bin/check" and s["args"] == ["{sender}", "{rcpts}"]
    assert s["run_on"] == "sender"
    assert s["actions"] == {
        1: IGNORE,
        2: QUARANTINE,
        12: CheckAction("reject", SMTPReply(550, (5, 7, 1), "no")),
    }
    assert member("command /bin/true")["run_on"] == "body"


def test_command_errors() -> None:
    assert errors_of("check.command c {\n}\n") == [
        "maddy.conf:1: command: at least one argument is required (command name)"
    ]
    assert inline_errors(
        "command /bin/x {\n    code 1\n    code x reject\n    code 3 drop\n    run_on data\n    command y\n}"
    ) == [
        "maddy.conf:3: at least two arguments are required: <code> <action>",
        'maddy.conf:4: strconv.Atoi: parsing "x": invalid syntax',
        "maddy.conf:5: invalid action",
        "maddy.conf:6: invalid argument, valid values are: [conn sender rcpt body]",
        "maddy.conf:7: unexpected directive: command",
    ]


# -- check.authorize_sender and the stateless checks --------------------------------------------


def test_authorize_sender() -> None:
    s = settings_of("check.authorize_sender a {\n}\n", "a")
    assert s["check_header"] is True
    assert s["prepare_email"] is None and s["user_to_email"] is None  # identity
    assert s["unauth_action"] == REJECT and s["no_match_action"] == REJECT and s["err_action"] == REJECT
    assert s["auth_normalize"] == "auto" and s["from_normalize"] == "auto"
    s = settings_of(
        "auth_map_normalize noop\ncheck.authorize_sender a {\n"
        "    user_to_email email_with_domain example.org example.com\n"
        "    prepare_email static {\n        entry a@example.org b@example.org\n    }\n"
        "    from_normalize precis\n"
        "}\n",
        "a",
    )
    # Nothing global is named auth_normalize, so the global auth_map_normalize does not leak in.
    assert s["auth_normalize"] == "auto"
    assert s["from_normalize"] == "precis"
    assert s["user_to_email"].settings["domains"] == ["example.org", "example.com"]
    assert s["prepare_email"].settings["entries"] == {"a@example.org": ["b@example.org"]}
    assert errors_of("check.authorize_sender a {\n    malformed_action reject\n}\n") == [
        "maddy.conf:2: unexpected directive: malformed_action"
    ]
    assert inline_errors("authorize_sender x") == [
        "maddy.conf:2: check.authorize_sender: inline arguments are not used"
    ]


@pytest.mark.parametrize(
    ("name", "default"),
    [("require_mx_record", QUARANTINE), ("require_matching_rdns", QUARANTINE), ("require_tls", REJECT)],
)
def test_stateless_checks(name: str, default: CheckAction) -> None:
    s = settings_of(f"{name} c {{\n}}\n", "c")
    assert s["fail_action"] == default and s["debug"] is False
    assert settings_of(f"debug yes\n{name} c {{\n}}\n", "c")["debug"] is True
    assert member(f"{name} {{\n    fail_action ignore\n}}")["fail_action"] == IGNORE
    assert inline_errors(f"{name} x") == [f"maddy.conf:2: {name}: inline arguments are not used"]


# -- modify.dkim ------------------------------------------------------------------------------------


def test_modify_dkim_defaults() -> None:
    s = settings_of("modify.dkim d {\n    domains example.org\n    selector default\n}\n", "d")
    assert s["domains"] == ["example.org"] and s["selector"] == "default"
    assert s["key_path"] == "dkim_keys/{domain}_{selector}.key"
    assert s["newkey_algo"] == "rsa2048"
    assert s["sig_expiry"] == 120 * 3600
    assert s["header_canon"] == "relaxed" and s["body_canon"] == "relaxed"
    assert s["hash"] == "sha256"
    assert s["oversign_fields"] == list(OVERSIGN_DEFAULT) and "Sender" in OVERSIGN_DEFAULT
    assert s["sign_fields"] == list(SIGN_DEFAULT)
    assert s["allow_multiple_from"] is False and s["sign_subdomains"] is False
    assert s["debug"] is False


def test_modify_dkim_inline_form() -> None:
    s = member("dkim example.org example.com default", "modifiers")
    assert s["domains"] == ["example.org", "example.com"] and s["selector"] == "default"
    s = member("dkim example.org default {\n    selector other\n    sig_expiry 0\n}", "modifiers")
    assert s["domains"] == ["example.org"] and s["selector"] == "other" and s["sig_expiry"] == 0
    assert inline_errors("dkim example.org", "modifiers") == [
        "maddy.conf:2: modify.dkim: at least two arguments required"
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("    selector s\n", "maddy.conf:1: sign_domain: at least one domain is needed"),
        ("    domains a.org\n", "maddy.conf:1: sign_domain: selector is not specified"),
        (
            "    domains a.org b.org\n    selector s\n    sign_subdomains\n",
            "maddy.conf:1: sign_domain: only one domain is supported when sign_subdomains is enabled",
        ),
        (
            "    domains a.org\n    selector s\n    require_sender_match envelope\n",
            "maddy.conf:4: unexpected directive: require_sender_match",
        ),
        (
            "    domains a.org\n    selector s\n    sig_expiry 5d\n",
            'maddy.conf:4: time: unknown unit "d" in duration "5d"',
        ),
        (
            "    domains a.org\n    selector s\n    newkey_algo rsa1024\n",
            "maddy.conf:4: invalid argument, valid values are: [rsa4096 rsa2048 ed25519]",
        ),
    ],
)
def test_modify_dkim_errors(body: str, message: str) -> None:
    errs = errors_of("modify.dkim d {\n" + body + "}\n")
    if "time:" in message:
        assert len(errs) == 1 and errs[0].startswith("maddy.conf:4: time:")
    else:
        assert errs == [message]


def test_modify_dkim_debug_inherited() -> None:
    assert settings_of("debug yes\nmodify.dkim d {\n    domains a.org\n    selector s\n}\n", "d")["debug"] is True


# -- modify.replace_rcpt / replace_sender -----------------------------------------------------------


@pytest.mark.parametrize("name", ["replace_rcpt", "replace_sender", "modify.replace_rcpt"])
def test_replace_addr_inline_table_owns_the_block(name: str) -> None:
    s = member(f"{name} static {{\n    entry a@example.org b@example.org c@example.org\n}}", "modifiers")
    table = s["table"]
    assert table.name == "table.static"
    assert table.settings["entries"] == {"a@example.org": ["b@example.org", "c@example.org"]}
    s = member(f'{name} regexp "(.+)@example.net" "$1@example.org"', "modifiers")
    assert s["table"].settings["regexp"] == "(.+)@example.net"


def test_replace_addr_needs_a_table() -> None:
    assert errors_of("modify.replace_rcpt r {\n    table static\n}\n") == [
        "maddy.conf:1: at least one argument is required"
    ]
    assert inline_errors("replace_sender", "modifiers") == ["maddy.conf:2: at least one argument is required"]
    assert inline_errors("replace_rcpt {\n    entry a b\n}", "modifiers") == [
        "maddy.conf:2: at least one argument is required"
    ]
    assert inline_errors("replace_rcpt nosuch", "modifiers") == [
        "maddy.conf:2: unknown module: nosuch (namespace: table)"
    ]
    assert inline_errors("replace_rcpt require_tls", "modifiers") == [
        "maddy.conf:2: module require_tls () doesn't implement table interface"
    ]


# -- tables -----------------------------------------------------------------------------------------


def test_static() -> None:
    s = settings_of("table.static {\n    entry a b\n    entry a c d\n    entry e f\n}\n", "table.static")
    assert s["entries"] == {"a": ["c", "d"], "e": ["f"]}
    assert errors_of("table.static {\n    entry a\n}\n") == ["maddy.conf:2: expected at least one value"]
    assert step_settings("step static")["entries"] == {}


def test_file() -> None:
    assert step_settings("step file /etc/aliases")["file"] == "/etc/aliases"
    assert settings_of("table.file f {\n    file /etc/aliases\n}\n", "f")["file"] == "/etc/aliases"
    assert settings_of("table.file f {\n}\n", "f")["file"] == ""  # empty table, not an error
    assert settings_of("debug on\ntable.file f {\n}\n", "f")["debug"] is True
    assert errors_of("table.chain c {\n    step file /a {\n        file /b\n    }\n}\n") == [
        "maddy.conf:2: table.file: file path specified both in directive and in argument, do it once"
    ]
    assert errors_of("table.chain c {\n    step file /a /b\n}\n") == [
        "maddy.conf:2: table.file: cannot use multiple files with "
        "single table.file, use table.file multiple times to do so"
    ]


def test_regexp() -> None:
    s = step_settings('step regexp "(.+)@example.org" "$1" "$1@other"')
    assert s["regexp"] == "(.+)@example.org"
    assert s["replacements"] == ["$1", "$1@other"]
    assert s["pattern"] == "(?i)^(.+)@example.org$"
    assert s["expand_replaceholders"] is True
    s = step_settings('step regexp "^a.*" {\n        full_match no\n        case_insensitive no\n    }')
    assert s["pattern"] == "^a.*" and s["replacements"] == []
    errs = errors_of('table.chain c {\n    step regexp "x" {\n        expand_placeholders yes\n    }\n}\n')
    assert errs == ["maddy.conf:3: unexpected directive: expand_placeholders"]
    assert errors_of("table.regexp {\n}\n") == [
        "maddy.conf:1: table.regexp: a regular expression is required as the first inline argument"
    ]


def test_chain() -> None:
    steps = settings_of(
        "table.chain c {\n    optional_step file /etc/aliases\n"
        '    step regexp "(.+)@(.+)" "$1"\n    step identity\n}\n',
        "c",
    )["steps"]
    assert [(st.table.name if st.table else None, st.optional) for st in steps] == [
        ("table.file", True),
        ("table.regexp", False),
        ("table.identity", False),
    ]
    assert settings_of("table.chain c {\n}\n", "c")["steps"] == []
    assert errors_of("table.chain c {\n    stepp identity\n    step\n    step nosuch\n}\n") == [
        "maddy.conf:2: unexpected directive: stepp",
        "maddy.conf:3: at least one argument is required",
        "maddy.conf:4: unknown module: nosuch (namespace: table)",
    ]


def test_tables_that_ignore_their_configuration() -> None:
    for name in ("identity", "email_localpart", "email_localpart_optional"):
        assert step_settings(f"step {name} anything at all {{\n        whatever 1\n    }}") == {}
        assert errors_of(f"table.{name} {{\n    whatever\n}}\n") == []


def test_email_with_domain() -> None:
    s = step_settings("step email_with_domain example.org пример.рф {\n        ignored directive\n    }")
    assert s["domains"] == ["example.org", "пример.рф"]
    assert errors_of("table.email_with_domain {\n    domains example.org\n}\n") == [
        "maddy.conf:1: table.email_with_domain: at least one domain is required"
    ]
    assert errors_of("table.chain c {\n    step email_with_domain a..b\n}\n") == [
        "maddy.conf:2: table.email_with_domain: invalid domain: a..b"
    ]


def test_sql_query() -> None:
    s = settings_of(
        'table.sql_query q {\n    driver sqlite3\n    dsn file:x.db "mode=rw"\n'
        '    lookup "SELECT v FROM t WHERE k = $1"\n}\n',
        "q",
    )
    assert s["dsn"] == "file:x.db mode=rw"
    assert s["named_args"] is False  # docs: yes
    assert s["init"] == [] and s["add"] == "" and s["list"] == "" and s["set"] == "" and s["del"] == ""
    assert errors_of("table.sql_query q {\n}\n") == [
        "maddy.conf:1: missing required directive: driver",
        "maddy.conf:1: missing required directive: dsn",
        "maddy.conf:1: missing required directive: lookup",
    ]
    assert errors_of("table.sql_query q {\n    driver postgres\n    dsn x\n    lookup y\n    named_args\n}\n") == [
        "maddy.conf:1: PostgreSQL driver does not support named_args"
    ]
    assert errors_of("table.sql_query q {\n    driver oracle\n    dsn x\n    lookup y\n}\n") == [
        'maddy.conf:1: failed to open db: sql: unknown driver "oracle" (forgotten import?)'
    ]


def test_sql_table_generates_queries() -> None:
    s = settings_of("table.sql_table t {\n    driver sqlite3\n    dsn a.db\n    table_name aliases\n}\n", "t")
    assert s["key_column"] == "key" and s["value_column"] == "value"
    assert s["named_args"] is True
    assert s["lookup"] == "SELECT value FROM aliases WHERE key = :key"
    assert s["set"] == "UPDATE aliases SET value = :value WHERE key = :key"
    assert s["init"] == ["CREATE TABLE IF NOT EXISTS aliases (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)"]
    s = settings_of(
        "table.sql_table t {\n    driver postgres\n    dsn a\n"
        "    table_name p\n    key_column u\n    value_column h\n}\n",
        "t",
    )
    assert s["named_args"] is False
    assert s["add"] == "INSERT INTO p(u, h) VALUES($1, $2)"
    assert errors_of("table.sql_table t {\n    driver sqlite3\n    dsn a\n}\n") == [
        "maddy.conf:1: missing required directive: table_name"
    ]


# -- auth -------------------------------------------------------------------------------------------


def test_pass_table_forms() -> None:
    s = settings_of(
        "auth.pass_table p {\n    table sql_table {\n        driver sqlite3\n"
        "        dsn c.db\n        table_name passwords\n    }\n}\n",
        "p",
    )
    assert s["table"].name == "table.sql_table"
    # Inline: the block belongs to the inline table.
    (ps,) = members(
        "checks g {\n    authorize_sender {\n        user_to_email auth.pass_table static {\n"
        "            entry u bcrypt:x\n        }\n    }\n}\n",
        "g",
    )
    table = ps.settings["user_to_email"]
    assert table.name == "auth.pass_table"
    assert table.settings["table"].settings["entries"] == {"u": ["bcrypt:x"]}
    # Inline without arguments: the block is pass_table's own.
    s = settings_of("auth.plain_separate a {\n    pass pass_table {\n        table static\n    }\n}\n", "a")
    assert s["pass"][0].settings["table"].name == "table.static"
    assert errors_of("auth.pass_table p {\n}\n") == ["maddy.conf:1: missing required directive: table"]


def test_ldap() -> None:
    s = settings_of(
        "auth.ldap l {\n    urls ldap://a:389\n    urls ldap://b:389 ldaps://c\n"
        '    dn_template "cn={username},dc=x"\n}\n',
        "l",
    )
    assert s["urls"] == ["ldap://a:389", "ldap://b:389", "ldaps://c"]
    assert s["bind"] == LDAPBind("off")
    assert s["connect_timeout"] == 60 and s["request_timeout"] == 60
    assert s["starttls"] is False and s["tls_client"] is None
    s = settings_of(
        'debug yes\nauth.ldap l {\n    bind plain "cn=maddy" secret\n    base_dn dc=x\n    filter "(uid={username})"\n'
        "    connect_timeout 5s\n}\n",
        "l",
    )
    assert s["bind"] == LDAPBind("plain", "cn=maddy", "secret")
    assert s["debug"] is True and s["connect_timeout"] == 5
    (inline,) = settings_of(
        "auth.plain_separate a {\n    pass ldap ldap://x ldap://y {\n"
        "        urls ldap://z\n        dn_template d\n    }\n}\n",
        "a",
    )["pass"]
    assert inline.name == "auth.ldap" and inline.settings["urls"] == ["ldap://x", "ldap://y", "ldap://z"]
    assert settings_of("table.ldap l {\n    bind unauth cn=a\n    dn_template d\n}\n", "l")["bind"] == LDAPBind(
        "unauth", "cn=a"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", "maddy.conf:1: auth.ldap: base_dn not set"),
        ("    base_dn b\n", "maddy.conf:1: auth.ldap: filter not set"),
        (
            "    dn_template d\n    filter f\n",
            "maddy.conf:1: auth.ldap: search directives set when dn_template is used",
        ),
        (
            "    dn_template d\n    bind plain cn=x\n",
            "maddy.conf:3: auth.ldap: username and password expected for plaintext bind",
        ),
        ("    dn_template d\n    bind sasl\n", "maddy.conf:3: auth.ldap: unknown bind authentication: sasl"),
        ("    dn_template d\n    bind\n", "maddy.conf:3: auth.ldap: auth expects at least one argument"),
    ],
)
def test_ldap_errors(body: str, message: str) -> None:
    assert errors_of("auth.ldap l {\n" + body + "}\n") == [message]


def test_external_pam_shadow_netauth_plain_separate() -> None:
    s = settings_of("debug yes\nauth.external e {\n    helper /usr/bin/h\n    domains example.org\n}\n", "e")
    assert s["helper"] == "/usr/bin/h" and s["domains"] == ["example.org"] and s["perdomain"] is False
    assert s["debug"] is False  # auth.external does not inherit debug
    assert errors_of("auth.external e {\n    perdomain\n}\n") == [
        "maddy.conf:1: auth_domains must be set if auth_perdomain is used"
    ]
    for name in ("pam", "shadow"):
        s = settings_of(f"debug yes\nauth.{name} a {{\n    use_helper yes\n}}\n", "a")
        assert s == {"debug": True, "use_helper": True}
    s = settings_of("debug yes\nauth.netauth n {\n}\n", "n")
    assert s == {"require_group": "", "debug": True}
    s = settings_of("auth.plain_separate a {\n    user static\n    user file /etc/users\n    pass dummy\n}\n", "a")
    assert [t.name for t in s["user"]] == ["table.static", "table.file"]
    assert [p.name for p in s["pass"]] == ["dummy"]
    assert s["debug"] is False


@pytest.mark.parametrize(
    ("line", "prefix"),
    [
        ("pass external x", "external"),
        ("pass pam x", "pam"),
        ("pass shadow x", "shadow"),
        ("pass plain_separate x", "plain_separate"),
        ("pass netauth x", "auth.netauth"),
        ("user netauth x", "auth.netauth"),
    ],
)
def test_auth_inline_arguments_rejected_in_maddy_words(line: str, prefix: str) -> None:
    assert errors_of(f"auth.plain_separate a {{\n    {line}\n}}\n") == [
        f"maddy.conf:2: {prefix}: inline arguments are not used"
    ]


def test_dovecot_sasl() -> None:
    (inst,) = settings_of("auth.plain_separate a {\n    pass dovecot_sasl unix:///run/dovecot/auth-client\n}\n", "a")[
        "pass"
    ]
    assert inst.settings["endpoint"].path == "/run/dovecot/auth-client"
    s = settings_of("dovecot_sasl d {\n    endpoint tcp://127.0.0.1:12345\n}\n", "d")
    assert s["endpoint"] == Endpoint("tcp://127.0.0.1:12345", "tcp", "127.0.0.1", "12345")
    assert errors_of("dovecot_sasl d {\n}\n") == ["maddy.conf:1: dovecot_sasl: missing server endpoint"]
    assert errors_of("auth.plain_separate a {\n    pass dovecot_sasl tcp://a:1 tcp://b:2\n}\n") == [
        "maddy.conf:2: dovecot_sasl: one or none arguments needed"
    ]
    assert errors_of("dovecot_sasl d {\n    endpoint http://x\n}\n")[0].startswith(
        "maddy.conf:1: dovecot_sasl: invalid server endpoint: unsupported scheme"
    )


# -- upstream fixtures ------------------------------------------------------------------------------


def doc(name: str) -> str:
    return (DOCS / name).read_text()


def as_group(text: str) -> str:
    """Docs fragments write `check {…}` / `modify {…}`; make them top-level groups."""
    return text.replace("check {", "checks g {", 1).replace("modify {", "modifiers g {", 1)


@pytest.mark.parametrize(
    "name",
    [
        "reference__auth__external__1.conf",
        "reference__auth__netauth__1.conf",
        "reference__auth__netauth__2.conf",
        "reference__auth__pam__2.conf",
        "reference__auth__shadow__1.conf",
        "reference__checks__dnsbl__1.conf",
        "reference__checks__spf__1.conf",
        "reference__modifiers__dkim__2.conf",
        "reference__table__chain__1.conf",
        "reference__table__chain__2.conf",
        "reference__table__email_localpart__1.conf",
        "reference__table__regexp__3.conf",
        "reference__table__sql_query__3.conf",
        "tutorials__pam__2.conf",
        "tutorials__pam__5.conf",
    ],
)
def test_complete_docs_examples_compile(name: str) -> None:
    assert errors_of(doc(name), path=name) == []


@pytest.mark.parametrize(
    "name",
    [
        "reference__checks__dnsbl__2.conf",
        "reference__checks__dnsbl__3.conf",
        "reference__modifiers__envelope__2.conf",
        "reference__table__file__3.conf",
        "reference__table__sql_query__2.conf",
    ],
)
def test_group_fragments_compile(name: str) -> None:
    assert errors_of(as_group(doc(name)), path=name) == []


def test_docs_examples_with_specific_values() -> None:
    spf = settings_of(doc("reference__checks__spf__1.conf"), "check.spf")
    assert spf["permerr_action"] == REJECT and spf["temperr_action"] == REJECT and spf["fail_action"] == QUARANTINE
    dnsbl = settings_of(doc("reference__checks__dnsbl__1.conf"), "check.dnsbl")
    assert [x.zone for x in dnsbl["lists"]] == ["dnsbl.example.org", "hsrbl.example.org", "zen.spamhaus.org"]
    assert [r.score for r in dnsbl["lists"][2].rules] == [10, 10, 5]
    (shortcut_group,) = members(as_group(doc("reference__checks__dnsbl__2.conf")), "g")
    assert all(x.shortcut and x.score == 0 for x in shortcut_group.settings["lists"])
    (multi,) = members(as_group(doc("reference__checks__dnsbl__3.conf")), "g")
    assert [(x.zone, x.client_ipv6) for x in multi.settings["lists"]] == [
        ("dnsbl.example.org", False),
        ("dnsbl2.example.org", False),
    ]
    rewrites = members(as_group(doc("reference__modifiers__envelope__2.conf")), "g")
    assert [m.settings["table"].name for m in rewrites] == [
        "table.file",
        "table.static",
        "table.regexp",
        "table.regexp",
    ]
    assert rewrites[3].settings["table"].settings["replacements"] == ["$1@example.org", "$1@example.com"]
    (sqlq,) = members(as_group(doc("reference__table__sql_query__2.conf")), "g")
    assert sqlq.settings["table"].settings["driver"] == "postgres"
    sql3 = settings_of(doc("reference__table__sql_query__3.conf"), "table.sql_query")
    assert sql3["init"] == ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL"]
    dkim = settings_of(doc("reference__modifiers__dkim__2.conf"), "modify.dkim")
    assert dkim["key_path"] == "dkim-keys/{domain}-{selector}.key" and dkim["oversign_fields"] == ["..."]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("reference__checks__dkim__1.conf", ["4: unexpected directive: allow_body_subset"]),
        ("reference__checks__authorize_sender__1.conf", ["8: unexpected directive: malformed_action"]),
        ("reference__table__regexp__1.conf", ["4: unexpected directive: expand_placeholders"]),
        ("reference__auth__dovecot_sasl__1.conf", ["1: unknown module or global directive: auth.dovecot_sasl"]),
        (
            "reference__auth__ldap__1.conf",
            ["1: auth.ldap: search directives set when dn_template is used", "15: unexpected directive: ..."],
        ),
        ("reference__auth__ldap__2.conf", ["1: auth.ldap: base_dn not set", "2: unexpected directive: ..."]),
        ("reference__table__static__1.conf", ["4: unexpected directive: ..."]),
        (
            "reference__checks__rspamd__1.conf",
            ["2: unexpected directive: ...", "16: unknown module or global directive: rspamd"],
        ),
        ("reference__smtp-pipeline__13.conf", ["1: missing required directive: table_name"]),
    ],
)
def test_invalid_docs_examples_fail_with_location(name: str, expected: list[str]) -> None:
    errs = errors_of(doc(name), path=name)
    for tail in expected:
        assert f"{name}:{tail}" in errs, errs


def test_invalid_docs_fragments() -> None:
    name = "reference__table__email_with_domain__2.conf"
    assert errors_of(as_group(doc(name)), path=name) == [
        f"{name}:3: unknown module: email_local_part (namespace: table)"
    ]
    name = "reference__table__email_with_domain__3.conf"
    assert errors_of(doc(name), path=name) == [f"{name}:2: unexpected directive: ..."]
    name = "reference__checks__command__1.conf"
    (cmd,) = members(as_group("check {\n" + doc(name) + "\n}\n"), "g")
    assert cmd.settings["command"] == "executable_name"
    assert cmd.settings["args"] == ["arg0", "arg1", "..."]
    name = "third-party__rspamd__2.conf"
    errs = errors_of(as_group(doc(name)), path=name)
    assert errs == [f"{name}:2: unknown module: ... (namespace: check)"]


def _compile_fixture(path: Path, env: dict[str, str]) -> list[str]:
    text = path.read_text()
    for var in re.findall(r"\{env:(TEST_PORT_\w+)\}", text):
        env[var] = "2525"
    return [str(e) for e in compile_file(str(path), env).errors if not any(n in str(e) for n in STANDALONE_NOISE)]


@pytest.mark.parametrize(
    "name",
    [
        "TestCheckAuthorizeSender.conf",
        "TestCheckCommand.conf",
        "TestCheckRequireTLS.conf",
        "TestCheckSPF.conf",
        "TestDNSBLConfig.conf",
        "TestDNSBLConfig2.conf",
        "TestDovecotSASLClient.conf",
        "TestIMAPEndpointAuthMap.conf",
        "TestImapsqlAuthMap.conf",
        "TestLDAPInjectionFilter.conf",
        "TestMultipleDomains_SharedCredentials_SharedMailboxes.conf",
        "TestReplaceAddr_Rcpt__inline.conf",
        "TestReplaceAddr_Rcpt__inline_qualified.conf",
        "TestReplaceAddr_Sender__inline.conf",
        "TestReplaceAddr_Sender__inline_qualified.conf",
        "TestSASLServerWithChasquid.conf",
        "TestSPF_DMARCDefer.conf",
    ],
)
def test_integration_configs_using_these_modules_compile(name: str) -> None:
    env = {
        "TEST_PWD": "/tmp/pwd",
        "TEST_STATE_DIR": "/tmp/state",
        "TEST_RUNTIME_DIR": "/tmp/run",
        "DOVECOT_SASL_SOCK": "/tmp/dovecot/auth-client",
    }
    assert _compile_fixture(FIXTURES / "tests-integration" / name, env) == []


@pytest.mark.parametrize("name", ["maddy.conf", "maddy.conf.docker"])
def test_default_configs_compile(name: str) -> None:
    env = {"MADDY_HOSTNAME": "mx.example.org", "MADDY_DOMAIN": "example.org"}
    assert _compile_fixture(FIXTURES / "default" / name, env) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("check.milter m {\n    endpoint a b\n}\n", "maddy.conf:2: expected 1 argument"),
        ("dovecot_sasl d {\n    endpoint a b\n}\n", "maddy.conf:2: expected 1 argument"),
        ("modify.dkim d {\n    domains\n    selector s\n}\n", "maddy.conf:2: expected at least one argument"),
        (
            "modify.dkim d {\n    domains a b\n    sign_subdomains maybe\n}\n",
            "maddy.conf:3: bool argument should be 'yes' or 'no'",
        ),
        (
            "table.chain c {\n    step regexp x {\n        full_match maybe\n    }\n}\n",
            "maddy.conf:3: bool argument should be 'yes' or 'no'",
        ),
        (
            "table.sql_table t {\n    driver x\n    dsn d\n    table_name t\n    key_column a b\n}\n",
            "maddy.conf:5: expected 1 argument",
        ),
        ("check.dnsbl b {\n    zone.example {\n        score x\n    }\n}\n", "maddy.conf:3: invalid integer: x"),
        ("table.file f {\n    file a b\n}\n", "maddy.conf:2: expected 1 argument"),
    ],
)
def test_one_mistake_gives_one_error(text: str, message: str) -> None:
    assert errors_of(text) == [message]


def test_bare_pass_table_is_not_a_table_name() -> None:
    # Only auth.pass_table is registered; the table namespace can't find it by its short name.
    assert errors_of("table.chain c {\n    step pass_table static\n}\n") == [
        "maddy.conf:2: unknown module: pass_table (namespace: table)"
    ]
