"""DKIM interoperability with OpenDKIM (Debian's opendkim, opendkim-tools, miltertest), both directions.

* Mail signed by pymaddy's `modify.dkim` (keys generated at first start) is
  verified by `opendkim-testmsg`, which looks the key up through the C
  library resolver. It runs in fresh user, mount and network namespaces
  (`unshare -rmn`) where /etc/resolv.conf is bind-mounted to name 127.0.0.1
  and a loopback DNS server (tests/unit/test_dkim_helpers.py) answers on port
  53 — nothing outside the test is touched and no privileges are needed.
* Mail signed by the real `opendkim` filter (driven over the milter protocol
  by `miltertest`; rsa-sha256 and ed25519-sha256, relaxed and simple) passes
  pymaddy's `check.dkim`, the key fetched from the loopback DNS server through
  -debug.dnsoverride; tampered copies fail.
* `opendkim-testmsg -C` can only sign rsa-sha1, which maddy refuses
  (RFC 8301 §3.1): pymaddy reports permerror "hash algorithm too weak: sha1",
  while dkimpy confirms the signature itself is good.

The tools are required: CI installs `opendkim-tools opendkim miltertest`;
without them these tests fail rather than skip.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import dkim as dkimpy
import pytest

from pymaddy.checks.dkim import DKIMCheck
from pymaddy.dkim.core import signature_tags
from pymaddy.dkim.keys import dns_record, load_key
from pymaddy.mail.message import MsgMeta
from pymaddy.modify.dkim import DKIMSigner
from pymaddy.pipeline.interfaces import CheckResult
from tests.unit.test_dkim_helpers import MESSAGE, ZoneServer, build, join_message, split_message

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data" / "dkim"
TESTMSG = "/usr/sbin/opendkim-testmsg"


def _testmsg() -> str:
    path = shutil.which("opendkim-testmsg") or (TESTMSG if os.path.exists(TESTMSG) else None)
    assert path, "opendkim-testmsg not found: apt-get install opendkim-tools"
    return path


# -- inside the namespaces --------------------------------------------------------------


def _lo_up() -> None:
    """`ip link set lo up` without iproute2 (SIOCGIFFLAGS/SIOCSIFFLAGS)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        req = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, req)[:18])[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))
    finally:
        s.close()


def _child(zone_file: str, msg_file: str, testmsg: str) -> int:
    """Serve the zone on 127.0.0.1:53 and run opendkim-testmsg on the message; print JSON."""
    _lo_up()
    with open(zone_file) as f:
        zone = json.load(f)
    with ZoneServer(zone, port=53) as srv, open(msg_file, "rb") as msg:
        p = subprocess.run([testmsg], stdin=msg, capture_output=True, timeout=60, check=False)
        queries = srv.queries
    print(json.dumps({"rc": p.returncode, "out": p.stdout.decode(), "err": p.stderr.decode(), "queries": queries}))
    return 0


# -- driving it -------------------------------------------------------------------------


def opendkim_verify(tmp: Path, zone: dict[str, list[str]], message: bytes) -> dict[str, object]:
    """opendkim-testmsg's verdict on `message` with `zone` as the whole DNS."""
    testmsg = _testmsg()
    assert shutil.which("unshare"), "unshare (util-linux) is needed"
    (tmp / "zone.json").write_text(json.dumps(zone))
    (tmp / "msg.eml").write_bytes(message)
    (tmp / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:2\n")
    script = 'mount --bind "$1" /etc/resolv.conf && exec "$2" -m tests.unit.test_dkim_opendkim "$3" "$4" "$5"'
    p = subprocess.run(
        [
            "unshare",
            "-rmn",
            "sh",
            "-c",
            script,
            "sh",
            str(tmp / "resolv.conf"),
            sys.executable,
            str(tmp / "zone.json"),
            str(tmp / "msg.eml"),
            testmsg,
        ],
        cwd=REPO,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 0, f"namespace run failed: {p.stderr.decode()}"
    out: dict[str, object] = json.loads(p.stdout.decode().strip().splitlines()[-1])
    return out


def sign_with_pymaddy(tmp: Path, algo: str, canon: str) -> tuple[bytes, dict[str, list[str]]]:
    """A message signed by modify.dkim with a key generated at first start, and the zone."""
    text = f"modify.dkim {{\n domains example.org\n selector sel\n newkey_algo {algo}\n"
    text += f" header_canon {canon}\n body_canon {canon}\n}}\n"
    mod, _ = build(text, tmp, "modify.dkim", DKIMSigner)

    async def go() -> bytes:
        await mod.start()
        st = await mod.state_for_msg(MsgMeta())
        await st.rewrite_sender("alice@example.org")
        header, body = split_message(MESSAGE)
        await st.rewrite_body(header, body)
        return join_message(header, body)

    signed = asyncio.run(go())
    record = (tmp / "dkim_keys" / "example.org_sel.dns").read_text()
    return signed, {"sel._domainkey.example.org": [record]}


def _assert_pass(res: dict[str, object]) -> None:
    assert res["rc"] == 0, res
    assert res["err"] == "", res
    assert "sel._domainkey.example.org" in str(res["queries"]), res


def test_opendkim_verifies_pymaddy_rsa2048_relaxed(tmp_path: Path) -> None:
    signed, zone = sign_with_pymaddy(tmp_path, "rsa2048", "relaxed")
    _assert_pass(opendkim_verify(tmp_path, zone, signed))


def test_opendkim_verifies_pymaddy_rsa2048_simple(tmp_path: Path) -> None:
    signed, zone = sign_with_pymaddy(tmp_path, "rsa2048", "simple")
    _assert_pass(opendkim_verify(tmp_path, zone, signed))


def test_opendkim_verifies_pymaddy_rsa4096(tmp_path: Path) -> None:
    signed, zone = sign_with_pymaddy(tmp_path, "rsa4096", "relaxed")
    _assert_pass(opendkim_verify(tmp_path, zone, signed))


def test_opendkim_verifies_pymaddy_ed25519(tmp_path: Path) -> None:
    """RFC 8463 signatures and the `k=ed25519` record of the .dns file."""
    signed, zone = sign_with_pymaddy(tmp_path, "ed25519", "relaxed")
    assert b"a=ed25519-sha256" in signed
    _assert_pass(opendkim_verify(tmp_path, zone, signed))


@pytest.mark.parametrize("algo", ["rsa2048", "ed25519"])
def test_opendkim_rejects_tampered_pymaddy_mail(tmp_path: Path, algo: str) -> None:
    """The negative control: OpenDKIM really checks, so the passes above mean something."""
    signed, zone = sign_with_pymaddy(tmp_path, algo, "relaxed")
    res = opendkim_verify(tmp_path, zone, signed.replace(b"noon?", b"one?"))
    assert res["rc"] != 0 and "Bad signature" in str(res["err"]), res
    res = opendkim_verify(tmp_path, zone, signed.replace(b"Subject: Lunch", b"Subject: Dinner"))
    assert res["rc"] != 0 and "Bad signature" in str(res["err"]), res


# -- OpenDKIM signs, pymaddy verifies ------------------------------------------------------


def opendkim_sign(tmp: Path, key_file: Path, message: bytes) -> bytes:
    p = subprocess.run(
        [_testmsg(), "-C", "-d", "example.org", "-s", "sel", "-k", str(key_file)],
        input=message,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout


def check_with_pymaddy(tmp: Path, zone: dict[str, list[str]], message: bytes) -> CheckResult:
    with ZoneServer(zone) as srv:
        chk, _ = build("check.dkim {\n}\n", tmp, "check.dkim", DKIMCheck, dns_override=srv.addr)

        async def go() -> CheckResult:
            await chk.start()
            st = await chk.state_for_msg(MsgMeta())
            header, body = split_message(message)
            return await st.check_body(header, body)

        return asyncio.run(go())


def test_pymaddy_judges_opendkim_signature(tmp_path: Path) -> None:
    # A key in maddy's format (generated by modify.dkim at first start) used by OpenDKIM.
    _, zone = sign_with_pymaddy(tmp_path, "rsa2048", "relaxed")
    key_file = tmp_path / "dkim_keys" / "example.org_sel.key"
    load_key(str(key_file))
    signed = opendkim_sign(tmp_path, key_file, MESSAGE)
    assert signed.startswith(b"DKIM-Signature:")
    record = zone["sel._domainkey.example.org"][0]
    # Independent confirmation that OpenDKIM's signature is valid (dkimpy accepts SHA-1).
    assert dkimpy.verify(signed, dnsfunc=lambda name, timeout=5: record.encode())

    res = check_with_pymaddy(tmp_path, zone, signed)
    assert [(r.result, r.reason, r.params) for r in res.auth_results] == [
        ("permerror", "hash algorithm too weak: sha1", {"header.d": "example.org", "header.i": "@example.org"})
    ]
    assert res.reject is None and not res.quarantine  # broken_sig_action defaults to ignore
    assert res.reason is not None and str(res.reason) == "No passing DKIM signatures"

    tampered = check_with_pymaddy(tmp_path, zone, signed.replace(b"noon?", b"one?"))
    # The key and tags are fine, so the SHA-1 policy still speaks first (go-msgauth's order).
    assert [r.result for r in tampered.auth_results] == ["permerror"]


# -- OpenDKIM's milter signs, pymaddy verifies -----------------------------------------------------


def _lua_str(s: str) -> str:
    assert "]==]" not in s
    return "[==[" + s + "]==]"


def opendkim_milter_sign(tmp: Path, key_file: Path, algorithm: str, canon: str, message: bytes) -> bytes:
    """The message signed by the real `opendkim` filter, driven over the milter protocol by
    `miltertest` (both from Debian's OpenDKIM): its DKIM-Signature field prepended."""
    for tool in ("opendkim", "miltertest"):
        assert shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}"), f"{tool} missing: apt-get install {tool}"
    header, body = split_message(message)
    # A unix socket (short path: sun_path holds 108 bytes) cannot clash with other tests' ports.
    sockdir = Path(tempfile.mkdtemp(prefix="odk"))
    sock = sockdir / "m.sock"
    conf = tmp / "opendkim.conf"
    conf.write_text(
        "Syslog no\nBackground no\nMode s\nDomain example.org\nSelector sel\n"
        f"KeyFile {key_file}\nCanonicalization {canon}\nSignatureAlgorithm {algorithm}\n"
        f"Socket local:{sock}\nRequireSafeKeys no\nOversignHeaders From\n"
        f"PidFile {tmp / 'opendkim.pid'}\n"
    )
    (tmp / "body.txt").write_bytes(body.read_all())
    lines = [
        f'conn = mt.connect("local:{sock}", 80, 0.25)',
        'if conn == nil then error("cannot connect to opendkim") end',
        'mt.conninfo(conn, "localhost", "127.0.0.1")',
        'mt.mailfrom(conn, "alice@example.org")',
        'mt.rcptto(conn, "bob@example.net")',
    ]
    for name, raw in header:
        hvalue = raw.split(b":", 1)[1].removeprefix(b" ").removesuffix(b"\r\n").replace(b"\r\n", b"\n")
        lines.append(f"mt.header(conn, {_lua_str(name)}, {_lua_str(hvalue.decode())})")
    lines += [
        "mt.eoh(conn)",
        f"mt.bodyfile(conn, {_lua_str(str(tmp / 'body.txt'))})",
        "mt.eom(conn)",
        'v = mt.getheader(conn, "DKIM-Signature", 0)',
        'if v == nil then error("opendkim added no signature") end',
        'mt.echo("SIG-BEGIN" .. v .. "SIG-END")',
        "mt.disconnect(conn)",
    ]
    (tmp / "sign.lua").write_text("\n".join(lines) + "\n")
    daemon = subprocess.Popen(
        ["opendkim", "-f", "-x", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp
    )
    try:
        p = subprocess.run(
            ["miltertest", "-s", str(tmp / "sign.lua")], capture_output=True, timeout=60, check=False, cwd=tmp
        )
    finally:
        daemon.kill()  # ours; its graceful shutdown takes seconds and there is nothing to keep
        log = daemon.communicate()[0]
        shutil.rmtree(sockdir, ignore_errors=True)
    out = p.stdout.decode()
    assert p.returncode == 0 and "SIG-BEGIN" in out, (out, p.stderr.decode(), log.decode())
    value = out.split("SIG-BEGIN", 1)[1].split("SIG-END", 1)[0]
    field = b"DKIM-Signature:" + value.replace("\r\n", "\n").replace("\n", "\r\n").encode() + b"\r\n"
    return field + message


@pytest.mark.parametrize(
    ("key", "algorithm", "canon"),
    [
        ("rsa2048-pkcs8", "rsa-sha256", "relaxed/relaxed"),
        ("rsa2048-pkcs1", "rsa-sha256", "simple/simple"),
        ("rsa2048-pkcs8", "rsa-sha256", "relaxed/simple"),
        ("ed25519-pkcs8", "ed25519-sha256", "relaxed/relaxed"),
    ],
)
def test_pymaddy_verifies_opendkim_milter_signatures(tmp_path: Path, key: str, algorithm: str, canon: str) -> None:
    """Real OpenDKIM signatures (SHA-256, RSA and RFC 8463 Ed25519) pass pymaddy's check.dkim,
    the key fetched from the loopback DNS server; tampered copies fail."""
    key_file = tmp_path / "signing.key"
    shutil.copy(DATA / f"{key}.key", key_file)
    key_file.chmod(0o600)
    signed = opendkim_milter_sign(tmp_path, key_file, algorithm, canon, MESSAGE)
    tags = signature_tags(split_message(signed)[0].get("DKIM-Signature") or "")
    assert (tags["a"], tags["c"], tags["d"], tags["s"]) == (algorithm, canon, "example.org", "sel")
    zone = {"sel._domainkey.example.org": [dns_record(load_key(str(key_file)))]}

    res = check_with_pymaddy(tmp_path, zone, signed)
    assert [(r.result, r.reason, r.params) for r in res.auth_results] == [
        ("pass", "", {"header.d": "example.org", "header.i": "@example.org"})
    ]
    assert res.reason is None

    res = check_with_pymaddy(tmp_path, zone, signed.replace(b"noon?", b"one?"))
    assert [(r.result, r.reason) for r in res.auth_results] == [("fail", "body hash did not verify")]
    res = check_with_pymaddy(tmp_path, zone, signed.replace(b"From: Alice", b"From: Mallory"))
    assert [r.result for r in res.auth_results] == ["fail"]


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2], sys.argv[3]))
