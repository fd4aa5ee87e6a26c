"""IMAP protocol transcripts against the real server: exact untagged and tagged replies per command.

One server (the scenario config of scenario_helpers: imap on tls:// and tcp://
with STARTTLS, auth against the credentials db, storage.imapsql) serves the
whole module; every test uses its own account so tests don't see each other.
"""

from __future__ import annotations

import re
import smtplib
import sqlite3
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Server, wait_until
from tests.e2e.imap_helpers import Transcript, message
from tests.e2e.scenario_helpers import MailEnv, make_env

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MailEnv, Server]]:
    tmp: Path = tmp_path_factory.mktemp("imap")
    e = make_env(tmp)
    srv = e.server().started()
    try:
        yield e, srv
    finally:
        srv.close()


_counter = iter(range(1, 10_000))


def new_user(e: MailEnv, password: str = "pw-imap-1") -> str:
    """A fresh account with credentials (the IMAP account is created at first login)."""
    user = f"u{next(_counter)}@example.org"
    r = e.cli("creds", "create", "-p", password, user)
    assert r.returncode == 0, r.stderr
    return user


def session(e: MailEnv, user: str, password: str = "pw-imap-1") -> Transcript:
    t = Transcript(e.ports["imaps"], tls=True)
    t.login(user, password)
    return t


def test_greeting_and_capabilities_before_and_after_starttls(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    with Transcript(e.ports["imap"]) as t:
        assert t.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
        caps = t.cmd("CAPABILITY")
        line = caps.lines("* CAPABILITY")[0].split()
        assert "STARTTLS" in line and "LOGINDISABLED" in line and "AUTH=PLAIN" not in line
        # Plaintext login is refused (no insecure_auth, TLS configured).
        r = t.cmd('LOGIN "a@example.org" "x"')
        assert r.status == "NO" and b"PRIVACYREQUIRED" in r.tagged
        t.starttls()
        line = t.cmd("CAPABILITY").lines("* CAPABILITY")[0].split()
        assert "STARTTLS" not in line and "AUTH=PLAIN" in line and "LOGINDISABLED" not in line
        for cap in ("IDLE", "MOVE", "UIDPLUS", "LITERAL+", "SASL-IR", "NAMESPACE", "CONDSTORE", "SPECIAL-USE",
                    "SORT", "THREAD=REFERENCES", "COMPRESS=DEFLATE", "QUOTA"):
            assert cap in line
        assert t.cmd("LOGOUT").lines("* BYE")


def test_login_failure_and_auth_plain_with_sasl_ir(env: tuple[MailEnv, Server]) -> None:
    import base64

    e, srv = env
    user = new_user(e)
    with Transcript(e.ports["imaps"], tls=True) as t:
        r = t.cmd(f'LOGIN "{user}" "wrong"')
        assert r.status == "NO" and b"[AUTHENTICATIONFAILED]" in r.tagged
        # The fail2ban filter matches this line.
        srv.wait_for(f'"username":"{user}"')
        ir = base64.b64encode(f"\0{user}\0pw-imap-1".encode()).decode()
        r = t.cmd(f"AUTHENTICATE PLAIN {ir}")
        assert r.ok, r.text()
        assert t.cmd("LOGIN a b").status == "BAD"  # already authenticated


def test_select_empty_inbox_gives_six_untagged_lines(env: tuple[MailEnv, Server]) -> None:
    # maddy's TestIMAPEndpointAuthMap counts them: FLAGS, EXISTS, RECENT, PERMANENTFLAGS, UIDNEXT, UIDVALIDITY.
    e, _ = env
    with session(e, new_user(e)) as t:
        r = t.cmd("SELECT INBOX")
        assert r.ok and b"[READ-WRITE]" in r.tagged
        assert len(r.untagged) == 6, r.text()
        assert r.untagged[1] == b"* 0 EXISTS" and r.untagged[2] == b"* 0 RECENT"
        assert r.untagged[0].startswith(b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft")


def test_delivered_mail_appears_with_delivery_headers(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    user = new_user(e)
    with session(e, user) as t:
        assert len(t.cmd("SELECT INBOX").untagged) == 6
        with smtplib.SMTP("127.0.0.1", e.ports["mx"], timeout=10) as s:
            s.sendmail("sender@example.net", [user], message("Delivered", to=user))
        wait_until(lambda: b"* 1 EXISTS" in b"\n".join(t.cmd("NOOP").untagged), what="EXISTS after delivery")
        r = t.cmd("FETCH 1 (FLAGS BODY.PEEK[])")
        body = r.untagged[0]
        assert body.startswith(b"* 1 FETCH (FLAGS () BODY[] {")
        text = body.split(b"}\r\n", 1)[1]
        assert text.startswith(f"Delivered-To: {user}\r\nReturn-Path: <sender@example.net>\r\nReceived: ".encode())
        assert text.endswith(b"Hello, world!\r\n)")
        # After SELECT with one unseen message there is an UNSEEN line too (7 untagged).
        r = t.cmd("SELECT INBOX")
        assert len(r.untagged) == 7 and b"* OK [UNSEEN 1]" in r.untagged[3], r.text()


def test_header_fields_of_a_new_message_in_a_reused_row(env: tuple[MailEnv, Server]) -> None:
    """SQLite gives the last row's id to the next message after an EXPUNGE: HEADER.FIELDS answers
    (cached per message) must be the new message's."""
    e, _ = env
    with session(e, new_user(e)) as t:
        t.cmd("SELECT INBOX")
        for subject in ("First", "Second"):
            assert t.cmd("APPEND INBOX", message(subject)).ok
            r = t.cmd("UID FETCH * (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            want = f"{{{len(subject) + 13}}}\r\nSubject: {subject}\r\n\r\n)".encode()
            assert r.untagged[-1].endswith(want), r.untagged
            assert t.cmd("STORE 1:* +FLAGS.SILENT (\\Deleted)").ok and t.cmd("EXPUNGE").ok


def test_header_search_on_messages_stored_before_the_search_columns(env: tuple[MailEnv, Server]) -> None:
    """Rows from before schema v5 have no search columns: the first header SEARCH fills them in."""
    e, _ = env
    user = new_user(e)
    with session(e, user) as t:
        t.cmd("SELECT INBOX")
        t.cmd("APPEND INBOX", message("Quarterly report", frm="alice@example.net"))
        t.cmd("APPEND INBOX", message("=?utf-8?q?Stra=C3=9Fe?= works", frm="bob@example.net",
                                      extra="Cc: =?utf-8?q?J=C3=BCrgen?= <j@example.net>\r\n"))
        t.cmd("APPEND INBOX", message("Lunch", frm="carol@example.net", to="ALICE@example.org"))
        conn = sqlite3.connect(e.state / "imapsql.db")
        with conn:
            conn.execute("UPDATE messages SET s_from = NULL, s_to = NULL, s_cc = NULL, s_bcc = NULL, "
                         "s_subject = NULL WHERE mailbox_id IN (SELECT m.id FROM mailboxes m JOIN accounts a "
                         "ON a.id = m.account_id WHERE a.name = ?)", (user,))
        conn.close()
        assert t.cmd('SEARCH FROM "BOB@"').untagged == [b"* SEARCH 2"]
        assert t.cmd('SEARCH OR TO alice SUBJECT STRASSE').untagged == [b"* SEARCH 2 3"]
        assert t.cmd('SEARCH CHARSET UTF-8 CC "jürgen"'.encode()).untagged == [b"* SEARCH 2"]
        assert t.cmd('SEARCH NOT BCC ""').untagged == [b"* SEARCH 1 2 3"]
        assert t.cmd('UID SEARCH HEADER Subject "report" SEEN').untagged == [b"* SEARCH"]
    conn = sqlite3.connect(e.state / "imapsql.db")
    left = conn.execute("SELECT count(*) FROM messages WHERE s_subject IS NULL").fetchone()[0]
    conn.close()
    assert left == 0


def test_append_fetch_store_search_expunge(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    with session(e, new_user(e)) as t:
        t.cmd("SELECT INBOX")
        r = t.cmd('APPEND INBOX (\\Flagged $Work) "05-Nov-2026 14:05:06 +0100"', message("One"))
        m = re.search(rb"\[APPENDUID (\d+) 1\]", r.tagged)
        assert r.ok and m, r.text()
        uidvalidity = int(m.group(1))
        r = t.cmd("APPEND INBOX", message("Two", body="second body\r\n"))
        assert r.ok and b"* 2 EXISTS" in r.untagged  # appending to the selected mailbox announces it
        r = t.cmd("FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE)")
        assert r.untagged[0].startswith(
            b'* 1 FETCH (UID 1 FLAGS ($Work \\Flagged) INTERNALDATE "05-Nov-2026 13:05:06 +0000" RFC822.SIZE ')
        r = t.cmd("FETCH 2 (ENVELOPE)")
        assert b'"Mon, 23 Nov 2026 10:00:00 +0000" "Two" (("Alice" NIL "alice" "example.net"))' in r.untagged[0]
        r = t.cmd("FETCH 2 (BODY[HEADER.FIELDS (SUBJECT)] BODY[TEXT]<0.6>)")
        # BODY[TEXT] is not a peek: it sets \Seen and the reply says so.
        assert r.untagged == [b"* 2 FETCH (BODY[HEADER.FIELDS (SUBJECT)] {16}\r\nSubject: Two\r\n\r\n "
                              b"BODY[TEXT]<0> {6}\r\nsecond FLAGS (\\Seen))"]
        r = t.cmd("STORE 1 +FLAGS (\\Deleted)")
        assert r.untagged == [b"* 1 FETCH (FLAGS ($Work \\Deleted \\Flagged))"]
        assert t.cmd("STORE 1:2 -FLAGS.SILENT (\\Flagged)").untagged == []
        assert t.cmd("SEARCH DELETED").untagged == [b"* SEARCH 1"]
        assert t.cmd("SEARCH SUBJECT two").untagged == [b"* SEARCH 2"]
        assert t.cmd("UID SEARCH BODY second").untagged == [b"* SEARCH 2"]
        assert t.cmd("SEARCH OR SEEN KEYWORD $Work").untagged == [b"* SEARCH 1 2"]
        assert t.cmd("SEARCH NOT SEEN SINCE 1-Nov-2026").untagged == [b"* SEARCH 1"]
        assert t.cmd("SEARCH CHARSET X-UNKNOWN TEXT x").status == "NO"
        r = t.cmd("EXPUNGE")
        assert r.untagged == [b"* 1 EXPUNGE"] and r.ok
        r = t.cmd("UID FETCH 2 (UID)")
        assert r.untagged == [b"* 1 FETCH (UID 2)"]
        r = t.cmd("STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY UNSEEN)")
        assert r.untagged == [f"* STATUS INBOX (MESSAGES 1 UIDNEXT 3 UIDVALIDITY {uidvalidity} UNSEEN 0)".encode()]


def test_copy_move_with_uidplus_and_trycreate(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    with session(e, new_user(e)) as t:
        for i in range(3):
            t.cmd("APPEND INBOX", message(f"m{i}"))
        t.cmd("SELECT INBOX")
        assert b"[TRYCREATE]" in t.cmd("COPY 1 Nowhere").tagged
        assert t.cmd("CREATE Archive.2026").ok
        r = t.cmd("COPY 1:2 Archive.2026")
        assert re.search(rb"\[COPYUID \d+ 1:2 1:2\] COPY completed", r.tagged), r.text()
        r = t.cmd("UID MOVE 3 Archive.2026")
        assert re.match(rb"\* OK \[COPYUID \d+ 3 3\]", r.untagged[0]), r.text()
        assert r.untagged[1:] == [b"* 3 EXPUNGE"] and r.ok
        r = t.cmd("STATUS Archive.2026 (MESSAGES)")
        assert r.untagged == [b"* STATUS Archive.2026 (MESSAGES 3)"]


def test_list_create_rename_delete_subscribe(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    with session(e, new_user(e)) as t:
        assert t.cmd('LIST "" ""').untagged == [b'* LIST (\\Noselect) "." ""']
        assert t.cmd("CREATE Work.Projects.").ok  # trailing delimiter, missing parent created too
        assert b"ALREADYEXISTS" in t.cmd("CREATE Work").tagged
        assert t.cmd("CREATE Entw&APw-rfe").ok  # modified UTF-7: Entwürfe
        r = t.cmd('LIST "" "*"')
        assert sorted(r.untagged) == sorted([
            b'* LIST (\\HasNoChildren) "." Entw&APw-rfe',
            b'* LIST (\\HasNoChildren) "." INBOX',
            b'* LIST (\\HasChildren) "." Work',
            b'* LIST (\\HasNoChildren) "." Work.Projects',
        ]), r.text()
        assert t.cmd('LIST "" "%"').untagged.count(b'* LIST (\\HasChildren) "." Work') == 1
        assert t.cmd('LIST "Work." "%"').untagged == [b'* LIST (\\HasNoChildren) "." Work.Projects']
        assert b"[INUSE]" in t.cmd("DELETE Work").tagged
        assert t.cmd("RENAME Work Job").ok
        assert t.cmd('LIST "" "Job*"').untagged == [b'* LIST (\\HasChildren) "." Job',
                                                   b'* LIST (\\HasNoChildren) "." Job.Projects']
        assert t.cmd("UNSUBSCRIBE Job").ok
        assert b'* LSUB (\\HasChildren) "." Job' not in t.cmd('LSUB "" "*"').untagged
        assert t.cmd("DELETE Job.Projects").ok and t.cmd("DELETE Job").ok
        assert b"[CANNOT]" in t.cmd("DELETE INBOX").tagged
        assert t.cmd("CREATE Sent (USE (\\Sent))").ok
        assert t.cmd('LIST "" "Sent"').untagged == [b'* LIST (\\HasNoChildren \\Sent) "." Sent']


def test_rename_inbox_moves_messages_and_keeps_inbox(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    with session(e, new_user(e)) as t:
        t.cmd("APPEND INBOX", message("old"))
        assert t.cmd("RENAME INBOX Old").ok
        assert t.cmd("STATUS INBOX (MESSAGES)").untagged == [b"* STATUS INBOX (MESSAGES 0)"]
        assert t.cmd("STATUS Old (MESSAGES)").untagged == [b"* STATUS Old (MESSAGES 1)"]


def test_two_sessions_see_each_others_changes_during_idle(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    user = new_user(e)
    with session(e, user) as a, session(e, user) as b:
        for i in range(2):
            a.cmd("APPEND INBOX", message(f"x{i}"))
        a.cmd("SELECT INBOX")
        b.cmd("SELECT INBOX")
        b.send(b"i1 IDLE\r\n")
        assert b.line() == b"+ idling"
        a.cmd("STORE 1 +FLAGS (\\Seen)")
        assert b.line() == b"* 1 FETCH (UID 1 FLAGS (\\Seen))"
        a.cmd("APPEND INBOX", message("x3"))
        assert b.line() == b"* 3 EXISTS"
        a.cmd("STORE 2 +FLAGS (\\Deleted)")
        assert b.line() == b"* 2 FETCH (UID 2 FLAGS (\\Deleted))"
        a.cmd("EXPUNGE")
        assert b.line() == b"* 2 EXPUNGE"
        b.send(b"DONE\r\n")
        assert b.until("i1").ok
        assert b.cmd("FETCH 1:* (UID)").untagged == [b"* 1 FETCH (UID 1)", b"* 2 FETCH (UID 3)"]


def test_expunge_is_not_announced_during_fetch_by_sequence_number(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    user = new_user(e)
    with session(e, user) as a, session(e, user) as b:
        for i in range(2):
            a.cmd("APPEND INBOX", message(f"y{i}"))
        a.cmd("SELECT INBOX")
        b.cmd("SELECT INBOX")
        a.cmd("STORE 1 +FLAGS.SILENT (\\Deleted)")
        a.cmd("EXPUNGE")
        r = b.cmd("FETCH 2 (UID)")  # RFC 3501 §7.4.1: no EXPUNGE here
        assert not any(x.endswith(b"EXPUNGE") for x in r.untagged) and b"* 2 FETCH (UID 2)" in r.untagged
        assert b"* 1 EXPUNGE" in b.cmd("NOOP").untagged


def test_isolation_between_accounts(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    alice, bob = new_user(e), new_user(e)
    with session(e, alice) as a:
        assert a.cmd("CREATE Secret").ok
        a.cmd("APPEND Secret", message("private"))
    with session(e, bob) as b:
        assert b"Secret" not in b"".join(b.cmd('LIST "" "*"').untagged)
        assert b.cmd("SELECT Secret").status == "NO"
        assert b.cmd("STATUS Secret (MESSAGES)").status == "NO"
        for name in ("../" + alice, "*", "%", "INBOX..x", ".x", "a\x01b"):
            r = b.cmd(f'CREATE "{name}"')
            assert r.status in ("NO", "BAD"), (name, r.text())
        b.cmd("SELECT INBOX")
        assert b"TRYCREATE" in b.cmd("COPY 1:* Secret").tagged or b.cmd("NOOP").ok
        assert b.cmd("NOOP").ok


def test_garbage_and_limits_get_bad_not_a_crash(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    with session(e, new_user(e)) as t:
        assert t.cmd("FROB").status == "BAD"
        assert t.cmd("FETCH 1 (FLAGS)").status == "BAD"  # no mailbox selected
        t.cmd("SELECT INBOX")
        assert t.cmd("FETCH 0 (FLAGS)").status == "BAD"
        assert t.cmd("FETCH 1 (" + "(" * 500 + ")").status == "BAD"
        assert t.cmd(b"SEARCH \x00").status == "BAD"
        # A huge synchronizing literal is refused before the client sends it.
        t.send(b"x1 LOGIN {99999999}\r\n")
        assert t.line().startswith(b"x1 BAD")
        # APPEND over the APPENDLIMIT (32 MiB default) is [TOOBIG] before the data is sent.
        t.send(b"x2 APPEND INBOX {40000000}\r\n")
        assert t.line() == b"x2 NO [TOOBIG] Message too big"
        # LITERAL+ of a normal size works.
        t.send(b"x3 APPEND INBOX {20+}\r\nSubject: hi\r\n\r\nbody!\r\n")
        assert b"APPENDUID" in t.until("x3").tagged
        assert t.cmd("NOOP").ok


def test_condstore_modseq_and_unchangedsince(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    with session(e, new_user(e)) as t:
        t.cmd("APPEND INBOX", message("c1"))
        t.cmd("APPEND INBOX", message("c2"))
        r = t.cmd("SELECT INBOX (CONDSTORE)")
        hms = int(re.search(rb"HIGHESTMODSEQ (\d+)", b"\n".join(r.untagged)).group(1))  # type: ignore[union-attr]
        r = t.cmd("STORE 1 +FLAGS (\\Seen)")
        ms = int(re.search(rb"MODSEQ \((\d+)\)", r.untagged[0]).group(1))  # type: ignore[union-attr]
        assert ms > hms
        r = t.cmd(f"FETCH 1:* (FLAGS) (CHANGEDSINCE {hms})")
        assert len(r.untagged) == 1 and r.untagged[0].startswith(b"* 1 FETCH (FLAGS (\\Seen) MODSEQ (")
        r = t.cmd(f"STORE 1,2 (UNCHANGEDSINCE {hms}) +FLAGS (\\Flagged)")
        assert b"[MODIFIED 1]" in r.tagged, r.text()


def test_sort_and_thread(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    with session(e, new_user(e)) as t:
        t.cmd("APPEND INBOX", message("Banana", extra="Message-ID: <a@x>\r\n"))
        t.cmd("APPEND INBOX", message("apple"))
        t.cmd("APPEND INBOX", message("Re: Banana", extra="In-Reply-To: <a@x>\r\nReferences: <a@x>\r\n"))
        t.cmd("SELECT INBOX")
        assert t.cmd("SORT (SUBJECT) UTF-8 ALL").untagged == [b"* SORT 2 1 3"]
        assert t.cmd("SORT (REVERSE SIZE) UTF-8 ALL").untagged[0].startswith(b"* SORT ")
        # Equal sent dates: threads in the order of their first message (RFC 5256 §3).
        r = t.cmd("THREAD ORDEREDSUBJECT UTF-8 ALL")
        assert r.untagged == [b"* THREAD (1 3)(2)"], r.text()
        assert t.cmd("UID THREAD REFERENCES UTF-8 ALL").untagged == [b"* THREAD (1 3)(2)"]


def test_namespace_id_enable_quota(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    user = new_user(e)
    with session(e, user) as t:
        assert t.cmd("NAMESPACE").untagged == [b'* NAMESPACE (("" ".")) NIL NIL']
        assert t.cmd('ID ("name" "test")').untagged[0].startswith(b'* ID ("name" "pymaddy"')
        assert t.cmd("ENABLE CONDSTORE").untagged == [b"* ENABLED CONDSTORE"]
        t.cmd("APPEND INBOX", message("q"))
        # No quota set: no quota root applies.
        assert t.cmd("GETQUOTAROOT INBOX").untagged == [b"* QUOTAROOT INBOX"]
        assert t.cmd('GETQUOTA ""').status == "NO"
        r0 = e.cli("imap-acct", "quota", user, "--value", "10K")
        assert r0.returncode == 0, r0.stderr
        r = t.cmd("GETQUOTAROOT INBOX")
        assert r.untagged == [b'* QUOTAROOT INBOX ""', b'* QUOTA "" (STORAGE 1 10)'], r.text()
        r = t.cmd("APPEND INBOX", message("big", body="x" * 20000))
        assert r.status == "NO" and b"[OVERQUOTA]" in r.tagged
        assert t.cmd("SETQUOTA \"\" (STORAGE 100)").status == "NO"


def test_compress_deflate(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    user = new_user(e)
    with session(e, user) as t:
        assert t.cmd("COMPRESS DEFLATE").ok
        comp = zlib.compressobj(6, zlib.DEFLATED, -15)
        dec = zlib.decompressobj(-15)
        t.send(comp.compress(b"c1 NOOP\r\nc2 CAPABILITY\r\n") + comp.flush(zlib.Z_SYNC_FLUSH))
        got = b""
        while b"c2 OK" not in got:
            got += dec.decompress(t.sock.recv(65536))
        assert b"c1 OK" in got and b"* CAPABILITY" in got and b"COMPRESS=DEFLATE" not in got


def test_cli_changes_reach_an_idle_session(env: tuple[MailEnv, Server]) -> None:
    # `pymaddy imap-msgs` runs in another process; its changes come through the update socket.
    e, _ = env
    user = new_user(e)
    with session(e, user) as t:
        t.cmd("SELECT INBOX")
        t.send(b"i1 IDLE\r\n")
        assert t.line() == b"+ idling"
        r = e.cli("imap-msgs", "add", "-f", "\\Flagged", user, "INBOX", input_=message("from cli").decode())
        assert r.returncode == 0 and r.stdout == "1\n", r.stderr
        assert t.line() == b"* 1 EXISTS"
        r = e.cli("imap-msgs", "add-flags", "-u", user, "INBOX", "1", "\\Seen")
        assert r.returncode == 0, r.stderr
        assert t.line() == b"* 1 FETCH (UID 1 FLAGS (\\Flagged \\Seen))"
        t.send(b"DONE\r\n")
        assert t.until("i1").ok


def test_random_garbage_never_kills_the_session(env: tuple[MailEnv, Server]) -> None:
    """Seeded random command lines (real verbs, broken arguments, stray literals): every one is answered
    with a tagged reply and the session, and the server, stay usable."""
    import random

    e, _ = env
    rng = random.Random(4242)
    verbs = ["FETCH", "UID FETCH", "STORE", "SEARCH", "UID SEARCH", "LIST", "SELECT", "COPY", "APPEND", "STATUS",
             "SORT", "THREAD", "CREATE", "RENAME", "EXPUNGE", "NOOP", "ENABLE", "ID", "GETQUOTAROOT"]
    pieces = ["1:*", "*", "0", "4294967296", "(", ")", "((((", "BODY[", "BODY[1.2.3.HEADER]", "<0.5>", '"a\\"',
              "INBOX", "\\Seen", "NIL", "{3}", "~{2}", "%", "*.*", "OR", "NOT", "CHARSET", "UTF-8", "\x7f", "é",
              "HEADER", "RFC822", "+FLAGS", "(UNCHANGEDSINCE 1)", "ALL", "1-Jan-2000", ""]
    with session(e, new_user(e)) as t:
        t.cmd("APPEND INBOX", message("fuzz"))
        t.cmd("SELECT INBOX")
        for i in range(300):
            line = rng.choice(verbs) + " " + " ".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
            line = line.replace("{3}", "").replace("~{2}", "")  # no literal markers: those wait for data
            tag = f"g{i}"
            t.send(f"{tag} {line}\r\n".encode())
            r = t.until(tag)
            assert r.status in ("OK", "NO", "BAD"), (line, r.text())
            if i % 10 == 9:
                assert t.cmd("NOOP").ok  # a good command resets the count of consecutive BADs
        assert t.cmd("NOOP").ok
        assert t.cmd("FETCH 1 (UID)").ok


def test_a_run_of_bad_commands_ends_the_session(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    with session(e, new_user(e)) as t:
        for i in range(20):
            assert t.cmd(f"FETCH x{i}").status == "BAD"
        t.send(b"last FROB\r\n")
        assert t.line() == b"last BAD Unknown command"
        assert t.line() == b"* BYE Too many invalid commands"


def test_examine_close_unselect_check_and_uid_expunge(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    with session(e, new_user(e)) as t:
        for i in range(4):
            t.cmd("APPEND INBOX (\\Deleted)" if i < 3 else "APPEND INBOX", message(f"e{i}"))
        r = t.cmd("EXAMINE INBOX")
        assert r.ok and b"[READ-ONLY]" in r.tagged
        assert b"* OK [PERMANENTFLAGS ()] Flags permitted" in r.untagged
        # Read-only: a body fetch does not set \Seen, STORE and EXPUNGE are refused.
        assert b"\\Seen" not in t.cmd("FETCH 4 (BODY[TEXT] FLAGS)").untagged[0]
        assert b"[READ-ONLY]" in t.cmd("STORE 4 +FLAGS (\\Seen)").tagged
        assert b"[READ-ONLY]" in t.cmd("EXPUNGE").tagged
        assert t.cmd("CLOSE").ok  # closing a read-only mailbox expunges nothing
        t.cmd("SELECT INBOX")
        assert t.cmd("CHECK").ok
        # UID EXPUNGE (UIDPLUS) removes only the named \Deleted messages.
        r = t.cmd("UID EXPUNGE 2:4")
        assert r.untagged == [b"* 2 EXPUNGE", b"* 2 EXPUNGE"], r.text()
        assert t.cmd("UNSELECT").ok
        assert t.cmd("FETCH 1 (UID)").status == "BAD"  # nothing selected any more
        assert t.cmd("STATUS INBOX (MESSAGES)").untagged == [b"* STATUS INBOX (MESSAGES 2)"]
        t.cmd("SELECT INBOX")
        assert t.cmd("CLOSE").ok  # read-write CLOSE expunges silently
        assert t.cmd("STATUS INBOX (MESSAGES)").untagged == [b"* STATUS INBOX (MESSAGES 1)"]


def test_rfc822_items_mime_parts_and_bodystructure(env: tuple[MailEnv, Server]) -> None:
    e, _ = env
    mixed = (b"Subject: parts\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=xx\r\n\r\n"
             b"preamble\r\n--xx\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nfirst part\r\n"
             b"--xx\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
             b"<b>second</b>\r\n--xx--\r\n")
    with session(e, new_user(e)) as t:
        t.cmd("APPEND INBOX", mixed)
        t.cmd("SELECT INBOX")
        r = t.cmd("FETCH 1 (RFC822.SIZE RFC822.HEADER)")
        assert r.untagged[0] == (b"* 1 FETCH (RFC822.SIZE %d RFC822.HEADER {%d}\r\n" % (len(mixed), 81)
                                 + mixed[:81] + b")")
        r = t.cmd("FETCH 1 (BODY.PEEK[1] BODY.PEEK[2.MIME] BODY.PEEK[2]<3.6>)")
        assert r.untagged[0] == (b"* 1 FETCH (BODY[1] {10}\r\nfirst part BODY[2.MIME] {72}\r\n"
                                 b"Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
                                 b" BODY[2]<3> {6}\r\nsecond)")
        r = t.cmd("FETCH 1 (BODYSTRUCTURE)")
        assert r.untagged[0] == (
            b'* 1 FETCH (BODYSTRUCTURE (("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 10 1 NIL NIL NIL NIL)'
            b'("TEXT" "HTML" ("CHARSET" "us-ascii") NIL NIL "QUOTED-PRINTABLE" 13 1 NIL NIL NIL NIL)'
            b' "MIXED" ("BOUNDARY" "xx") NIL NIL NIL))')
        r = t.cmd("FETCH 1 (BODY)")
        assert r.untagged[0].startswith(b'* 1 FETCH (BODY (("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 10 1)')
        assert t.cmd("FETCH 1 (BODY.PEEK[9])").untagged == [b"* 1 FETCH (BODY[9] NIL)"]
        r = t.cmd("FETCH 1 (RFC822.TEXT)")
        assert r.untagged[0].startswith(b"* 1 FETCH (RFC822.TEXT {%d}\r\npreamble" % (len(mixed) - 81))
        assert b"FLAGS (\\Seen)" in r.untagged[0]
