"""modify.dkim: first-start keys, key files in maddy's formats, and what gets signed (spec §B.5, §H, §I.3)."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import stat
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from pymaddy.dkim.core import TXTLookup, Verification, signature_tags, verify
from pymaddy.dkim.keys import DKIMKeyError, dns_path_for, dns_record, load_key
from pymaddy.mail.message import Body, Header, MsgMeta
from pymaddy.modify.dkim import DKIMSigner, fields_to_sign
from pymaddy.runtime.module import ModuleError
from tests.runtime_helpers import MemoryOutput
from tests.unit.test_dkim_helpers import MESSAGE, build, join_message, split_message

DATA = Path(__file__).resolve().parents[1] / "data" / "dkim"


def signer(tmp: Path, body: str, *, inline: str = "") -> tuple[DKIMSigner, MemoryOutput]:
    """Inline arguments only exist on inline use (`dkim DOMAIN… SELECTOR` in a modifiers block)."""
    text = f"modifiers m {{\n  dkim {inline} {{\n{body}\n  }}\n}}\n" if inline else f"modify.dkim {{\n{body}\n}}\n"
    return build(text, tmp, "modify.dkim", DKIMSigner)


async def sign_msg(
    mod: DKIMSigner, sender: str | None, raw: bytes = MESSAGE, meta: MsgMeta | None = None
) -> tuple[Header, Body]:
    st = await mod.state_for_msg(meta or MsgMeta())
    if sender is not None:
        assert await st.rewrite_sender(sender) == sender
    header, body = split_message(raw)
    await st.rewrite_body(header, body)
    return header, body


def lookup_for(records: dict[str, str]) -> TXTLookup:
    async def txt(name: str) -> list[str]:
        return [records[name]]

    return txt


def verify_with(header: Header, body: Body, records: dict[str, str]) -> list[Verification]:
    return asyncio.run(verify(header, body, lookup_for(records)))


def sig_tags(header: Header) -> dict[str, str]:
    value = header.get("DKIM-Signature")
    assert value is not None
    return {k: re.sub(r"\s+", "", v) for k, v in signature_tags(value).items()}


# -- first start ------------------------------------------------------------------------------


def test_first_start_writes_rsa2048_key_and_dns_record(tmp_path: Path) -> None:
    mod, out = signer(tmp_path, "", inline="example.org default")
    asyncio.run(mod.start())
    key_file = tmp_path / "dkim_keys" / "example.org_default.key"
    dns_file = tmp_path / "dkim_keys" / "example.org_default.dns"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    pem = key_file.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n") and pem.endswith(b"-----END PRIVATE KEY-----\n")
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048

    record = dns_file.read_text()
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert record == "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode()  # exact, no newline
    assert out.lines == [
        "modify.dkim: generating a new rsa2048 keypair...\t",
        "modify.dkim: generated a new rsa2048 keypair, private key is in dkim_keys/example.org_default.key, "
        "TXT record with public key is in dkim_keys/example.org_default.dns, put its contents into TXT record "
        "for default._domainkey.example.org to make signing and verification work\t",
    ]

    # The published record verifies what the module signs.
    header, body = asyncio.run(sign_msg(mod, "alice@example.org"))
    [v] = verify_with(header, body, {"default._domainkey.example.org": record})
    assert v.err is None and v.domain == "example.org"

    # A second start loads the same key and generates nothing.
    mod2, out2 = signer(tmp_path, "", inline="example.org default")
    asyncio.run(mod2.start())
    assert out2.lines == []
    assert key_file.read_bytes() == pem and dns_file.read_text() == record


def test_first_start_ed25519_and_each_domain(tmp_path: Path) -> None:
    mod, _ = signer(tmp_path, "newkey_algo ed25519", inline="example.org example.com sel")
    asyncio.run(mod.start())
    for domain in ("example.org", "example.com"):
        key = load_key(str(tmp_path / "dkim_keys" / f"{domain}_sel.key"))
        assert isinstance(key.key, ed25519.Ed25519PrivateKey)
        record = (tmp_path / "dkim_keys" / f"{domain}_sel.dns").read_text()
        raw = key.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert record == "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()
        assert len(base64.b64decode(record.split("p=")[1])) == 32


def test_key_path_placeholders_and_dns_path(tmp_path: Path) -> None:
    body = "domains example.org\nselector s1\nkey_path keys/{selector}-{domain}.pem\nnewkey_algo ed25519"
    mod, out = signer(tmp_path, body)
    asyncio.run(mod.start())
    assert (tmp_path / "keys" / "s1-example.org.pem").exists()
    assert (tmp_path / "keys" / "s1-example.org.pem.dns").read_text().startswith("v=DKIM1; k=ed25519; p=")
    assert "TXT record with public key is in keys/s1-example.org.pem.dns" in out.lines[-1]
    assert dns_path_for("a/b.key") == "a/b.dns" and dns_path_for("a/b.pem") == "a/b.pem.dns"


def test_absolute_key_path(tmp_path: Path) -> None:
    path = tmp_path / "abs" / "{domain}.key"
    mod, _ = signer(tmp_path / "state", f"key_path {path}\nnewkey_algo ed25519", inline="example.org s")
    asyncio.run(mod.start())
    assert (tmp_path / "abs" / "example.org.key").exists()
    assert (tmp_path / "abs" / "example.org.dns").exists()


# -- existing key files ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("rsa2048-pkcs8", rsa.RSAPrivateKey),
        ("rsa2048-pkcs1", rsa.RSAPrivateKey),
        ("ed25519-pkcs8", ed25519.Ed25519PrivateKey),
    ],
)
def test_existing_keys_load_unchanged(tmp_path: Path, name: str, kind: type) -> None:
    keys = tmp_path / "dkim_keys"
    keys.mkdir()
    shutil.copy(DATA / f"{name}.key", keys / "example.org_default.key")
    before = (keys / "example.org_default.key").read_bytes()
    mod, out = signer(tmp_path, "", inline="example.org default")
    asyncio.run(mod.start())
    assert out.lines == []
    assert (keys / "example.org_default.key").read_bytes() == before
    assert not (keys / "example.org_default.dns").exists()
    key = mod.signers["example.org"]
    assert isinstance(key.key, kind)
    p = (DATA / f"{name}.pub.b64").read_text().strip()
    assert dns_record(key).endswith("; p=" + p)

    header, body = asyncio.run(sign_msg(mod, "alice@example.org"))
    [v] = verify_with(header, body, {"default._domainkey.example.org": dns_record(key)})
    assert v.err is None


def test_unusable_key_files(tmp_path: Path) -> None:
    keys = tmp_path / "dkim_keys"
    keys.mkdir()
    shutil.copy(DATA / "ecdsa-p256.key", keys / "example.org_default.key")
    mod, _ = signer(tmp_path, "", inline="example.org default")
    with pytest.raises(
        ModuleError, match=r"modify.dkim: dkim_keys/example.org_default.key: ECDSA keys are not supported"
    ):
        asyncio.run(mod.start())

    (keys / "example.org_default.key").write_text("not a key\n")
    mod, _ = signer(tmp_path, "", inline="example.org default")
    with pytest.raises(ModuleError, match=r"dkim_keys/example.org_default.key: invalid PEM block"):
        asyncio.run(mod.start())

    (keys / "example.org_default.key").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(DKIMKeyError, match="not a private key or unsupported format"):
        load_key(str(keys / "example.org_default.key"))


def test_key_file_errors_at_start(tmp_path: Path) -> None:
    (tmp_path / "dkim_keys").write_text("a file, not a directory")
    mod, _ = signer(tmp_path, "", inline="example.org default")
    with pytest.raises(ModuleError, match=r"^modify.dkim: dkim_keys/example.org_default.key: Not a directory$"):
        asyncio.run(mod.start())

    (tmp_path / "dkim_keys").unlink()
    (tmp_path / "dkim_keys" / "example.org_default.dns").mkdir(parents=True)  # cannot be written
    mod, _ = signer(tmp_path, "", inline="example.org default")
    with pytest.raises(ModuleError, match=r"^modify.dkim: generate dkim_keys/example.org_default.key: "):
        asyncio.run(mod.start())
    assert not (tmp_path / "dkim_keys" / "example.org_default.key").exists()


# -- what is signed -------------------------------------------------------------------------


def test_fields_to_sign_oversigns_and_dedups() -> None:
    header = Header.parse(b"From: a@x\r\nTo: b@y\r\nTo: c@y\r\nList-Id: <l>\r\nX-Other: 1\r\n")
    got = fields_to_sign(header, ["From", "To", "Subject", "from"], ["List-Id", "Resent-To", "TO"])
    assert got == ["From", "From", "To", "To", "To", "Subject", "List-Id"]


def test_default_signature_tags(tmp_path: Path) -> None:
    shutil.copytree(DATA, tmp_path / "keys")
    mod, _ = signer(tmp_path, "key_path keys/rsa2048-pkcs8.key", inline="example.org default")
    asyncio.run(mod.start())
    header, _ = asyncio.run(sign_msg(mod, "alice@example.org"))
    assert next(iter(header))[0] == "DKIM-Signature"  # prepended
    tags = sig_tags(header)
    assert tags["v"] == "1" and tags["a"] == "rsa-sha256" and tags["c"] == "relaxed/relaxed"
    assert tags["d"] == "example.org" and tags["s"] == "default" and tags["i"] == "@example.org"
    assert int(tags["x"]) - int(tags["t"]) == 120 * 3600
    # Oversigned fields appear once more than present; sign_fields only when present.
    assert tags["h"].split(":") == [
        "Subject", "Subject", "Sender", "To", "To", "Cc", "From", "From", "Date", "Date",
        "MIME-Version", "MIME-Version", "Content-Type", "Content-Type", "Content-Transfer-Encoding",
        "Reply-To", "In-Reply-To", "Message-Id", "Message-Id", "References", "Autocrypt", "Openpgp",
    ]  # fmt: skip


def test_options_change_the_signature(tmp_path: Path) -> None:
    shutil.copytree(DATA, tmp_path / "keys")
    body = (
        "key_path keys/ed25519-pkcs8.key\nheader_canon simple\nbody_canon simple\nsig_expiry 0\n"
        "oversign_fields From\nsign_fields Subject X-Missing"
    )
    mod, _ = signer(tmp_path, body, inline="example.org default")
    asyncio.run(mod.start())
    header, body_ = asyncio.run(sign_msg(mod, "alice@example.org"))
    tags = sig_tags(header)
    assert tags["a"] == "ed25519-sha256" and tags["c"] == "simple/simple" and "x" not in tags
    assert tags["h"] == "From:From:Subject"
    [v] = verify_with(header, body_, {"default._domainkey.example.org": dns_record(mod.signers["example.org"])})
    assert v.err is None


def test_key_chosen_by_envelope_sender(tmp_path: Path) -> None:
    mod, out = signer(tmp_path, "newkey_algo ed25519", inline="example.org example.com sel")
    asyncio.run(mod.start())
    out.lines.clear()
    for sender, domain in [
        ("alice@example.com", "example.com"),
        ("Bob@EXAMPLE.ORG", "EXAMPLE.ORG"),  # found case-insensitively, signed as written
        ("", "example.org"),  # null sender: first domain
        ("postmaster", "example.org"),
    ]:
        header, _ = asyncio.run(sign_msg(mod, sender))
        tags = sig_tags(header)
        assert (tags["d"], tags["i"]) == (domain, "@" + domain), sender
    # From says example.org, envelope says example.net: no key, not signed.
    header, _ = asyncio.run(sign_msg(mod, "alice@example.net"))
    assert header.get("DKIM-Signature") is None
    assert out.lines == ['modify.dkim: no key for domain\t{"domain":"example.net"}']


def test_sender_fallback_without_rewrite_sender(tmp_path: Path) -> None:
    """A destination-block modifier never sees rewrite_sender here: MAIL FROM as received is used."""
    mod, _ = signer(tmp_path, "newkey_algo ed25519", inline="example.org example.com sel")
    asyncio.run(mod.start())
    header, _ = asyncio.run(sign_msg(mod, None, meta=MsgMeta(original_from="x@example.com")))
    assert sig_tags(header)["d"] == "example.com"


def test_sign_subdomains(tmp_path: Path) -> None:
    mod, _ = signer(tmp_path, "sign_subdomains yes\nnewkey_algo ed25519", inline="example.org sel")
    asyncio.run(mod.start())
    header, _ = asyncio.run(sign_msg(mod, "alice@mail.example.org"))
    assert sig_tags(header)["d"] == "example.org"
    header, _ = asyncio.run(sign_msg(mod, "alice@notexample.org"))
    assert header.get("DKIM-Signature") is None


def test_idn_domain_a_labels_unless_smtputf8(tmp_path: Path) -> None:
    mod, _ = signer(tmp_path, "newkey_algo ed25519", inline="пример.рф sel")
    asyncio.run(mod.start())
    assert (tmp_path / "dkim_keys" / "пример.рф_sel.key").exists()
    header, _ = asyncio.run(sign_msg(mod, "user@пример.рф"))
    assert sig_tags(header)["d"] == "xn--e1afmkfd.xn--p1ai"
    header, _ = asyncio.run(sign_msg(mod, "user@xn--e1afmkfd.xn--p1ai"))
    assert sig_tags(header)["d"] == "xn--e1afmkfd.xn--p1ai"
    header, _ = asyncio.run(sign_msg(mod, "user@пример.рф", meta=MsgMeta(smtputf8=True)))
    assert sig_tags(header)["d"] == "пример.рф"


@pytest.mark.parametrize("canon", ["relaxed", "simple"])
def test_dkimpy_verifies_pymaddy_rsa(tmp_path: Path, canon: str) -> None:
    """An independent verifier (dkimpy, its DNS answered by a dnsfunc) accepts the signature."""
    mod, _ = signer(tmp_path, f"header_canon {canon}\nbody_canon {canon}", inline="example.org default")
    asyncio.run(mod.start())
    record = (tmp_path / "dkim_keys" / "example.org_default.dns").read_text()
    header, body = asyncio.run(sign_msg(mod, "alice@example.org"))
    raw = join_message(header, body)
    asked: list[bytes] = []

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        asked.append(name)
        return record.encode()

    assert dkimpy.verify(raw, dnsfunc=dnsfunc)
    assert asked == [b"default._domainkey.example.org."]
    assert not dkimpy.verify(raw.replace(b"noon", b"nine"), dnsfunc=dnsfunc)


def test_spooled_body_is_signed_streaming(tmp_path: Path) -> None:
    mod, _ = signer(tmp_path, "", inline="example.org default")
    asyncio.run(mod.start())
    record = (tmp_path / "dkim_keys" / "example.org_default.dns").read_text()
    big = b"".join(b"line %d \t with  spaces\r\n" % i for i in range(200_000)) + b"\r\n\r\n"
    spool = tmp_path / "spool"
    spool.write_bytes(big)
    header, _ = split_message(MESSAGE)
    st = asyncio.run(mod.state_for_msg(MsgMeta()))
    body = Body(path=str(spool))

    async def go() -> None:
        await st.rewrite_sender("a@example.org")
        await st.rewrite_body(header, body)

    asyncio.run(go())
    raw = header.to_bytes() + b"\r\n" + big
    assert dkimpy.verify(raw, dnsfunc=lambda name, timeout=5: record.encode())
    assert os.path.exists(spool)
