"""`pymaddy dns` as a user runs it: a real process on generated configs, records checked independently."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pymaddy.dkim.keys import dns_record, generate_key

Record = tuple[str, str, str]  # owner, type, rdata


def make_cert(tmp: Path) -> tuple[Path, Path, str]:
    """A self-made certificate for mx.example.org; returns its paths and the expected TLSA 3 1 1 value."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.example.org")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.example.org")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "fullchain.pem", tmp / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert_path, key_path, hashlib.sha256(spki).hexdigest()


def write_conf(
    tmp: Path,
    *,
    tls: str = "tls off",
    macros: bool = True,
    algo: str = "ed25519",
    extra: str = "",
) -> Path:
    head = (
        "$(hostname) = mx.example.org\n$(primary_domain) = example.org\n"
        "$(local_domains) = $(primary_domain) example.net\n"
        if macros
        else "$(hostname) = mx.example.org\n"
    )
    dests = "$(local_domains)" if macros else "example.org example.net"
    dkim_domains = "$(primary_domain) $(local_domains)" if macros else "example.org example.net"
    conf = tmp / "maddy.conf"
    conf.write_text(
        head + f"state_dir {tmp}/state\n"
        f"runtime_dir {tmp}/run\n"
        "hostname $(hostname)\n"
        f"{tls}\n"
        "auth.pass_table local_authdb {\n"
        "    table sql_table {\n        driver sqlite3\n        dsn credentials.db\n        table_name passwords\n"
        "    }\n"
        "}\n"
        "storage.imapsql local_mailboxes {\n    driver sqlite3\n    dsn imapsql.db\n}\n"
        "smtp tcp://127.0.0.1:25 {\n"
        f"    destination postmaster {dests} {{\n        deliver_to &local_mailboxes\n    }}\n"
        "    destination lists.example.com {\n        reject\n    }\n"
        "    default_destination {\n        reject 550 5.1.1 \"User doesn't exist\"\n    }\n"
        "}\n"
        "submission tcp://127.0.0.1:587 {\n"
        "    auth &local_authdb\n"
        "    modify {\n"
        f"        dkim {dkim_domains} default {{\n            newkey_algo {algo}\n        }}\n"
        "    }\n"
        "    deliver_to &local_mailboxes\n"
        "}\n" + extra
    )
    return conf


def dns(conf: Path, *args: str) -> tuple[int, str, str]:
    r = subprocess.run(
        [sys.executable, "-m", "pymaddy", "-config", str(conf), "dns", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return r.returncode, r.stdout, r.stderr


_RR = re.compile(r"^(\S+)\s+\d+\s+IN\s+(\S+)\s+(.*)$")


def records(out: str) -> list[Record]:
    return [(m[1], m[2], m[3]) for line in out.splitlines() if not line.startswith(";") and (m := _RR.match(line))]


def txt_value(rdata: str) -> str:
    """The TXT value a resolver sees: the quoted strings joined."""
    parts = re.findall(r'"((?:[^"\\]|\\.)*)"', rdata)
    assert all(len(p) <= 255 for p in parts)
    return "".join(re.sub(r"\\(.)", r"\1", p) for p in parts)


def txts(recs: list[Record], owner: str) -> list[str]:
    return [txt_value(r) for o, t, r in recs if o == owner and t == "TXT"]


def test_all_records_tls_file_and_new_dkim_keys(tmp_path: Path) -> None:
    cert, key, tlsa = make_cert(tmp_path)
    conf = write_conf(tmp_path, tls=f"tls file {cert} {key}")
    code, out, err = dns(conf, "--ip", "203.0.113.5", "--ipv6", "2001:db8::5")
    assert code == 0, err
    assert out.startswith("; DNS records for the mail domains of ")
    recs = records(out)

    # Host records.
    assert ("mx.example.org.", "A", "203.0.113.5") in recs
    assert ("mx.example.org.", "AAAA", "2001:db8::5") in recs
    assert txts(recs, "mx.example.org.") == ["v=spf1 a ~all"]
    assert [r for o, t, r in recs if t == "TLSA"] == [f"3 1 1 {tlsa}"]
    assert [o for o, t, r in recs if t == "TLSA"] == ["_25._tcp.mx.example.org."]

    # Keys were created at first use, as modify.dkim does, and logged as maddy logs it.
    keys = tmp_path / "state" / "dkim_keys"
    for domain in ("example.org", "example.net"):
        key_file = keys / f"{domain}_default.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        dns_file = (keys / f"{domain}_default.dns").read_text()
        assert dns_file.startswith("v=DKIM1; k=ed25519; p=")
        assert f"put its contents into TXT record for default._domainkey.{domain}" in err

        assert [r for o, t, r in recs if o == f"{domain}." and t == "MX"] == ["10 mx.example.org."]
        assert txts(recs, f"{domain}.") == ["v=spf1 mx ~all"]
        assert txts(recs, f"default._domainkey.{domain}.") == [dns_file]
        assert txts(recs, f"_dmarc.{domain}.") == [f"v=DMARC1; p=quarantine; ruf=mailto:postmaster@{domain}"]
        assert txts(recs, f"_smtp._tls.{domain}.") == [f"v=TLSRPTv1; rua=mailto:postmaster@{domain}"]
        (sts,) = txts(recs, f"_mta-sts.{domain}.")
        assert re.fullmatch(r"v=STSv1; id=[A-Za-z0-9]{1,32}", sts)
    assert "; === domain example.org ===" in out and "mode: enforce" in out
    # Domains not delivered locally are not mail domains of this server.
    assert "lists.example.com" not in out

    # Deterministic, and existing keys are reused, not replaced.
    before = {p.name: p.read_bytes() for p in keys.iterdir()}
    code2, out2, err2 = dns(conf, "--ip", "203.0.113.5", "--ipv6", "2001:db8::5")
    assert (code2, out2) == (0, out)
    assert "generated" not in err2
    assert {p.name: p.read_bytes() for p in keys.iterdir()} == before


def test_rsa_key_record_split_into_strings(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, algo="rsa2048")
    code, out, err = dns(conf)
    assert code == 0, err
    assert "generated a new rsa2048 keypair, private key is in dkim_keys/example.org_default.key" in err
    dns_file = (tmp_path / "state" / "dkim_keys" / "example.org_default.dns").read_text()
    (line,) = [x for x in out.splitlines() if x.startswith("default._domainkey.example.org.")]
    assert line.count('"') >= 4 and "( " in line  # over 255 bytes: several strings
    assert txts(records(out), "default._domainkey.example.org.") == [dns_file]


def test_existing_key_without_dns_file_and_mismatched_dns_file(tmp_path: Path) -> None:
    conf = write_conf(tmp_path)
    keys = tmp_path / "state" / "dkim_keys"
    keys.mkdir(parents=True)
    org, net = generate_key("ed25519"), generate_key("ed25519")
    (keys / "example.org_default.key").write_bytes(org.pem())
    (keys / "example.net_default.key").write_bytes(net.pem())
    (keys / "example.net_default.dns").write_text("v=DKIM1; k=ed25519; p=stale")
    code, out, err = dns(conf)
    assert code == 0, err
    assert "generated" not in err
    recs = records(out)
    assert txts(recs, "default._domainkey.example.org.") == [dns_record(org)]
    assert txts(recs, "default._domainkey.example.net.") == [dns_record(net)]
    assert "WARNING: dkim_keys/example.net_default.dns does not match the key" in out
    assert not (keys / "example.org_default.dns").exists()  # the command only reads existing keys


def test_no_create_keys_says_how(tmp_path: Path) -> None:
    conf = write_conf(tmp_path)
    code, out, err = dns(conf, "--no-create-keys")
    assert code == 0, err
    assert not (tmp_path / "state").exists()
    assert not [r for r in records(out) if "_domainkey" in r[0]]
    assert "no DKIM key yet (dkim_keys/example.org_default.key is missing)" in out
    assert "start the server once" in out


def test_domains_from_destination_rules_without_macros(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, macros=False)
    code, out, err = dns(conf)
    assert code == 0, err
    assert "from the destination rules that deliver to a local storage" in out
    mx = [o for o, t, _ in records(out) if t == "MX"]
    assert mx == ["example.org.", "example.net."]


def test_domain_flags_override_and_idn(tmp_path: Path) -> None:
    conf = write_conf(tmp_path)
    code, out, err = dns(conf, "--domain", "Bücher.example", "--domain", "example.org", "--domain", "bücher.example")
    assert code == 0, err
    recs = records(out)
    assert [o for o, t, _ in recs if t == "MX"] == ["xn--bcher-kva.example.", "example.org."]
    assert txts(recs, "_dmarc.xn--bcher-kva.example.") == [
        "v=DMARC1; p=quarantine; ruf=mailto:postmaster@xn--bcher-kva.example"
    ]
    assert "; === domain xn--bcher-kva.example (bücher.example) ===" in out
    assert "no modify.dkim block signs for this domain" in out
    # example.net still has a key (modify.dkim signs for it): listed apart.
    assert "=== DKIM keys of other signing domains ===" in out
    assert txts(recs, "default._domainkey.example.net.")


def test_unknown_addresses_and_self_signed(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, tls="tls self_signed")
    code, out, err = dns(conf, "--no-create-keys")
    assert code == 0, err
    recs = records(out)
    assert not [r for r in recs if r[1] in ("A", "AAAA", "TLSA")]
    assert "; UNKNOWN IPv4 address: mx.example.org. 3600 IN A <address>  -- give it with --ip" in out
    assert "; UNKNOWN IPv6 address:" in out
    assert "self_signed`: its key changes at every start" in out
    assert "mode: testing" in out


def test_tls_off_and_hostname_is_a_domain(tmp_path: Path) -> None:
    conf = write_conf(tmp_path)
    conf.write_text(conf.read_text().replace("$(hostname) = mx.example.org", "$(hostname) = example.org"))
    code, out, err = dns(conf, "--no-create-keys", "--ttl", "300")
    assert code == 0, err
    recs = records(out)
    # One SPF record per name: the domain's `mx` already covers the host.
    assert txts(recs, "example.org.") == ["v=spf1 mx ~all"]
    assert "no TLSA record" in out
    assert all(" 300 IN " in line for line in out.splitlines() if not line.startswith(";") and line)


def test_missing_cert_file_is_reported_not_fatal(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, tls=f"tls file {tmp_path}/none.pem {tmp_path}/none.key")
    code, out, err = dns(conf, "--no-create-keys")
    assert code == 0, err
    assert f"WARNING: cannot read {tmp_path}/none.pem" in out
    assert not [r for r in records(out) if r[1] == "TLSA"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ip", "2001:db8::1"], "Error: --ip: not an IPv4 address: 2001:db8::1\n"),
        (["--ipv6", "banana"], "Error: --ipv6: not an IPv6 address: banana\n"),
    ],
)
def test_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    conf = write_conf(tmp_path)
    assert dns(conf, *args) == (2, "", message)


def test_config_errors(tmp_path: Path) -> None:
    code, out, err = dns(tmp_path / "nope.conf")
    assert (code, out) == (2, "")
    assert err.startswith("Error: failed to open config:")
    conf = write_conf(tmp_path)
    conf.write_text(conf.read_text().replace("hostname $(hostname)\n", ""))
    code, out, err = dns(conf)
    assert code == 1 and out == ""
    assert err.startswith("Error: ")
    bad = tmp_path / "bad.conf"
    bad.write_text("smtp tcp://127.0.0.1:25 {\n  no_such_directive\n}\n")
    code, out, err = dns(bad)
    assert code == 1 and out == "" and "Error: " in err and "no_such_directive" in err
    assert os.listdir(tmp_path).count("state") == 0


UPSTREAM = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "maddy-upstream" / "default" / "maddy.conf"


@pytest.mark.skipif(not UPSTREAM.exists(), reason="maddy's default config fixture not available")
def test_maddy_default_config_unchanged() -> None:
    code, out, err = dns(UPSTREAM, "--no-create-keys")
    assert code == 0, err
    assert "; domains: example.org (from the $(primary_domain) and $(local_domains) macros)" in out
    recs = records(out)
    assert [(o, r) for o, t, r in recs if t == "MX"] == [("example.org.", "10 example.org.")]
    assert txts(recs, "example.org.") == ["v=spf1 mx ~all"]
    assert "no DKIM key yet (dkim_keys/example.org_default.key is missing)" in out
    assert "WARNING: cannot read /etc/maddy/certs/example.org/fullchain.pem" in out
