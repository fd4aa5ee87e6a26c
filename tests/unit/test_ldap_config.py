"""auth.ldap / table.ldap configuration as maddy's Configure() accepts or refuses it."""

from __future__ import annotations

import pytest

from pymaddy.auth.schema import LDAPBind
from tests.confhelp import errors_of, settings_of

SEARCH = 'base_dn "dc=example,dc=org"\n    filter "(uid={username})"'


@pytest.mark.parametrize("mod", ["auth.ldap", "table.ldap"])
def test_repeated_urls_directives_join(mod: str) -> None:
    s = settings_of(f"{mod} a {{\n    urls ldap://two ldaps://three\n    urls ldap://four\n"
                    f"    {SEARCH}\n}}\n", "a")
    assert s["urls"] == ["ldap://two", "ldaps://three", "ldap://four"]
    assert s["bind"] == LDAPBind("off")
    assert s["connect_timeout"] == 60.0 and s["request_timeout"] == 60.0 and s["starttls"] is False


@pytest.mark.parametrize(
    ("bind", "expected"),
    [("off", LDAPBind("off")), ("unauth", LDAPBind("unauth")), ('unauth "cn=x"', LDAPBind("unauth", "cn=x")),
     ('plain "cn=admin" "pw"', LDAPBind("plain", "cn=admin", "pw")), ("external", LDAPBind("external"))],
)
def test_bind_forms(bind: str, expected: LDAPBind) -> None:
    s = settings_of(f"auth.ldap a {{\n    urls ldap://x\n    bind {bind}\n    {SEARCH}\n}}\n", "a")
    assert s["bind"] == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('dn_template "uid={username},dc=x"\n    base_dn "dc=x"', "search directives set when dn_template is used"),
        ('dn_template "uid={username},dc=x"\n    filter "(uid={username})"',
         "search directives set when dn_template is used"),
        ('filter "(uid={username})"', "base_dn not set"),
        ('base_dn "dc=x"', "filter not set"),
        (f"bind plain onlyone\n    {SEARCH}", "username and password expected for plaintext bind"),
        (f"bind kerberos\n    {SEARCH}", "unknown bind authentication: kerberos"),
    ],
)
def test_config_errors(body: str, message: str) -> None:
    errs = errors_of(f"auth.ldap a {{\n    urls ldap://x\n    {body}\n}}\n")
    assert any(message in e for e in errs), errs
