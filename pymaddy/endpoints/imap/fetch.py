"""FETCH, SEARCH, SORT and THREAD for a session (RFC 3501 §6.4, RFC 5256, RFC 7162).

Message text is read only when an item needs it: FLAGS/UID/sizes come from the
index row, ENVELOPE and HEADER.FIELDS from the cached header, and only body
sections and a first BODYSTRUCTURE parse the whole message. What is parsed is
remembered in the row (`messages.header/envelope/bodystructure`).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pymaddy.imap import parser as P
from pymaddy.imap import search as S
from pymaddy.imap import searchindex, wire
from pymaddy.imap import thread as T
from pymaddy.imap.message import ParsedMessage, envelope_from_header, header_fields, sort_info
from pymaddy.imap.types import FetchItem, FetchRequest, Section
from pymaddy.storage.mailstore import Msg, split_header

if TYPE_CHECKING:
    from pymaddy.endpoints.imap.session import Session, View

META_BATCH = 2000
CONTENT_BATCH = 100
FLUSH_AT = 256 * 1024
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def internaldate(ts: int) -> str:
    d = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return f'"{d.day:02d}-{_MONTHS[d.month - 1]}-{d.year:04d} {d.hour:02d}:{d.minute:02d}:{d.second:02d} +0000"'


def _batches(uids: Sequence[int], n: int) -> Iterator[Sequence[int]]:
    for i in range(0, len(uids), n):
        yield uids[i: i + n]


def _needs(items: list[FetchItem]) -> tuple[bool, bool, bool]:
    """(full text, header, cached ENVELOPE/BODYSTRUCTURE) the items need beyond the index row."""
    content = header = caches = False
    for it in items:
        if it.name in ("RFC822", "RFC822.TEXT", "BODY"):
            content = True
        elif it.name == "BODYSTRUCTURE":
            caches = True
        elif it.name == "ENVELOPE":
            caches = header = True
        elif it.name == "RFC822.HEADER":
            header = True
        elif it.section is not None:
            sec = it.section
            if sec.part or sec.specifier in ("", "TEXT", "MIME"):
                content = True
            else:
                header = True
    return content, header, caches


def _sets_seen(items: list[FetchItem]) -> bool:
    return any(it.name in ("RFC822", "RFC822.TEXT") or (it.section is not None and not it.peek) for it in items)


async def fetch(sess: Session, v: View, uids: list[int], req: FetchRequest, by_uid: bool) -> None:
    st = sess._acct()
    items = list(req.items)
    names = {it.name for it in items}
    if by_uid and "UID" not in names:
        items.insert(0, FetchItem("UID"))
    if req.changedsince is not None and "MODSEQ" not in names:
        items.append(FetchItem("MODSEQ"))
    content, header, caches = _needs(items)
    if _sets_seen(items) and not v.readonly:
        unseen = [m.uid for m in await st.fetch(v.mailbox_id, uids) if "\\Seen" not in m.flags]
        if unseen:
            changed, _ = await st.store_flags(v.mailbox_id, unseen, "+", ["\\Seen"])
            for _uid, _fl, ms in changed:
                v.own_modseqs.add(ms)
            if changed:
                sess._caught_up()
            if "FLAGS" not in names:
                items.append(FetchItem("FLAGS"))
    batch = CONTENT_BATCH if content else META_BATCH
    for part in _batches(uids, batch):
        rows = await st.fetch(v.mailbox_id, part, content=content, header=header, caches=caches)
        if caches and not content:
            # BODYSTRUCTURE not cached yet: those rows need their text after all.
            missing = [m.uid for m in rows if m.bodystructure is None] if any(
                it.name == "BODYSTRUCTURE" for it in items) else []
            if missing:
                full = {m.uid: m for m in await st.fetch(v.mailbox_id, missing, content=True)}
                rows = [full.get(m.uid, m) for m in rows]
        saved: list[tuple[int, bytes | None, str | None, str | None]] = []
        for m in rows:
            if req.changedsince is not None and m.modseq <= req.changedsince:
                continue
            seq = v.seq_of(m.uid)
            if not seq:
                continue
            out = _render(sess, v, m, items, saved)
            sess.send(b"* %d FETCH (" % seq + b" ".join(out) + b")")
        if saved:
            await st.save_caches(saved)
        if sum(len(b) for b in sess.stream.out) > FLUSH_AT:
            await sess.flush()


def _render(sess: Session, v: View, m: Msg, items: list[FetchItem],
            caches: list[tuple[int, bytes | None, str | None, str | None]]) -> list[bytes]:
    parsed: ParsedMessage | None = None
    hdr = m.header
    new_hdr = new_env = new_bs = None

    def message() -> ParsedMessage:
        nonlocal parsed
        if parsed is None:
            parsed = ParsedMessage.parse(m.data or b"")
        return parsed

    def header_bytes() -> bytes:
        nonlocal hdr, new_hdr
        if hdr is None:
            hdr = new_hdr = split_header(m.data or b"")
        return hdr

    out: list[bytes] = []
    for it in items:
        n = it.name
        if n == "UID":
            out.append(b"UID %d" % m.uid)
        elif n == "FLAGS":
            fl = list(m.flags)
            if m.uid in v.recent:
                fl.append("\\Recent")
            out.append(("FLAGS (" + " ".join(fl) + ")").encode())
        elif n == "INTERNALDATE":
            out.append(b"INTERNALDATE " + internaldate(m.internaldate).encode())
        elif n == "RFC822.SIZE":
            out.append(b"RFC822.SIZE %d" % m.size)
        elif n == "MODSEQ":
            out.append(b"MODSEQ (%d)" % m.modseq)
        elif n == "ENVELOPE":
            env = m.envelope
            if env is None:
                env = new_env = envelope_from_header(header_bytes()).decode("utf-8", "surrogateescape")
            out.append(b"ENVELOPE " + env.encode("utf-8", "surrogateescape"))
        elif n == "BODYSTRUCTURE":
            bs = m.bodystructure
            if bs is None:
                bs = new_bs = message().bodystructure(True).decode("utf-8", "surrogateescape")
            out.append(b"BODYSTRUCTURE " + bs.encode("utf-8", "surrogateescape"))
        elif n == "BODY" and it.section is None:
            out.append(b"BODY " + message().bodystructure(False))
        elif n == "RFC822":
            out.append(b"RFC822 " + wire.literal(m.data or b""))
        elif n == "RFC822.HEADER":
            out.append(b"RFC822.HEADER " + wire.literal(header_bytes()))
        elif n == "RFC822.TEXT":
            data = m.data or b""
            out.append(b"RFC822.TEXT " + wire.literal(data[len(split_header(data)):]))
        elif it.section is not None:
            sec = it.section
            if not sec.part and sec.specifier == "HEADER.FIELDS":
                data_: bytes | None = _fields_cached(m, sec.fields, header_bytes)
            else:
                data_ = _section(sec, header_bytes, message)
            if data_ is not None and it.partial is not None:
                start, length = it.partial
                data_ = data_[start: start + length]
            name = it.response_name().encode()
            out.append(name + b" " + (b"NIL" if data_ is None else wire.literal(data_)))
    if new_hdr is not None or new_env is not None or new_bs is not None:
        caches.append((m.id, new_hdr, new_env, new_bs))
    return out


_FIELDS_RES: dict[tuple[str, ...], re.Pattern[bytes]] = {}
_BLANK_LINE = re.compile(rb"(?m)^\r*(?:\n|\Z)")
_NOT_A_FIELD = re.compile(rb"(?m)^(?::|[^ \t\r\n:][^:\n]*(?:\n|\Z))")  # neither a field nor a continuation


def header_fields_fast(header: bytes, names: tuple[str, ...]) -> bytes:
    """HEADER.FIELDS (RFC 3501 §6.4.5) by one regex scan: the same bytes as
    pymaddy.imap.message.header_fields(…, exclude=False), for the header listings every client
    fetches."""
    rx = _FIELDS_RES.get(names)
    if rx is None:
        alt = b"|".join(re.escape(n.encode("ascii", "replace")) for n in names)
        rx = re.compile(rb"(?im)^(?:" + alt + rb")[ \t]*:.*(?:\r?\n[ \t].*)*(?:\r?\n)?")
        if len(_FIELDS_RES) < 256:
            _FIELDS_RES[names] = rx
    blank = _BLANK_LINE.search(header)  # the header ends at its first empty line
    block = header if blank is None else header[: blank.start()]
    if _NOT_A_FIELD.search(block):
        return header_fields(header, set(names), False)  # malformed lines: the reference's rules
    parts = [p if p.endswith(b"\n") else p + b"\r\n" for p in rx.findall(block)]
    parts.append(b"\n" if b"\r\n" not in header and b"\n" in header else b"\r\n")
    return b"".join(parts)


# HEADER.FIELDS answers by message: what a client's header listing asks for again at every
# sync (Dovecot keeps the same in its cache file). Messages never change; the key holds the
# row id with the blob key and the per-copy prefix, so a row id SQLite hands out again after an
# expunge cannot find another message's answer.
_FIELDS_CACHE: dict[tuple[int, str, bytes, tuple[str, ...]], bytes] = {}
FIELDS_CACHE_MAX = 20_000


def _fields_cached(m: Msg, names: tuple[str, ...], header: Any) -> bytes:
    key = (m.id, m.blob_key, m.prefix, names)
    out = _FIELDS_CACHE.get(key)
    if out is None:
        out = header_fields_fast(header(), names)
        if len(_FIELDS_CACHE) >= FIELDS_CACHE_MAX:
            del _FIELDS_CACHE[next(iter(_FIELDS_CACHE))]  # the oldest entry
        _FIELDS_CACHE[key] = out
    return out


def _section(sec: Section, header: Any, message: Any) -> bytes | None:
    if not sec.part:
        if sec.specifier == "HEADER":
            return bytes(header())
        if sec.specifier == "HEADER.FIELDS":
            return header_fields_fast(header(), sec.fields)
        if sec.specifier == "HEADER.FIELDS.NOT":
            return header_fields(header(), set(sec.fields), True)
    result: bytes | None = message().section(sec)
    return result


# -- SEARCH -------------------------------------------------------------------------------------------


class _Target:
    """A message as the SEARCH evaluator sees it; header and body are parsed on first use."""

    __slots__ = ("_full", "_hdr", "_m", "flags", "internaldate", "modseq", "recent", "seq", "size", "uid")

    def __init__(self, seq: int, m: Msg, recent: bool) -> None:
        self.seq = seq
        self.uid = m.uid
        self.flags = frozenset(m.flags) | ({"\\Recent"} if recent else frozenset())
        self.size = m.size
        self.internaldate = float(m.internaldate)
        self.modseq = m.modseq
        self.recent = recent
        self._m = m
        self._hdr: ParsedMessage | None = None
        self._full: ParsedMessage | None = None

    def _header_msg(self) -> ParsedMessage:
        if self._hdr is None:
            h = self._m.header if self._m.header is not None else split_header(self._m.data or b"")
            self._hdr = ParsedMessage.parse(h)
        return self._hdr

    def _full_msg(self) -> ParsedMessage:
        if self._full is None:
            self._full = ParsedMessage.parse(self._m.data or b"")
        return self._full

    def header_values(self, name: str) -> list[str]:
        # A regex scan of the raw header instead of a MIME parse: SEARCH reads one or two fields of
        # every message, and this is what keeps a header search of a large mailbox fast.
        h = self._m.header if self._m.header is not None else split_header(self._m.data or b"")
        return searchindex.field_values(h, name)

    def sent_date(self) -> datetime.date | None:
        info = sort_info(self._m.header if self._m.header is not None else split_header(self._m.data or b""))
        if info.date is None:
            return None
        return datetime.datetime.fromtimestamp(info.date, datetime.UTC).date()

    def body_text(self) -> str:
        return self._full_msg().search_text(header=False, body=True)

    def full_text(self) -> str:
        return self._full_msg().search_text(header=True, body=True)


_NON_ASCII_GLOB = "*[^\x01-\x7f]*"


def prefilter(key: Any) -> tuple[str, list[Any]]:
    """An SQL condition every message matching `key` satisfies, to skip loading the others.

    For each header key the whole search must satisfy (the key itself or a member of a top-level
    AND) with a plain ASCII value and no whitespace: the raw header contains the value (LIKE is
    ASCII case-insensitive), or the header holds encoded words or non-ASCII text (whose decoding or
    case folding could produce it), or is not cached. Exact matching is still done by the evaluator.
    """
    keys = list(key.keys) if isinstance(key, P.And) else [key]
    conds: list[str] = []
    args: list[Any] = []
    for k in keys:
        if not isinstance(k, P.HeaderKey) or not k.value or not k.value.isascii():
            continue
        if any(ch.isspace() for ch in k.value) or len(conds) >= 4:
            continue
        pat = "%" + k.value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        # (LIKE and GLOB only look at TEXT: the header BLOB is read as UTF-8 text for them.)
        # Cheapest test first: SQLite stops at the first true term of an OR.
        conds.append("(m.header IS NULL OR instr(m.header, '=?') > 0 "
                     "OR CAST(m.header AS TEXT) LIKE ? ESCAPE '\\' OR CAST(m.header AS TEXT) GLOB ?)")
        args += [pat, _NON_ASCII_GLOB]
    return " AND ".join(conds), args


def to_sql(key: Any, largest_uid: int) -> tuple[str, list[Any]] | None:
    """The whole search as an SQL condition on `m`, when it only asks about index data (flags,
    sizes, MODSEQ, INTERNALDATE, UIDs); None when any part needs the message or session state
    (\\Recent, sequence numbers). Mirrors pymaddy.imap.search.matches for those keys."""
    match key:
        case P.AllKey():
            return "1", []
        case P.HeaderKey(field=field, value=value):
            return searchindex.condition(field, value)  # the caller makes sure the rows are indexed
        case P.FlagKey(flag=flag, negate=negate):
            if flag.lower() == "\\recent":
                return None
            cond = "instr(' ' || lower(m.flags) || ' ', ?) > 0"
            return (f"NOT {cond}" if negate else cond), [" " + flag.lower() + " "]
        case P.NumberKey(op="LARGER", n=n):
            return "m.size > ?", [n]
        case P.NumberKey(op="SMALLER", n=n):
            return "m.size < ?", [n]
        case P.NumberKey(op="MODSEQ", n=n):
            return "m.modseq >= ?", [n]
        case P.DateKey(op=op, date=d) if op in ("BEFORE", "ON", "SINCE"):
            # INTERNALDATE's date in UTC (pymaddy.imap.search._match_date)
            start = int(datetime.datetime(d.year, d.month, d.day, tzinfo=datetime.UTC).timestamp())
            if op == "BEFORE":
                return "m.internaldate < ?", [start]
            if op == "SINCE":
                return "m.internaldate >= ?", [start]
            return "(m.internaldate >= ? AND m.internaldate < ?)", [start, start + 86400]
        case P.SeqKey(seqset=seqset, uid=True):
            ranges = seqset.resolve(largest_uid) if largest_uid else []
            if not ranges:
                return "0", []
            if len(ranges) > 50:
                return None
            return "(" + " OR ".join("m.uid BETWEEN ? AND ?" for _ in ranges) + ")", [x for r in ranges for x in r]
        case P.Not(key=k):
            inner = to_sql(k, largest_uid)
            return None if inner is None else (f"NOT ({inner[0]})", inner[1])
        case P.Or(left=a, right=b):
            left, right = to_sql(a, largest_uid), to_sql(b, largest_uid)
            if left is None or right is None:
                return None
            return f"(({left[0]}) OR ({right[0]}))", left[1] + right[1]
        case P.And(keys=ks):
            parts = [to_sql(k, largest_uid) for k in ks]
            if any(p is None for p in parts):
                return None
            return "(" + " AND ".join(f"({p[0]})" for p in parts if p) + ")", [a for p in parts if p for a in p[1]]
    return None


async def _candidates(sess: Session, v: View, key: Any) -> list[tuple[int, Msg]]:
    need = S.needs(key)
    where, args = prefilter(key)
    rows = await sess._acct().fetch(v.mailbox_id, None, content="body" in need, header="header" in need,
                                    having=(where, args), rows_hint=len(v.uids))
    out = []
    for m in rows:
        seq = v.seq_of(m.uid)
        if seq:
            out.append((seq, m))
    return out


async def _matching(sess: Session, v: View, key: Any) -> list[tuple[int, Msg]]:
    rows = await _candidates(sess, v, key)
    largest_seq = len(v.uids)
    largest_uid = v.uids[-1] if v.uids else 0
    caches: list[tuple[int, bytes | None, str | None, str | None]] = []
    out = []
    for seq, m in rows:
        if S.matches(key, _Target(seq, m, m.uid in v.recent), largest_seq, largest_uid):
            out.append((seq, m))
        if m.header is None and m.data is not None:
            caches.append((m.id, split_header(m.data), None, None))
    if caches:
        await sess._acct().save_caches(caches)
    return out


async def search(sess: Session, v: View, key: Any, by_uid: bool) -> list[int]:
    sql = to_sql(key, v.uids[-1] if v.uids else 0)
    if sql is not None:
        # Index data only: the database answers, no message is looked at in Python.
        if S.needs(key):
            await sess._acct().index_for_search(v.mailbox_id)
        uids = await sess._acct().search_uids(v.mailbox_id, sql, rows_hint=len(v.uids))
        out = []
        for uid in uids:
            seq = v.seq_of(uid)
            if seq:
                out.append(uid if by_uid else seq)
        return out
    return [m.uid if by_uid else seq for seq, m in await _matching(sess, v, key)]


def uses_modseq(key: Any) -> bool:
    """RFC 7162 §3.1.5: a SEARCH with MODSEQ answers with the highest mod-sequence of the result."""
    return "MODSEQ" in repr(key).upper()


async def max_modseq(sess: Session, v: View, ids: list[int], by_uid: bool) -> int:
    uids = ids if by_uid else [v.uids[i - 1] for i in ids if 0 < i <= len(v.uids)]
    rows = await sess._acct().fetch(v.mailbox_id, uids)
    return max((m.modseq for m in rows), default=0)


def _thread_msgs(v: View, rows: list[tuple[int, Msg]], by_uid: bool) -> list[T.ThreadMsg]:
    out = []
    for seq, m in rows:
        h = m.header if m.header is not None else split_header(m.data or b"")
        out.append(T.ThreadMsg(m.uid if by_uid else seq, sort_info(h), float(m.internaldate), m.size))
    return out


async def sort(sess: Session, v: View, criteria: list[tuple[str, bool]], key: Any, by_uid: bool) -> list[int]:
    rows = await _matching_with_headers(sess, v, key)
    return T.sort_ids(_thread_msgs(v, rows, by_uid), criteria)


async def thread(sess: Session, v: View, algorithm: str, key: Any, by_uid: bool) -> bytes:
    rows = await _matching_with_headers(sess, v, key)
    msgs = _thread_msgs(v, rows, by_uid)
    threads = T.thread_references(msgs) if algorithm == "REFERENCES" else T.thread_orderedsubject(msgs)
    return T.format_threads(threads)


async def _matching_with_headers(sess: Session, v: View, key: Any) -> list[tuple[int, Msg]]:
    rows = await _matching(sess, v, key)
    missing = [m.uid for _, m in rows if m.header is None and m.data is None]
    if missing:
        full = {m.uid: m for m in await sess._acct().fetch(v.mailbox_id, missing, header=True)}
        rows = [(seq, full.get(m.uid, m)) for seq, m in rows]
    return rows
