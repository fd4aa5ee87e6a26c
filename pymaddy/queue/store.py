"""maddy's on-disk queue format (spec §E): `<id>.header`, `<id>.body`, `<id>.meta`.

* `.header`: the RFC 5322 header block as it would be sent, ending with the empty line;
* `.body`: the body octets after that line;
* `.meta`: one JSON object with Go's field names (maddy's QueueMetadata, encoding/json
  without tags), so a directory written by maddy loads here unchanged and the reverse.

Crash safety: a `.meta` exists only once its header and body are on disk. A message is
written as header + body, then both are fsynced, then the meta goes to `.meta.new`, is
fsynced and renamed over `.meta`, and the directory is fsynced (the rename itself must
survive a power loss before the client hears 250). Metadata updates use the same
write-new/fsync/rename, so a crash leaves either the old or the new meta, never half of one.

Everything here blocks (it is plain file I/O); the queue runs it in a worker thread.
`Faults` lets tests stop the sequence at any named step, as a crash there would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pymaddy.mail.message import Body, ConnInfo, Header, MsgMeta

META, HEADER, BODY, BROKEN, NEW = ".meta", ".header", ".body", ".meta_broken", ".meta.new"

# pymaddy's own key in .meta; Go's decoder ignores unknown fields, so maddy still reads the file.
DELAY_NOTIFIED_KEY = "PymaddyDelayNotified"

ZERO_TIME = "0001-01-01T00:00:00Z"  # Go's zero time.Time

KEEP_BODY = 64 * 1024  # write_message returns bodies up to this size


class MetaError(Exception):
    """A .meta file that cannot be read or understood."""


class MissingFiles(Exception):
    """The header or body of an entry is gone."""


@dataclass
class RcptError:
    """go-smtp's SMTPError as stored in RcptErrs: {Code, EnhancedCode[3], Message}."""

    code: int
    enhanced: tuple[int, int, int]
    message: str

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def __str__(self) -> str:
        # go-smtp's SMTPError.Error(), used in the text part of DSNs
        return f"SMTP error {self.code:03d}: {self.message}" if self.message else f"SMTP error {self.code:03d}"


@dataclass
class QueueMeta:
    """maddy's QueueMetadata."""

    msg: MsgMeta
    mail_from: str
    to: list[str] = field(default_factory=list)
    failed_rcpts: list[str] = field(default_factory=list)
    temp_failed_rcpts: list[str] = field(default_factory=list)
    rcpt_errs: dict[str, RcptError] = field(default_factory=dict)
    tries: dict[str, int] = field(default_factory=dict)
    first_attempt: float = 0.0  # unix time; 0 is Go's zero time
    last_attempt: float = 0.0
    delay_notified: bool = False  # pymaddy: the "delayed" DSN was sent
    smtp_opts_extra: dict[str, Any] = field(default_factory=dict)  # Return, EnvelopeID, Auth: kept verbatim
    msg_extra: dict[str, Any] = field(default_factory=dict)  # MsgMeta fields we do not model


# -- timestamps ----------------------------------------------------------------------------------


def format_time(ts: float) -> str:
    """Go's time.Time JSON form (RFC 3339 with trailing zeros of the fraction dropped), in UTC."""
    if ts <= 0:
        return ZERO_TIME
    dt = datetime.fromtimestamp(ts, UTC)
    s = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if dt.microsecond:
        s += "." + f"{dt.microsecond:06d}".rstrip("0")
    return s + "Z"


def parse_time(v: Any) -> float:
    if v is None or v == ZERO_TIME:
        return 0.0
    if not isinstance(v, str):
        raise MetaError(f"bad timestamp {v!r}")
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise MetaError(f"bad timestamp {v!r}") from None
    if dt.year <= 1:
        return 0.0
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


# -- JSON ----------------------------------------------------------------------------------------

_MSG_KNOWN = {"ID", "OriginalFrom", "DontTraceSender", "Quarantine", "OriginalRcpts", "SMTPOpts", "Conn",
              "TLSRequireOverride"}
_OPTS_KNOWN = {"Body", "Size", "RequireTLS", "UTF8"}


def meta_to_json(m: QueueMeta) -> dict[str, Any]:
    """The JSON object maddy's encoder writes; Conn is always null (it is not serializable)."""
    mm = m.msg
    opts: dict[str, Any] = {
        "Body": "8BITMIME" if mm.body_8bit else "",
        "Size": mm.size,
        "RequireTLS": mm.requiretls,
        "UTF8": mm.smtputf8,
        "Return": "",
        "EnvelopeID": "",
        "Auth": None,
    }
    opts.update(m.smtp_opts_extra)
    msg: dict[str, Any] = {
        "ID": mm.id,
        "OriginalFrom": mm.original_from,
        "DontTraceSender": mm.dont_trace_sender,
        "Quarantine": mm.quarantine,
        "OriginalRcpts": dict(mm.original_rcpts) or None,
        "SMTPOpts": opts,
        "Conn": None,
        "TLSRequireOverride": mm.tls_required_override,
    }
    msg.update(m.msg_extra)
    out: dict[str, Any] = {
        "MsgMeta": msg,
        "From": m.mail_from,
        "To": list(m.to) or None,
        "FailedRcpts": list(m.failed_rcpts) or None,
        "TemporaryFailedRcpts": list(m.temp_failed_rcpts) or None,
        "RcptErrs": {r: {"Code": e.code, "EnhancedCode": list(e.enhanced), "Message": e.message}
                     for r, e in m.rcpt_errs.items()},
        "TriesCount": dict(m.tries) or None,
        "FirstAttempt": format_time(m.first_attempt),
        "LastAttempt": format_time(m.last_attempt),
    }
    if m.delay_notified:
        out[DELAY_NOTIFIED_KEY] = True
    return out


def _str_list(v: Any, what: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise MetaError(f"{what}: expected a list of strings")
    return list(v)


def _str_map(v: Any, what: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise MetaError(f"{what}: expected an object")
    return v


def _bool(v: Any) -> bool:
    return bool(v) if isinstance(v, bool) else False


def meta_from_json(obj: Any) -> QueueMeta:
    """Decode like Go's encoding/json would into QueueMetadata (missing fields keep zero values)."""
    if not isinstance(obj, dict):
        raise MetaError("meta-data is not a JSON object")
    mraw = _str_map(obj.get("MsgMeta"), "MsgMeta")
    opts = _str_map(mraw.get("SMTPOpts"), "SMTPOpts")
    rcpts = {str(k): str(v) for k, v in _str_map(mraw.get("OriginalRcpts"), "OriginalRcpts").items()}
    size = opts.get("Size", 0)
    mm = MsgMeta(
        id=str(mraw.get("ID") or ""),
        conn=ConnInfo(),
        original_from=str(mraw.get("OriginalFrom") or ""),
        original_rcpts=rcpts,
        smtputf8=_bool(opts.get("UTF8")),
        body_8bit=opts.get("Body") in ("8BITMIME", "BINARYMIME"),
        requiretls=_bool(opts.get("RequireTLS")),
        tls_required_override=_bool(mraw.get("TLSRequireOverride")),
        size=size if isinstance(size, int) else 0,
        quarantine=_bool(mraw.get("Quarantine")),
        dont_trace_sender=_bool(mraw.get("DontTraceSender")),
    )
    errs: dict[str, RcptError] = {}
    for rcpt, e in _str_map(obj.get("RcptErrs"), "RcptErrs").items():
        if e is None:
            continue
        if not isinstance(e, dict):
            raise MetaError("RcptErrs: expected objects")
        enh = e.get("EnhancedCode") or [0, 0, 0]
        if not isinstance(enh, list) or len(enh) != 3 or not all(isinstance(x, int) for x in enh):
            raise MetaError("RcptErrs: bad EnhancedCode")
        code = e.get("Code", 0)
        errs[rcpt] = RcptError(code if isinstance(code, int) else 0, (enh[0], enh[1], enh[2]),
                               str(e.get("Message") or ""))
    tries: dict[str, int] = {}
    for rcpt, n in _str_map(obj.get("TriesCount"), "TriesCount").items():
        if not isinstance(n, int) or isinstance(n, bool):
            raise MetaError("TriesCount: expected integers")
        tries[rcpt] = n
    mail_from = obj.get("From", "")
    if not isinstance(mail_from, str):
        raise MetaError("From: expected a string")
    return QueueMeta(
        msg=mm,
        mail_from=mail_from,
        to=_str_list(obj.get("To"), "To"),
        failed_rcpts=_str_list(obj.get("FailedRcpts"), "FailedRcpts"),
        temp_failed_rcpts=_str_list(obj.get("TemporaryFailedRcpts"), "TemporaryFailedRcpts"),
        rcpt_errs=errs,
        tries=tries,
        first_attempt=parse_time(obj.get("FirstAttempt")),
        last_attempt=parse_time(obj.get("LastAttempt")),
        delay_notified=_bool(obj.get(DELAY_NOTIFIED_KEY)),
        smtp_opts_extra={k: v for k, v in opts.items() if k not in _OPTS_KNOWN},
        msg_extra={k: v for k, v in mraw.items() if k not in _MSG_KNOWN},
    )


def encode_meta(m: QueueMeta) -> bytes:
    # Go's json.Encoder writes compact JSON, HTML-escaped, with a trailing newline.
    return json.dumps(meta_to_json(m), separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def decode_meta(data: bytes) -> QueueMeta:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise MetaError(f"invalid JSON: {e}") from None
    return meta_from_json(obj)


# -- files ---------------------------------------------------------------------------------------

FaultHook = Callable[[str], None]


def _no_fault(point: str) -> None:
    return None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def valid_id(entry_id: str) -> bool:
    """An ID that names a file inside the queue directory and nothing else."""
    return bool(entry_id) and "/" not in entry_id and "\0" not in entry_id and entry_id not in (".", "..")


@dataclass
class ScanResult:
    ids: list[str]
    dangling_removed: list[str]


class Store:
    """One queue directory. `fault(point)` is called before each step (tests raise there)."""

    def __init__(self, location: str, fault: FaultHook | None = None) -> None:
        self.location = location
        self.fault = fault or _no_fault

    def path(self, entry_id: str, ext: str) -> str:
        if not valid_id(entry_id):
            raise ValueError(f"invalid queue entry ID {entry_id!r}")
        return os.path.join(self.location, entry_id + ext)

    def ensure_dir(self) -> None:
        os.makedirs(self.location, mode=0o777, exist_ok=True)

    def exists(self, entry_id: str) -> bool:
        return any(os.path.exists(self.path(entry_id, ext)) for ext in (META, HEADER, BODY))

    # writing a new message

    def write_message(self, entry_id: str, header: bytes, body: Body) -> bytes | None:
        """Write header and body (not yet synced). Raises FileExistsError if the ID is taken.

        Returns the body's bytes when it is at most KEEP_BODY long (the queue hands them to
        the first attempt instead of reading the file back), else None."""
        hp, bp = self.path(entry_id, HEADER), self.path(entry_id, BODY)
        self.fault("header.write")
        fd = os.open(hp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        made = [hp]
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header)
            self.fault("body.write")
            with open(bp, "xb") as f:
                made.append(bp)
                data: bytes | None = None
                if body.size <= KEEP_BODY:
                    data = body.read_all()
                    f.write(data)
                else:
                    with body.open() as src:
                        shutil.copyfileobj(src, f, 1 << 20)
            return data
        except Exception:
            self._unlink(*made)
            raise

    def commit_message(self, entry_id: str, meta: QueueMeta) -> None:
        """fsync header and body, then write the meta atomically: after this the entry is durable."""
        hp, bp = self.path(entry_id, HEADER), self.path(entry_id, BODY)
        try:
            self.fault("header.fsync")
            self._fsync_file(hp)
            self.fault("body.fsync")
            self._fsync_file(bp)
            self.write_meta(entry_id, meta)
        except Exception:
            # Not durable, so the client hears 4xx: leave nothing (the ID was new, see O_EXCL).
            self._unlink(self.path(entry_id, NEW), hp, bp, self.path(entry_id, META))
            raise

    def write_meta(self, entry_id: str, meta: QueueMeta) -> None:
        """`.meta.new` → fsync → rename → fsync dir (an update leaves old or new, never a mix)."""
        mp, np_ = self.path(entry_id, META), self.path(entry_id, NEW)
        data = encode_meta(meta)
        self.fault("meta.write")
        fd = os.open(np_, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                self.fault("meta.fsync")
                os.fsync(fd)
            finally:
                os.close(fd)
            self.fault("meta.rename")
            os.rename(np_, mp)
        except Exception:
            self._unlink(np_)
            raise
        self.fault("dir.fsync")
        _fsync_dir(self.location)

    @staticmethod
    def _fsync_file(path: str) -> None:
        # Dirty pages belong to the file, not the descriptor: fsync on a new one flushes them.
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _unlink(*paths: str) -> None:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    # reading

    def read_meta(self, entry_id: str) -> QueueMeta:
        try:
            with open(self.path(entry_id, META), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise MetaError(str(e)) from None
        return decode_meta(data)

    def read_header(self, entry_id: str) -> Header:
        try:
            with open(self.path(entry_id, HEADER), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise MissingFiles(f"header file doesn't exist for msg ID = {entry_id}") from None
        return parse_header_block(data)

    def body(self, entry_id: str) -> Body:
        p = self.path(entry_id, BODY)
        try:
            size = os.path.getsize(p)
        except FileNotFoundError:
            raise MissingFiles(f"body file doesn't exist for msg ID = {entry_id}") from None
        return Body(path=p, size=size)

    # removing

    def remove(self, entry_id: str) -> None:
        """Header and body first, meta last (maddy's order: a meta without files is cleaned at load).

        No `.meta.new` to look for: write_meta removes its own on failure, and one left by a
        crash is dropped by scan() at the next start."""
        self._unlink(self.path(entry_id, HEADER), self.path(entry_id, BODY), self.path(entry_id, META))

    def mark_broken(self, entry_id: str) -> None:
        """Rename `.meta` to `.meta_broken`: never loaded or retried again, kept for the admin."""
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path(entry_id, META), self.path(entry_id, BROKEN))

    def committed_ids(self) -> list[str]:
        """IDs whose meta, header and body all exist; touches nothing (the engine's periodic
        look for entries worker processes committed, while they may be writing others)."""
        names = set(os.listdir(self.location))
        return sorted(n[: -len(META)] for n in names
                      if n.endswith(META) and n[: -len(META)] + HEADER in names and n[: -len(META)] + BODY in names)

    # start-up

    def scan(self) -> ScanResult:
        """IDs of complete entries; deletes the files of incomplete ones (maddy deletes a meta whose
        header or body is missing; pymaddy also drops header/body/.meta.new left without a meta by
        a crash before the commit — no client was told 250 for those)."""
        names = set(os.listdir(self.location))
        ids: list[str] = []
        removed: list[str] = []
        metas = {n[: -len(META)] for n in names if n.endswith(META)}
        for entry_id in sorted(metas):
            if entry_id + HEADER in names and entry_id + BODY in names:
                ids.append(entry_id)
                continue
            for ext in (META, HEADER, BODY):
                if entry_id + ext in names:
                    self._unlink(self.path(entry_id, ext))
                    removed.append(entry_id + ext)
        keep = metas | {n[: -len(BROKEN)] for n in names if n.endswith(BROKEN)}
        for n in sorted(names):
            if n.endswith(NEW):  # an interrupted meta update: the old .meta stands
                self._unlink(os.path.join(self.location, n))
                continue
            for ext in (HEADER, BODY):
                if n.endswith(ext) and n[: -len(ext)] not in keep and valid_id(n[: -len(ext)]):
                    self._unlink(os.path.join(self.location, n))
                    removed.append(n)
        return ScanResult(ids, removed)


def parse_header_block(data: bytes) -> Header:
    """A `.header` file: fields, then the empty line that ends the header (absent in some writers)."""
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        data = data[: end + 2]
    else:
        end = data.find(b"\n\n")
        if end >= 0:
            data = data[: end + 1]
        elif data in (b"\r\n", b"\n"):
            data = b""
    return Header.parse(data)
