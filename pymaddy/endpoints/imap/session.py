"""One IMAP4rev1 connection (RFC 3501) with the extensions pymaddy advertises.

Invariants:
* Sequence numbers are this session's own view (`View.uids`): they change only
  when this session sends EXISTS or EXPUNGE, never behind the client's back.
* Untagged EXPUNGE is never sent while answering FETCH, STORE or SEARCH by
  sequence number (RFC 3501 §7.4.1); expunges seen then wait for a later command.
* Every change made elsewhere (other sessions, delivery, the CLI) reaches the
  client before the tagged reply of the next command, or at once during IDLE.
* A malformed command gets `BAD`, a refused one `NO`; nothing the client sends
  ends the session except LOGOUT, a closed socket, a timeout or a line / literal
  past the limits (then `BYE`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import ssl
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pymaddy.auth.throttle import Throttled
from pymaddy.endpoints.imap import fetch as fetchmod
from pymaddy.endpoints.imap.io import Closed, IMAPStream, LineTooLong
from pymaddy.imap import parser as P
from pymaddy.imap import wire
from pymaddy.imap.utf7 import encode_mutf7
from pymaddy.mail.errors import AuthTemporaryError
from pymaddy.runtime.module import Connection, SessionClosing, host_port
from pymaddy.storage.imapsql import DELIMITER, INBOX, MailboxExists, MailboxNotFound, StorageError, Update
from pymaddy.storage.mailstore import (
    AccountStore,
    BadMailboxName,
    CannotDeleteInbox,
    Changes,
    MailboxHasChildren,
    OverQuota,
    check_name,
)

if TYPE_CHECKING:
    from pymaddy.endpoints.imap.endpoint import IMAPEndpoint

MAX_LINE = 64 * 1024  # one command line, literals excluded
MAX_LITERAL = 64 * 1024  # a literal in any command but APPEND
MAX_COMMAND = 1 << 20  # all literals of one command but APPEND's message
MAX_BAD = 20  # consecutive BAD replies before the session is closed
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
SPECIAL_USE = ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")

# Commands during which untagged EXPUNGE would shift the sequence numbers the client is using.
_NO_EXPUNGE = frozenset({"FETCH", "STORE", "SEARCH", "COPY", "MOVE", "SORT", "THREAD"})


class _Logout(Exception):
    pass


@dataclass
class View:
    """The selected mailbox as this session knows it."""

    mailbox_id: int
    name: str
    uidvalidity: int
    readonly: bool
    uids: list[int]
    modseq: int
    uidnext: int
    db_count: int  # rows the database had at the last sync (uids may still hold unannounced expunges)
    recent: set[int] = field(default_factory=set)
    pending_expunge: set[int] = field(default_factory=set)
    keywords: set[str] = field(default_factory=set)
    own_modseqs: set[int] = field(default_factory=set)  # changes this session made and already reported

    def seq_of(self, uid: int) -> int:
        import bisect

        i = bisect.bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else 0


def capabilities(sess: Session) -> list[str]:
    e = sess.e
    caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE", "CHILDREN", "UNSELECT",
            "MOVE", "UIDPLUS", "SPECIAL-USE", "I18NLEVEL=1", "SORT", "SORT=DISPLAY", "THREAD=ORDEREDSUBJECT",
            "THREAD=REFERENCES", "CONDSTORE", "QUOTA", "QUOTA=RES-STORAGE"]
    limit = e.storage.appendlimit if e.storage is not None else None
    caps.append(f"APPENDLIMIT={limit}" if limit else "APPENDLIMIT")
    if not sess.stream.compressed:
        caps.append("COMPRESS=DEFLATE")
    if not sess.user:
        if not sess.tls and e.tls_ctx is not None:
            caps.append("STARTTLS")
        if sess.auth_allowed():
            caps.append("AUTH=PLAIN")
            if e.sasl_login:
                caps.append("AUTH=LOGIN")
        else:
            caps.append("LOGINDISABLED")
    return caps


class Session:
    def __init__(self, endp: IMAPEndpoint, conn: Connection) -> None:
        self.e = endp
        self.conn = conn
        self.log = endp.log
        self.stream = IMAPStream(conn.reader, conn.writer)
        self.tls = conn.writer.get_extra_info("ssl_object") is not None
        peer = conn.peer
        self.remote_ip = str(peer[0]) if isinstance(peer, tuple) and len(peer) >= 2 else "127.0.0.1"
        self.remote_port = int(peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else 0
        self.user = ""  # the login name, once authenticated
        self.store: AccountStore | None = None
        self.view: View | None = None
        self.condstore = False
        self.bad_count = 0
        self.changed = asyncio.Event()
        self._unsubscribe: Any = None
        self._last_poll = 0.0
        self.idling = False

    @property
    def src(self) -> str:
        """`ip:port` as maddy logs it (fail2ban's maddy-auth filter expects the port)."""
        return host_port(self.remote_ip, self.remote_port)

    # -- output ------------------------------------------------------------------------------------

    def send(self, line: bytes | str) -> None:
        data = line.encode("utf-8") if isinstance(line, str) else line
        if self.e.io_debug:
            self.log.debug("S: " + data[:200].decode("utf-8", "replace"))
        self.stream.write(data + b"\r\n")

    async def flush(self) -> None:
        async with asyncio.timeout(self.e.write_timeout):
            await self.stream.flush()

    def tagged(self, tag: str, status: str, text: str) -> None:
        self.send(f"{tag} {status} {text}")

    # -- the loop ------------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except LineTooLong:
            with contextlib.suppress(Exception):
                self.send("* BYE Command line too long")
                await self.flush()
        except (_Logout, Closed, ConnectionError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        except (asyncio.CancelledError, SessionClosing):
            # The server is stopping or reloading: tell the client (RFC 3501 §7.1.5), it reconnects.
            self._bye_now("* BYE Server shutting down")
            raise
        finally:
            if self._unsubscribe is not None:
                self._unsubscribe()

    def _bye_now(self, line: str) -> None:
        """Best effort, without waiting: the session is being torn down."""
        with contextlib.suppress(Exception):
            self.stream.out.clear()
            self.stream.write(line.encode() + b"\r\n")
            data = b"".join(self.stream.out)
            self.stream.out.clear()
            if self.stream._deflate is not None:
                data = self.stream._deflate.compress(data) + self.stream._deflate.flush(zlib.Z_SYNC_FLUSH)
            self.conn.writer.write(data)

    async def _run(self) -> None:
        if self.e.proxy is not None and not await self._read_proxy():
            return
        if self.conn.closing:
            self.send("* BYE Server is shutting down")
            await self.flush()
            return
        self.send(f"* OK [CAPABILITY {' '.join(capabilities(self))}] IMAP4rev1 Service Ready")
        await self.flush()
        while True:
            raw = await self.read_command()
            if raw is None:
                continue
            await self.dispatch(raw)
            await self.flush()

    async def _read_proxy(self) -> bool:
        """HAProxy PROXY v1/v2 before the greeting; the client address counts only from `trust`ed peers."""
        from pymaddy.endpoints.smtp.protocol import read_proxy_header
        from pymaddy.endpoints.smtp.session import _in_net

        try:
            info = await read_proxy_header(self.conn.reader)
        except Exception as e:
            self.log.error("invalid PROXY protocol header", err=str(e) or type(e).__name__, src_ip=self.src)
            return False
        trust = getattr(self.e.proxy, "trust", None) or []
        trusted = not trust or any(_in_net(self.remote_ip, n) for n in trust)
        if info and not isinstance(info, bool) and trusted:
            self.remote_ip, self.remote_port = info.ip, info.port
        return True

    async def readline(self, idle: bool) -> bytes:
        try:
            if idle:
                with self.conn.idle():
                    async with asyncio.timeout(self.e.read_timeout):
                        return await self.stream.readline(MAX_LINE)
            async with asyncio.timeout(self.e.read_timeout):
                return await self.stream.readline(MAX_LINE)
        except TimeoutError:
            with contextlib.suppress(Exception):
                self.send("* BYE Autologout; idle for too long")
                await self.flush()
            raise

    async def read_command(self) -> bytes | None:
        """A whole command with its literals (RFC 3501 §4.3, RFC 7888), or None when it was answered
        already (a refused literal)."""
        line = await self.readline(idle=True)
        parts = [line]
        total = 0
        while True:
            lit = P.literal_at_end(line)
            if lit is None:
                return b"".join(parts)
            n, nonsync = lit
            limit = self._literal_limit(parts[0])
            if n > limit or total + n > max(limit, MAX_COMMAND):
                tag = P.tag_of(parts[0])
                toobig = limit != MAX_LITERAL
                if nonsync:
                    # RFC 7888 §4: the client sends it anyway; past a sane size, give up on the connection.
                    if n > max(limit, MAX_COMMAND) * 2:
                        self.send("* BYE Literal too big")
                        await self.flush()
                        raise _Logout
                    await self.stream.discard(n)
                    with contextlib.suppress(LineTooLong):
                        await self.readline(idle=False)
                if toobig:
                    self.tagged(tag, "NO", "[TOOBIG] Message too big")
                else:
                    self.tagged(tag, "BAD", "Literal too big")
                await self.flush()
                return None
            if not nonsync:
                self.send("+ Ready for literal data")
                await self.flush()
            async with asyncio.timeout(self.e.read_timeout):
                data = await self.stream.readexactly(n)
            total += n
            parts.append(data)
            line = await self.readline(idle=False)
            parts.append(line)

    def _literal_limit(self, first: bytes) -> int:
        words = first.split(None, 2)
        if len(words) >= 2 and words[1].upper() == b"APPEND":
            lim = self.e.storage.appendlimit if self.e.storage is not None else None
            return lim or (1 << 31)
        return MAX_LITERAL

    async def dispatch(self, raw: bytes) -> None:
        try:
            cmd = P.parse_command(raw)
        except P.BadCharset as e:
            self.tagged(e.tag, "NO", "[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
            return
        except P.ParseError as e:
            tag = getattr(e, "tag", None) or P.tag_of(raw)
            if self.e.io_debug:
                self.log.debug("C: " + raw[:200].decode("utf-8", "replace"))
            self.tagged(tag, "BAD", str(e) or "Syntax error")
            self.bad_count += 1
            if self.bad_count > MAX_BAD:
                self.send("* BYE Too many invalid commands")
                await self.flush()
                raise _Logout from None
            return
        self.bad_count = 0
        if self.e.io_debug:
            shown = f"{cmd.tag} {cmd.name} ..." if cmd.name in ("LOGIN", "AUTHENTICATE") else raw[:200].decode(
                "utf-8", "replace").rstrip()
            self.log.debug("C: " + shown)
        handler = getattr(self, "cmd_" + cmd.name.replace("-", "_"), None)
        if handler is None:
            self.tagged(cmd.tag, "BAD", "Unknown command")
            return
        state_err = self._state_error(cmd.name)
        if state_err:
            self.tagged(cmd.tag, "BAD", state_err)
            return
        try:
            await handler(cmd)
        except (_Logout, Closed, ConnectionError, TimeoutError, asyncio.CancelledError, LineTooLong):
            raise
        except MailboxNotFound:
            self.tagged(cmd.tag, "NO", "[NONEXISTENT] No such mailbox")
        except OverQuota:
            self.tagged(cmd.tag, "NO", "[OVERQUOTA] Quota exceeded")
        except BadMailboxName as e:
            self.tagged(cmd.tag, "NO", f"[CANNOT] {e}")
        except StorageError as e:
            self.tagged(cmd.tag, "NO", str(e))
        except Exception as e:
            self.log.error("IMAP command failed", err=f"{type(e).__name__}: {e}", command=cmd.name,
                           username=self.user)
            self.tagged(cmd.tag, "NO", "[SERVERBUG] Internal server error")

    _ANY = frozenset({"CAPABILITY", "NOOP", "LOGOUT", "ID", "COMPRESS"})
    _NOT_AUTH = frozenset({"STARTTLS", "LOGIN", "AUTHENTICATE"})
    _SELECTED = frozenset({"CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE",
                           "SORT", "THREAD"})

    def _state_error(self, name: str) -> str:
        if name in self._ANY:
            return ""
        if name in self._NOT_AUTH:
            return "Already authenticated" if self.user else ""
        if not self.user:
            return "Not authenticated"
        if name in self._SELECTED and self.view is None:
            return "No mailbox selected"
        return ""

    # -- any state -------------------------------------------------------------------------------------

    async def cmd_CAPABILITY(self, cmd: P.Command) -> None:
        self.send("* CAPABILITY " + " ".join(capabilities(self)))
        await self.sync(cmd)
        self.tagged(cmd.tag, "OK", "CAPABILITY completed")

    async def cmd_NOOP(self, cmd: P.Command) -> None:
        await self.sync(cmd, force=True)
        self.tagged(cmd.tag, "OK", "NOOP completed")

    async def cmd_CHECK(self, cmd: P.Command) -> None:
        await self.sync(cmd, force=True)
        self.tagged(cmd.tag, "OK", "CHECK completed")

    async def cmd_LOGOUT(self, cmd: P.Command) -> None:
        self.send("* BYE Logging out")
        self.tagged(cmd.tag, "OK", "LOGOUT completed")
        await self.flush()
        raise _Logout

    async def cmd_ID(self, cmd: P.Command) -> None:
        # RFC 2971: who we are; the client's own ID is only logged.
        if cmd.args and self.e.ctx.debug:
            self.log.debug("client ID", id=str(cmd.args))
        self.send('* ID ("name" "pymaddy" "vendor" "pymaddy")')
        self.tagged(cmd.tag, "OK", "ID completed")

    async def cmd_COMPRESS(self, cmd: P.Command) -> None:
        mech = str(cmd.args).upper()
        if mech != "DEFLATE":
            self.tagged(cmd.tag, "BAD", "Unsupported compression mechanism")
            return
        if self.stream.compressed:
            self.tagged(cmd.tag, "NO", "[COMPRESSIONACTIVE] DEFLATE active via COMPRESS")
            return
        self.tagged(cmd.tag, "OK", "DEFLATE active")
        await self.flush()
        self.stream.start_compression()

    # -- not authenticated ------------------------------------------------------------------------------

    def auth_allowed(self) -> bool:
        return self.tls or self.e.insecure_auth

    async def cmd_STARTTLS(self, cmd: P.Command) -> None:
        if self.tls:
            self.tagged(cmd.tag, "BAD", "TLS is already active")
            return
        if self.e.tls_ctx is None:
            self.tagged(cmd.tag, "NO", "TLS is not configured")
            return
        w = self.conn.writer
        w.transport.pause_reading()  # type: ignore[attr-defined]
        self.stream.buf.clear()  # RFC 3501 §6.2.1: nothing sent in plaintext survives the upgrade
        self.conn.reader._buffer.clear()  # type: ignore[attr-defined]
        self.tagged(cmd.tag, "OK", "Begin TLS negotiation now")
        await self.flush()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(60):
                transport = await loop.start_tls(w.transport, w._protocol, self.e.tls_ctx,  # type: ignore[attr-defined]
                                                 server_side=True)
        except (ssl.SSLError, OSError, TimeoutError) as e:
            self.log.debug("TLS handshake failed", reason=str(e), src_ip=self.src)
            raise Closed from None
        if transport is None:
            raise Closed
        w._transport = transport  # type: ignore[attr-defined]
        w._protocol._replace_writer(w)  # type: ignore[attr-defined]
        self.tls = True

    async def cmd_LOGIN(self, cmd: P.Command) -> None:
        user, password = cmd.args
        if not self.auth_allowed():
            self.tagged(cmd.tag, "NO", "[PRIVACYREQUIRED] TLS is required")
            return
        await self._login(cmd.tag, user, password)

    async def cmd_AUTHENTICATE(self, cmd: P.Command) -> None:
        mech, initial = cmd.args
        if not self.auth_allowed():
            self.tagged(cmd.tag, "NO", "[PRIVACYREQUIRED] TLS is required")
            return
        if mech == "PLAIN":
            data = initial if initial is not None else await self._sasl_step(b"")
            if data is None:
                self.tagged(cmd.tag, "BAD", "Authentication cancelled")
                return
            fields = data.split(b"\x00")
            if len(fields) != 3:
                self.tagged(cmd.tag, "BAD", "Invalid SASL PLAIN response")
                return
            authz, user_b, pwd_b = fields
            if authz and authz != user_b:
                self.e.failed_login()
                self.tagged(cmd.tag, "NO", "[AUTHORIZATIONFAILED] Cannot act as another user")
                return
            await self._login(cmd.tag, user_b.decode("utf-8", "replace"), pwd_b.decode("utf-8", "replace"))
        elif mech == "LOGIN" and self.e.sasl_login:
            u = initial if initial is not None else await self._sasl_step(b"Username:")
            if u is None:
                self.tagged(cmd.tag, "BAD", "Authentication cancelled")
                return
            p = await self._sasl_step(b"Password:")
            if p is None:
                self.tagged(cmd.tag, "BAD", "Authentication cancelled")
                return
            await self._login(cmd.tag, u.decode("utf-8", "replace"), p.decode("utf-8", "replace"))
        else:
            self.tagged(cmd.tag, "NO", "Unsupported authentication mechanism")

    async def _sasl_step(self, challenge: bytes) -> bytes | None:
        self.send(b"+ " + base64.b64encode(challenge))
        await self.flush()
        answer = (await self.readline(idle=False)).rstrip(b"\r\n")
        if answer == b"*":
            return None
        try:
            return base64.b64decode(answer, validate=True)
        except (binascii.Error, ValueError):
            return None

    async def _login(self, tag: str, user: str, password: str) -> None:
        err = await self.e.check_password(user, password, self.remote_ip)
        if err is not None:
            self.log.msg("authentication failed", reason=str(err), src_ip=self.src, username=user)
            self.e.failed_login()
            if isinstance(err, Throttled):
                self.tagged(tag, "NO", "[UNAVAILABLE] Too many failed logins, try again later")
            elif isinstance(err, AuthTemporaryError):
                self.tagged(tag, "NO", "[UNAVAILABLE] Temporary authentication failure")
            else:
                self.tagged(tag, "NO", "[AUTHENTICATIONFAILED] Invalid credentials")
            return
        acct_name = await self.e.storage_account(user)
        if acct_name is None:
            self.log.msg("authentication failed", reason="no storage account", src_ip=self.src,
                         username=user)
            self.e.failed_login()
            self.tagged(tag, "NO", "[AUTHENTICATIONFAILED] Invalid credentials")
            return
        storage = self.e.storage
        assert storage is not None
        account = await storage.get_or_create_account(acct_name)  # maddy: first login creates the account
        self.store = AccountStore(storage, account)
        self.user = user
        self._unsubscribe = storage.subscribe(self._on_update)
        self.tagged(tag, "OK", f"[CAPABILITY {' '.join(capabilities(self))}] Logged in")

    def _on_update(self, u: Update) -> None:
        # Changes this session made itself are answered by the command that made them.
        if self.store is not None and u.account == self.store.name and u.origin != id(self.store):
            self.changed.set()

    def _caught_up(self) -> None:
        """After this session's own STORE or EXPUNGE: if the view was current just before it, it is
        current now (the change took exactly one MODSEQ), so the next command need not poll."""
        v = self.view
        if v is None:
            return
        mbox, modseq = self._acct().last_change
        if mbox == v.mailbox_id and modseq == v.modseq + 1:
            v.modseq = modseq
            v.own_modseqs.discard(modseq)

    # -- authenticated: mailboxes ------------------------------------------------------------------------

    def _acct(self) -> AccountStore:
        assert self.store is not None
        return self.store

    async def cmd_SELECT(self, cmd: P.Command) -> None:
        await self._select(cmd, readonly=False)

    async def cmd_EXAMINE(self, cmd: P.Command) -> None:
        await self._select(cmd, readonly=True)

    async def _select(self, cmd: P.Command, readonly: bool) -> None:
        a = cmd.args
        name = a.mailbox
        if self.view is not None:
            self.view = None
            if self.condstore:
                self.send("* OK [CLOSED] Previous mailbox closed")  # RFC 7162 §3.2.11
        if getattr(a, "condstore", False):
            self.condstore = True
        st = self._acct()
        try:
            sel = await st.select(check_name(name), claim_recent=not readonly and not st.store.disable_recent)
        except (MailboxNotFound, BadMailboxName):
            self.tagged(cmd.tag, "NO", "[NONEXISTENT] No such mailbox")
            return
        info = sel.info
        self.view = View(info.id, info.name, info.uidvalidity, readonly, list(sel.uids), info.highestmodseq,
                         info.uidnext, len(sel.uids), set(sel.recent), keywords=set(sel.flags))
        flags = _flag_list(self.view.keywords)
        # RFC 3501 §6.3.1; maddy's tests count these lines: FLAGS, EXISTS, RECENT, [UNSEEN], PERMANENTFLAGS,
        # UIDNEXT, UIDVALIDITY.
        self.send(f"* FLAGS ({flags})")
        self.send(f"* {len(sel.uids)} EXISTS")
        self.send(f"* {len(sel.recent)} RECENT")
        if sel.first_unseen_uid is not None:
            self.send(f"* OK [UNSEEN {self.view.seq_of(sel.first_unseen_uid)}] First unseen message")
        perm = "" if readonly else f"{flags} \\*"
        self.send(f"* OK [PERMANENTFLAGS ({perm.strip()})] Flags permitted")
        self.send(f"* OK [UIDNEXT {info.uidnext}] Predicted next UID")
        self.send(f"* OK [UIDVALIDITY {info.uidvalidity}] UIDs valid")
        if self.condstore:
            self.send(f"* OK [HIGHESTMODSEQ {info.highestmodseq}] Highest")
        self._last_poll = time.monotonic()
        mode = "READ-ONLY" if readonly else "READ-WRITE"
        self.tagged(cmd.tag, "OK", f"[{mode}] {'EXAMINE' if readonly else 'SELECT'} completed")

    async def cmd_CREATE(self, cmd: P.Command) -> None:
        a = cmd.args
        name = a if isinstance(a, str) else a.mailbox
        special = None
        uses = list(getattr(a, "special_use", None) or [])
        if uses:
            if len(uses) > 1 or uses[0] not in SPECIAL_USE:
                self.tagged(cmd.tag, "NO", "[USEATTR] Unsupported special-use attribute")
                return
            special = uses[0]
        try:
            await self._acct().create(name, special)
        except MailboxExists:
            self.tagged(cmd.tag, "NO", "[ALREADYEXISTS] Mailbox already exists")
            return
        await self.sync(cmd)
        self.tagged(cmd.tag, "OK", "CREATE completed")

    async def cmd_DELETE(self, cmd: P.Command) -> None:
        name = check_name(_mbox_arg(cmd.args))
        try:
            await self._acct().delete(name)
        except CannotDeleteInbox as e:
            self.tagged(cmd.tag, "NO", f"[CANNOT] {e}")
            return
        except MailboxHasChildren as e:
            self.tagged(cmd.tag, "NO", f"[INUSE] {e}")
            return
        if self.view is not None and self.view.name == name:
            self.view = None  # our own selected mailbox went away
        await self.sync(cmd)
        self.tagged(cmd.tag, "OK", "DELETE completed")

    async def cmd_RENAME(self, cmd: P.Command) -> None:
        old, new = cmd.args
        try:
            await self._acct().rename(old, new)
        except MailboxExists:
            self.tagged(cmd.tag, "NO", "[ALREADYEXISTS] Mailbox already exists")
            return
        if self.view is not None and old != INBOX:
            if self.view.name == check_name(old):
                self.view.name = check_name(new)
            elif self.view.name.startswith(check_name(old) + DELIMITER):
                self.view.name = check_name(new) + self.view.name[len(check_name(old)):]
        await self.sync(cmd)
        self.tagged(cmd.tag, "OK", "RENAME completed")

    async def cmd_SUBSCRIBE(self, cmd: P.Command) -> None:
        await self._acct().set_subscribed(_mbox_arg(cmd.args), True)
        self.tagged(cmd.tag, "OK", "SUBSCRIBE completed")

    async def cmd_UNSUBSCRIBE(self, cmd: P.Command) -> None:
        await self._acct().set_subscribed(_mbox_arg(cmd.args), False)
        self.tagged(cmd.tag, "OK", "UNSUBSCRIBE completed")

    async def cmd_LIST(self, cmd: P.Command) -> None:
        await self._list(cmd, lsub=False)

    async def cmd_LSUB(self, cmd: P.Command) -> None:
        await self._list(cmd, lsub=True)

    async def _list(self, cmd: P.Command, lsub: bool) -> None:
        a = cmd.args
        if isinstance(a, tuple):
            ref, pattern = a[0], a[1]
            select_opts: list[str] = []
            return_opts: list[str] = []
        else:
            ref, pattern = a.reference, a.pattern
            select_opts = [s.upper() for s in (getattr(a, "select_opts", None) or [])]
            return_opts = [s.upper() for s in (getattr(a, "return_opts", None) or [])]
        verb = "LSUB" if lsub else "LIST"
        if pattern == "":
            # RFC 3501 §6.3.8: the hierarchy delimiter and root name.
            self.send(f'* {verb} (\\Noselect) "{DELIMITER}" ""')
            self.tagged(cmd.tag, "OK", f"{verb} completed")
            return
        full = ref + pattern if not ref or ref.endswith(DELIMITER) or pattern.startswith(DELIMITER) else \
            ref + DELIMITER + pattern
        rx = _pattern_regex(full)
        boxes = await self._acct().mailboxes()
        names = {b.name: b for b in boxes}
        only_special = "SPECIAL-USE" in select_opts
        only_subscribed = lsub or "SUBSCRIBED" in select_opts
        show_subscribed = "SUBSCRIBED" in select_opts or "SUBSCRIBED" in return_opts
        lines: list[tuple[str, list[str]]] = []
        seen: set[str] = set()
        for b in boxes:
            if only_subscribed and not b.subscribed:
                continue
            if only_special and not b.special_use:
                continue
            if rx.fullmatch(b.name):
                attrs = ["\\HasChildren" if _has_children(b.name, names) else "\\HasNoChildren"]
                if b.special_use:
                    attrs.append(b.special_use)
                if show_subscribed and b.subscribed:
                    attrs.append("\\Subscribed")
                lines.append((b.name, attrs))
                seen.add(b.name)
            elif "%" in full:
                # RFC 3501 §6.3.8: a `%` that stops at a level with no mailbox of its own still names it.
                parts = b.name.split(DELIMITER)
                for i in range(1, len(parts)):
                    parent = DELIMITER.join(parts[:i])
                    if parent not in names and parent not in seen and rx.fullmatch(parent):
                        seen.add(parent)
                        lines.append((parent, ["\\Noselect", "\\HasChildren"]))
        for name, attrs in lines:
            enc = wire.astring(encode_mutf7(name))
            self.send(f'* {verb} ({" ".join(attrs)}) "{DELIMITER}" '.encode() + enc)
        self.tagged(cmd.tag, "OK", f"{verb} completed")

    async def cmd_NAMESPACE(self, cmd: P.Command) -> None:
        self.send(f'* NAMESPACE (("" "{DELIMITER}")) NIL NIL')
        self.tagged(cmd.tag, "OK", "NAMESPACE completed")

    async def cmd_STATUS(self, cmd: P.Command) -> None:
        name, items = cmd.args
        st = await self._acct().status(check_name(name))
        values = {"MESSAGES": st.messages, "RECENT": st.recent, "UIDNEXT": st.uidnext, "UIDVALIDITY": st.uidvalidity,
                  "UNSEEN": st.unseen, "HIGHESTMODSEQ": st.highestmodseq, "SIZE": st.size}
        out = []
        for item in items:
            key = item.upper()
            if key not in values:
                self.tagged(cmd.tag, "BAD", f"Unknown STATUS item {key}")
                return
            out.append(f"{key} {values[key]}")
        if "HIGHESTMODSEQ" in (i.upper() for i in items):
            self.condstore = True
        self.send(b"* STATUS " + wire.astring(encode_mutf7(name)) + f" ({' '.join(out)})".encode())
        await self.sync(cmd)
        self.tagged(cmd.tag, "OK", "STATUS completed")

    async def cmd_ENABLE(self, cmd: P.Command) -> None:
        enabled = []
        for cap in cmd.args:
            if cap.upper() in ("CONDSTORE",):
                self.condstore = True
                enabled.append(cap.upper())
        self.send("* ENABLED" + "".join(" " + c for c in enabled))
        self.tagged(cmd.tag, "OK", "ENABLE completed")

    async def cmd_APPEND(self, cmd: P.Command) -> None:
        a = cmd.args
        st = self._acct()
        limit = st.account.appendlimit or self.e.storage.appendlimit if self.e.storage is not None else None
        if limit and len(a.message) > limit:
            self.tagged(cmd.tag, "NO", "[TOOBIG] Message too big")
            return
        if not a.message:
            self.tagged(cmd.tag, "NO", "Empty message")
            return
        try:
            flags = _check_flags(a.flags)
        except ValueError as e:
            self.tagged(cmd.tag, "BAD", str(e))
            return
        date = int(a.date.timestamp()) if a.date is not None else None
        try:
            uidvalidity, uid = await st.append(check_name(a.mailbox), a.message, flags, date)
        except (MailboxNotFound, BadMailboxName):
            self.tagged(cmd.tag, "NO", "[TRYCREATE] No such mailbox")
            return
        await self.sync(cmd, force=self.view is not None and self.view.name == check_name(a.mailbox))
        self.tagged(cmd.tag, "OK", f"[APPENDUID {uidvalidity} {uid}] APPEND completed")

    async def cmd_GETQUOTAROOT(self, cmd: P.Command) -> None:
        name = _mbox_arg(cmd.args)
        await self._acct().mailbox(check_name(name))
        used, _count, quota = await self._acct().usage()
        if quota is None:
            # RFC 9208 §5.3: no quota root applies to this mailbox.
            self.send(b"* QUOTAROOT " + wire.astring(encode_mutf7(name)))
        else:
            self.send(b"* QUOTAROOT " + wire.astring(encode_mutf7(name)) + b' ""')
            self.send(_quota_line(used, quota))
        self.tagged(cmd.tag, "OK", "GETQUOTAROOT completed")

    async def cmd_GETQUOTA(self, cmd: P.Command) -> None:
        used, _count, quota = await self._acct().usage()
        if str(cmd.args) != "" or quota is None:
            self.tagged(cmd.tag, "NO", "[NONEXISTENT] No such quota root")
            return
        self.send(_quota_line(used, quota))
        self.tagged(cmd.tag, "OK", "GETQUOTA completed")

    async def cmd_SETQUOTA(self, cmd: P.Command) -> None:
        self.tagged(cmd.tag, "NO", "[NOPERM] Quotas are set by the administrator (pymaddy imap-acct quota)")

    # -- selected --------------------------------------------------------------------------------------

    def _v(self) -> View:
        assert self.view is not None
        return self.view

    async def cmd_CLOSE(self, cmd: P.Command) -> None:
        v = self._v()
        if not v.readonly:
            await self._acct().expunge(v.mailbox_id)
        self.view = None
        self.tagged(cmd.tag, "OK", "CLOSE completed")

    async def cmd_UNSELECT(self, cmd: P.Command) -> None:
        self.view = None
        self.tagged(cmd.tag, "OK", "UNSELECT completed")

    async def cmd_EXPUNGE(self, cmd: P.Command) -> None:
        v = self._v()
        if v.readonly:
            self.tagged(cmd.tag, "NO", "[READ-ONLY] Mailbox is read-only")
            return
        uids: list[int] | None = None
        if cmd.uid:
            uids = self._uids_of(cmd.args, uid=True)
        gone = await self._acct().expunge(v.mailbox_id, uids)
        self._announce_expunges(gone)
        if gone:
            self._caught_up()
        await self.sync(cmd)
        self.tagged(cmd.tag, "OK", "EXPUNGE completed")

    def _announce_expunges(self, uids: list[int], own: bool = True) -> None:
        """EXPUNGE responses for `uids`, in ascending order (each shifts the ones after it).
        `own`: this session removed them, so the database count it last saw drops too."""
        v = self._v()
        for uid in sorted(uids):
            seq = v.seq_of(uid)
            if seq:
                self.send(f"* {seq} EXPUNGE")
                del v.uids[seq - 1]
                v.recent.discard(uid)
                if own:
                    v.db_count -= 1
            v.pending_expunge.discard(uid)

    def _uids_of(self, seqset: Any, uid: bool) -> list[int]:
        """The UIDs a sequence set names in this session's view (RFC 3501 §6.4.8 for UID sets)."""
        v = self._v()
        if not v.uids:
            return []
        if uid:
            present = set(v.uids)
            out: list[int] = []
            for lo, hi in seqset.resolve(v.uids[-1]):
                if hi - lo > len(v.uids):
                    out.extend(u for u in v.uids if lo <= u <= hi)
                else:
                    out.extend(u for u in range(lo, hi + 1) if u in present)
            return sorted(set(out))
        n = len(v.uids)
        res: set[int] = set()
        for lo, hi in seqset.resolve(n):
            if lo > n:
                raise _BadSeq
            for s in range(lo, min(hi, n) + 1):
                res.add(v.uids[s - 1])
        return sorted(res)

    async def cmd_FETCH(self, cmd: P.Command) -> None:
        v = self._v()
        a = cmd.args
        try:
            uids = self._uids_of(a.seqset, cmd.uid)
        except _BadSeq:
            self.tagged(cmd.tag, "BAD", "Invalid sequence set")
            return
        req = a.request
        if req.changedsince is not None or any(i.name == "MODSEQ" for i in req.items):
            self.condstore = True
        await fetchmod.fetch(self, v, uids, req, cmd.uid)
        await self.sync(cmd)
        self.tagged(cmd.tag, "OK", "FETCH completed")

    async def cmd_STORE(self, cmd: P.Command) -> None:
        v = self._v()
        a = cmd.args
        if v.readonly:
            self.tagged(cmd.tag, "NO", "[READ-ONLY] Mailbox is read-only")
            return
        try:
            uids = self._uids_of(a.seqset, cmd.uid)
            flags = _check_flags(a.flags)
        except _BadSeq:
            self.tagged(cmd.tag, "BAD", "Invalid sequence set")
            return
        except ValueError as e:
            self.tagged(cmd.tag, "BAD", str(e))
            return
        if a.unchangedsince is not None:
            self.condstore = True
        changed, failed = await self._acct().store_flags(v.mailbox_id, uids, a.mode, flags, a.unchangedsince)
        v.keywords.update(flags)
        if changed:
            self._caught_up()
        changed_uids = set()
        for uid, fl, modseq in changed:
            v.own_modseqs.add(modseq)
            changed_uids.add(uid)
            seq = v.seq_of(uid)
            if not seq:
                continue
            if a.silent and not (self.condstore and a.unchangedsince is not None):
                continue
            self.send(self._flags_line(seq, uid, fl, modseq, cmd.uid))
        if not a.silent:
            # RFC 3501 §6.4.6: the flags of every message named, changed or not.
            rest = [u for u in uids if u not in changed_uids and u not in failed]
            if rest:
                for m in await self._acct().fetch(v.mailbox_id, rest):
                    seq = v.seq_of(m.uid)
                    if seq:
                        self.send(self._flags_line(seq, m.uid, m.flags, m.modseq, cmd.uid))
        await self.sync(cmd)
        if failed:
            seqs = failed if cmd.uid else [v.seq_of(u) for u in failed]
            self.tagged(cmd.tag, "OK", f"[MODIFIED {_compress_set(seqs)}] Conditional STORE failed")
        else:
            self.tagged(cmd.tag, "OK", "STORE completed")

    def _flags_line(self, seq: int, uid: int, flags: tuple[str, ...], modseq: int, with_uid: bool) -> str:
        fl = " ".join(_with_recent(flags, uid in self._v().recent))
        parts = []
        if with_uid:
            parts.append(f"UID {uid}")
        parts.append(f"FLAGS ({fl})")
        if self.condstore:
            parts.append(f"MODSEQ ({modseq})")
        return f"* {seq} FETCH ({' '.join(parts)})"

    async def cmd_COPY(self, cmd: P.Command) -> None:
        await self._copy(cmd, move=False)

    async def cmd_MOVE(self, cmd: P.Command) -> None:
        await self._copy(cmd, move=True)

    async def _copy(self, cmd: P.Command, move: bool) -> None:
        v = self._v()
        seqset, dest = cmd.args
        if move and v.readonly:
            self.tagged(cmd.tag, "NO", "[READ-ONLY] Mailbox is read-only")
            return
        try:
            uids = self._uids_of(seqset, cmd.uid)
        except _BadSeq:
            self.tagged(cmd.tag, "BAD", "Invalid sequence set")
            return
        try:
            res = await self._acct().copy(v.mailbox_id, uids, check_name(dest), move=move)
        except (MailboxNotFound, BadMailboxName):
            self.tagged(cmd.tag, "NO", "[TRYCREATE] No such mailbox")
            return
        code = f"[COPYUID {res.uidvalidity} {_compress_set(res.src)} {_compress_set(res.dst)}] " if res.src else ""
        if move:
            if code:
                self.send(f"* OK {code.strip()} Moved")  # RFC 6851 §4.3: COPYUID before the EXPUNGEs
            self._announce_expunges(res.src)
            if res.src:
                self._caught_up()
            await self.sync(cmd)
            self.tagged(cmd.tag, "OK", "MOVE completed")
        else:
            await self.sync(cmd, force=check_name(dest) == v.name)
            self.tagged(cmd.tag, "OK", f"{code}COPY completed")

    async def cmd_SEARCH(self, cmd: P.Command) -> None:
        a = cmd.args
        try:
            ids = await fetchmod.search(self, self._v(), a.key, cmd.uid)
        except P.ParseError as e:
            self.tagged(cmd.tag, "BAD", str(e))
            return
        line = "* SEARCH" + "".join(f" {i}" for i in ids)
        if self.condstore and fetchmod.uses_modseq(a.key) and ids:
            line += f" (MODSEQ {await fetchmod.max_modseq(self, self._v(), ids, cmd.uid)})"
        self.send(line)
        await self.sync(cmd)
        self.tagged(cmd.tag, "OK", "SEARCH completed")

    async def cmd_SORT(self, cmd: P.Command) -> None:
        a = cmd.args
        ids = await fetchmod.sort(self, self._v(), a.criteria, a.key, cmd.uid)
        self.send("* SORT" + "".join(f" {i}" for i in ids))
        await self.sync(cmd)
        self.tagged(cmd.tag, "OK", "SORT completed")

    async def cmd_THREAD(self, cmd: P.Command) -> None:
        a = cmd.args
        if a.algorithm not in ("ORDEREDSUBJECT", "REFERENCES"):
            self.tagged(cmd.tag, "BAD", "Unsupported threading algorithm")
            return
        out = await fetchmod.thread(self, self._v(), a.algorithm, a.key, cmd.uid)
        self.send(b"* THREAD " + out if out else b"* THREAD")
        await self.sync(cmd)
        self.tagged(cmd.tag, "OK", "THREAD completed")

    # -- IDLE (RFC 2177) ---------------------------------------------------------------------------------

    async def cmd_IDLE(self, cmd: P.Command) -> None:
        self.send("+ idling")
        await self.sync(cmd, force=True)
        await self.flush()
        done = asyncio.ensure_future(self._read_done())
        try:
            while True:
                self.changed.clear()
                waiter = asyncio.ensure_future(self.changed.wait())
                with self.conn.idle():
                    finished, _ = await asyncio.wait({done, waiter}, timeout=self.e.idle_poll,
                                                     return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if done in finished:
                    line = done.result()
                    if line.strip().upper() != b"DONE":
                        self.tagged(cmd.tag, "BAD", "Expected DONE")
                    else:
                        await self.sync(cmd, force=True)
                        self.tagged(cmd.tag, "OK", "IDLE terminated")
                    return
                await self.sync(cmd, force=True, idle=True)
                await self.flush()
        finally:
            if not done.done():
                done.cancel()
                with contextlib.suppress(BaseException):
                    await done

    async def _read_done(self) -> bytes:
        async with asyncio.timeout(self.e.read_timeout):
            return await self.stream.readline(MAX_LINE)

    # -- updates ---------------------------------------------------------------------------------------

    async def sync(self, cmd: P.Command, force: bool = False, idle: bool = False) -> None:
        """Tell the client what changed in its selected mailbox (RFC 3501 §7: before the tagged reply)."""
        v = self.view
        if v is None:
            self.changed.clear()
            return
        now = time.monotonic()
        if not (force or self.changed.is_set() or now - self._last_poll > 1.0):
            return
        if not idle:
            self.changed.clear()
        self._last_poll = now
        st = self._acct()
        ch = await st.poll(v.mailbox_id, v.modseq, v.db_count, v.uidnext)
        allow_expunge = cmd.uid or cmd.name not in _NO_EXPUNGE
        if ch is None:
            if allow_expunge and v.pending_expunge:
                self._announce_expunges(sorted(v.pending_expunge), own=False)
            return
        if ch.uids is not None and not v.readonly and not st.store.disable_recent:
            known = set(v.uids)
            v.recent |= await st.claim_recent(v.mailbox_id, [u for u in ch.uids if u not in known])
        self._apply(v, ch, allow_expunge)

    def _apply(self, v: View, ch: Changes, allow_expunge: bool) -> None:
        if ch.gone:
            self.send("* BYE Selected mailbox was deleted")
            raise _Logout
        added: list[int] = []
        if ch.uids is not None:
            now_set = set(ch.uids)
            gone = [u for u in v.uids if u not in now_set]
            v.pending_expunge.update(gone)
            known = set(v.uids)
            added = [u for u in ch.uids if u not in known]
            v.db_count = len(ch.uids)
        v.modseq, v.uidnext = ch.highestmodseq, ch.uidnext
        if allow_expunge and v.pending_expunge:
            self._announce_expunges(sorted(v.pending_expunge), own=False)
        if added:
            v.uids.extend(added)
            v.uids.sort()
            self.send(f"* {len(v.uids)} EXISTS")
            if not self._acct().store.disable_recent:
                self.send(f"* {len(v.recent)} RECENT")
        new = set(added)
        for uid, flags, modseq in ch.flags:
            if uid in new or modseq in v.own_modseqs or uid in v.pending_expunge:
                continue
            seq = v.seq_of(uid)
            if seq:
                v.keywords.update(flags)
                self.send(self._flags_line(seq, uid, flags, modseq, True))
        v.own_modseqs.clear()


class _BadSeq(Exception):
    pass


def _quota_line(used: int, quota: int) -> str:
    """RFC 9208 §5.1: STORAGE in units of 1024 octets, the one root "" of an account."""
    return f'* QUOTA "" (STORAGE {(used + 1023) // 1024} {quota // 1024})'


def _mbox_arg(a: Any) -> str:
    return a if isinstance(a, str) else a.mailbox


def _check_flags(flags: list[str]) -> list[str]:
    out = []
    for f in flags:
        if f.startswith("\\"):
            canon = next((s for s in SYSTEM_FLAGS if s.lower() == f.lower()), None)
            if canon is None:
                if f.lower() == "\\recent":
                    continue  # RFC 3501 §2.3.2: \Recent cannot be set by the client; ignored
                raise ValueError(f"Unknown system flag {f}")
            out.append(canon)
        else:
            out.append(f)
    return out


def _flag_list(keywords: set[str]) -> str:
    kws = sorted(k for k in keywords if not k.startswith("\\"))
    return " ".join(list(SYSTEM_FLAGS) + kws)


def _with_recent(flags: tuple[str, ...], recent: bool) -> list[str]:
    return [*flags, "\\Recent"] if recent else list(flags)


def _has_children(name: str, names: dict[str, Any]) -> bool:
    prefix = name + DELIMITER
    return any(n.startswith(prefix) for n in names)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """LIST wildcards (RFC 3501 §6.3.8): `*` matches anything, `%` anything but the delimiter.
    INBOX matches case-insensitively."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "%":
            out.append(f"[^{re.escape(DELIMITER)}]*")
        else:
            out.append(re.escape(ch))
    rx = "".join(out)
    if pattern[:5].upper() == "INBOX" and (len(pattern) == 5 or pattern[5] in (DELIMITER, "*", "%")):
        rx = "INBOX" + "".join(out[5:])
    return re.compile(rx, re.DOTALL)


def _compress_set(nums: list[int]) -> str:
    """`1,2,3,5` as `1:3,5`."""
    out: list[str] = []
    nums = sorted(nums)
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}:{nums[j]}")
        i = j + 1
    return ",".join(out)
