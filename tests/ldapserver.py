"""A real OpenLDAP slapd on a free loopback port, shaped like an LLDAP directory, for tests and benches.

Debian's slapd runs in the foreground with a generated slapd.conf (`-f`) and an
mdb database in a temporary directory:

    dc=example,dc=org
      ou=people     uid=NAME entries (person/inetOrgPerson, mail, userPassword {SSHA})
      ou=groups

The admin (`cn=admin,ou=people,dc=example,dc=org`, ADMIN_PASSWORD) is the
rootdn. Anonymous clients may only bind; bound ones read everything but
userPassword. `ldaps=True` also listens on ldaps:// with a certificate for
127.0.0.1/localhost from a test CA (`ca_file`), which also serves STARTTLS, and
accepts the client certificate `client_cert`/`client_key` for SASL EXTERNAL
(bound as the admin).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pymaddy.auth.ldapescape import escape_dn_value
from tests.e2e.harness import free_port

BASE_DN = "dc=example,dc=org"
PEOPLE_DN = f"ou=people,{BASE_DN}"
ADMIN_DN = f"cn=admin,{PEOPLE_DN}"
ADMIN_PASSWORD = "admin-secret"
CLIENT_CN = "bindsvc"
SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")


def available() -> bool:
    return os.path.exists(SLAPD) and (SCHEMA_DIR / "inetorgperson.schema").exists()


def ssha(password: str) -> str:
    """An RFC 2307 `{SSHA}` userPassword value (what slappasswd writes)."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def _ldif_value(v: str) -> str:
    # LDIF (RFC 2849): base64 for anything that is not plain safe ASCII.
    if v and all(0x20 <= ord(c) < 0x7F for c in v) and v[0] not in " :<" and v[-1] != " ":
        return f" {v}"
    return ": " + base64.b64encode(v.encode()).decode()


def _pki(dir_: Path) -> None:
    """ca.pem/ca-key.pem, a server certificate for 127.0.0.1/localhost and a client certificate
    (CN=bindsvc, for SASL EXTERNAL), all under dir_."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        (dir_ / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (dir_ / f"{stem}-key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    def builder(cn: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30)))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pymaddy test LDAP CA")])
    ca = (builder("pymaddy test LDAP CA", ca_name, ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    write("ca", ca, ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    server = (builder("localhost", ca_name, key)
              .add_extension(x509.SubjectAlternativeName([
                  x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    write("server", server, key)
    key = ec.generate_private_key(ec.SECP256R1())
    client = (builder(CLIENT_CN, ca_name, key)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    write("client", client, key)


class LDAPServer:
    """One slapd process; `stop()`/`start()` keep the database, so users survive a restart."""

    def __init__(self, dir_: Path, *, ldaps: bool = False) -> None:
        self.dir = dir_
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "db").mkdir(exist_ok=True)
        self.port = free_port()
        self.ldaps_port = free_port() if ldaps else 0
        self.ca_file: Path | None = None
        self.client_cert: Path | None = None
        self.client_key: Path | None = None
        tls_lines = ""
        if ldaps:
            _pki(self.dir)
            self.ca_file = self.dir / "ca.pem"
            self.client_cert, self.client_key = self.dir / "client.pem", self.dir / "client-key.pem"
            # TLSVerifyClient allow: a client certificate is optional, and when given, its subject
            # is the SASL EXTERNAL identity, mapped to the admin (RFC 4513 §5.2.3).
            tls_lines = (f"TLSCACertificateFile {self.ca_file}\nTLSCertificateFile {self.dir}/server.pem\n"
                         f"TLSCertificateKeyFile {self.dir}/server-key.pem\nTLSVerifyClient allow\n"
                         f'authz-regexp "^cn={CLIENT_CN}$" "{ADMIN_DN}"\n')
        self.conf = self.dir / "slapd.conf"
        self.conf.write_text(
            "".join(f"include {SCHEMA_DIR / s}.schema\n" for s in ("core", "cosine", "inetorgperson"))
            + f"modulepath {MODULE_DIR}\nmoduleload back_mdb\n"
            + f"pidfile {self.dir}/slapd.pid\n"
            + tls_lines
            + "database mdb\n"
            + f'suffix "{BASE_DN}"\nrootdn "{ADMIN_DN}"\nrootpw {ADMIN_PASSWORD}\n'
            + f"directory {self.dir}/db\nmaxsize 16777216\n"
            + "index objectClass eq\nindex uid,mail eq\n"
            + "access to attrs=userPassword by self write by anonymous auth by * none\n"
            + "access to * by users read by anonymous auth\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._seed()

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    def _seed(self) -> None:
        ldif = (
            f"dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n"
            f"dn: {PEOPLE_DN}\nobjectClass: organizationalUnit\nou: people\n\n"
            f"dn: ou=groups,{BASE_DN}\nobjectClass: organizationalUnit\nou: groups\n\n"
        )
        subprocess.run([shutil.which("slapadd") or "/usr/sbin/slapadd", "-q", "-f", str(self.conf)],
                       input=ldif.encode(), check=True, capture_output=True, timeout=30)

    def start(self, timeout: float = 15.0) -> LDAPServer:
        urls = self.url + "/" + (f" ldaps://127.0.0.1:{self.ldaps_port}/" if self.ldaps_port else "")
        # -d 0: stay in the foreground (no fork) so the process can be stopped by its id.
        self.proc = subprocess.Popen([SLAPD, "-d", "0", "-f", str(self.conf), "-h", urls],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"slapd exited with {self.proc.returncode}: {err[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("slapd did not start listening") from None
                time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)
        if p.stderr:
            p.stderr.close()

    def restart(self) -> None:
        """A new slapd on the same port and database (connections of the old one are gone)."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LDAPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- directory content (ldapmodify as the admin) ----------------------------------------------------

    def _ldapmodify(self, ldif: str, *args: str) -> None:
        cmd = [shutil.which("ldapmodify") or "/usr/bin/ldapmodify", "-x", "-H", self.url, "-D", ADMIN_DN,
               "-w", ADMIN_PASSWORD, *args]
        r = subprocess.run(cmd, check=False, input=ldif.encode(), capture_output=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"ldapmodify failed: {r.stderr.decode(errors='replace')}")

    @staticmethod
    def user_dn(uid: str) -> str:
        return f"uid={escape_dn_value(uid)},{PEOPLE_DN}"

    def add_user(self, uid: str, password: str, mail: str | None = None, **extra: str) -> str:
        """An LLDAP-style user entry; returns its DN."""
        dn = self.user_dn(uid)
        attrs = [("objectClass", "person"), ("objectClass", "inetOrgPerson"), ("uid", uid), ("cn", uid),
                 ("sn", uid), ("userPassword", ssha(password))]
        if mail:
            attrs.append(("mail", mail))
        attrs += list(extra.items())
        ldif = f"dn:{_ldif_value(dn)}\nchangetype: add\n" + "".join(f"{k}:{_ldif_value(v)}\n" for k, v in attrs)
        self._ldapmodify(ldif)
        return dn

    def add_users(self, users: dict[str, str], domain: str = "example.org") -> None:
        """Many users at once (uid → password; mail uid@domain)."""
        ldif = ""
        for uid, pw in users.items():
            ldif += (f"dn: {self.user_dn(uid)}\nchangetype: add\nobjectClass: person\nobjectClass: inetOrgPerson\n"
                     f"uid: {uid}\ncn: {uid}\nsn: {uid}\nmail: {uid}@{domain}\nuserPassword: {ssha(pw)}\n\n")
        self._ldapmodify(ldif)

    def delete_user(self, uid: str) -> None:
        self._ldapmodify(f"dn:{_ldif_value(self.user_dn(uid))}\nchangetype: delete\n")
