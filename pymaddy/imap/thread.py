"""SORT and THREAD (RFC 5256, with RFC 5957 DISPLAYFROM/DISPLAYTO).

Pure functions over already-extracted per-message data (`SortInfo` from
pymaddy.imap.message plus INTERNALDATE and size), so the server can cache the
header-derived part and the algorithms stay testable against the RFC examples.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pymaddy.imap.message import SortInfo

__all__ = [
    "SORT_KEYS",
    "Thread",
    "ThreadMsg",
    "base_subject",
    "base_subject_ext",
    "format_threads",
    "sort_ids",
    "thread_orderedsubject",
    "thread_references",
]

_WS_RE = re.compile(r"[ \t\r\n]+")
# subj-blob = "[" *BLOBCHAR "]" *WSP
_BLOB = r"\[[^\[\]]*\][ \t]*"
# subj-refwd = ("re" / ("fw" ["d"])) *WSP [subj-blob] ":"
_REFWD_RE = re.compile(r"(?:re|fwd?)[ \t]*(?:" + _BLOB + r")?:", re.IGNORECASE)
_BLOB_RE = re.compile(_BLOB)
_LEADING_WS_RE = re.compile(r"[ \t]+")
_NON_WS_RE = re.compile(r"[^ \t]")


def _strip_leaders(s: str) -> tuple[str, bool]:
    """RFC 5256 §2.1 steps 3-5: remove subj-leader and lone subj-blob prefixes until stable.

    Works with a start index instead of re-slicing so hostile subjects stay linear.
    """
    reply = False
    start = 0
    while True:
        # step 3: subj-leader = (*subj-blob subj-refwd) / WSP
        m = _LEADING_WS_RE.match(s, start)
        if m:
            start = m.end()
            continue
        pos = last = start
        while b := _BLOB_RE.match(s, pos):
            last, pos = pos, b.end()
        r = _REFWD_RE.match(s, pos)
        if r:
            start = r.end()
            reply = True
            continue
        # step 4, repeated by step 5: leading blobs go while something remains after them; a
        # subject made only of blobs keeps its last one
        if pos != start:
            start = pos if _NON_WS_RE.search(s, pos) else last
        return s[start:], reply


def base_subject_ext(subject: str) -> tuple[str, bool]:
    """Base subject (RFC 5256 §2.1) and whether the subject marked a reply or forward."""
    # step 1: encoded words are already decoded; tabs/continuations -> single spaces
    s = _WS_RE.sub(" ", subject)
    reply = False
    while True:
        # step 2: subj-trailer = "(fwd)" / WSP, removed repeatedly from the end
        end = len(s)
        while end:
            if s[end - 1] in " \t":
                end -= 1
            elif end >= 5 and s[end - 5 : end].lower() == "(fwd)":
                end -= 5
                reply = True
            else:
                break
        s = s[:end]
        # steps 3-5
        s, r = _strip_leaders(s)
        reply = reply or r
        # step 6: subj-fwd = "[fwd:" subject "]"
        if len(s) >= 6 and s[:5].lower() == "[fwd:" and s.endswith("]"):
            s = s[5:-1]
            reply = True
            continue
        return s, reply


def base_subject(subject: str) -> str:
    """RFC 5256 §2.1 base subject of an already RFC 2047-decoded subject."""
    return base_subject_ext(subject)[0]


@dataclass
class ThreadMsg:
    """One message as SORT/THREAD see it; `id` is the sequence number or UID to answer with."""

    id: int
    info: SortInfo
    internaldate: float
    size: int


@dataclass
class Thread:
    """A thread tree node; id None is a dummy (RFC 5256 §3 REFERENCES step 4/6)."""

    id: int | None
    children: list[Thread] = field(default_factory=list)


def _sent_date(m: ThreadMsg) -> float:
    # RFC 5256 §2.2: no (valid) Date: means the INTERNALDATE is the sent date
    return m.info.date if m.info.date is not None else m.internaldate


SORT_KEYS: dict[str, Callable[[ThreadMsg], float | int | str]] = {
    "ARRIVAL": lambda m: m.internaldate,
    "CC": lambda m: m.info.cc_mailbox.casefold(),
    "DATE": _sent_date,
    "FROM": lambda m: m.info.from_mailbox.casefold(),
    "SIZE": lambda m: m.size,
    "SUBJECT": lambda m: m.info.base_subject.casefold(),
    "TO": lambda m: m.info.to_mailbox.casefold(),
    "DISPLAYFROM": lambda m: m.info.from_display.casefold(),  # RFC 5957
    "DISPLAYTO": lambda m: m.info.to_display.casefold(),
}


def sort_ids(msgs: list[ThreadMsg], criteria: list[tuple[str, bool]]) -> list[int]:
    """RFC 5256 §3 SORT: criteria are (key, reverse); ties fall back to id order.

    Implemented as successive stable sorts from the last criterion to the first,
    which Python's sort keeps stable even with reverse=True.  Unknown keys raise
    KeyError (the parser should have rejected them: BAD).
    """
    out = sorted(msgs, key=lambda m: m.id)
    for key, reverse in reversed(criteria):
        out.sort(key=SORT_KEYS[key.upper()], reverse=reverse)
    return [m.id for m in out]


def _by_date(msgs: list[ThreadMsg]) -> list[ThreadMsg]:
    return sorted(msgs, key=lambda m: (_sent_date(m), m.id))


def thread_orderedsubject(msgs: list[ThreadMsg]) -> list[Thread]:
    """RFC 5256 §3 ORDEREDSUBJECT: group by base subject, each thread flat under its first message."""
    groups: dict[str, list[ThreadMsg]] = {}
    for m in sorted(msgs, key=lambda m: (m.info.base_subject.casefold(), _sent_date(m), m.id)):
        groups.setdefault(m.info.base_subject.casefold(), []).append(m)
    firsts: list[tuple[float, int, Thread]] = []
    for g in groups.values():
        t = Thread(g[0].id, [Thread(m.id) for m in g[1:]])
        firsts.append((_sent_date(g[0]), g[0].id, t))
    firsts.sort(key=lambda x: (x[0], x[1]))
    return [t for _, _, t in firsts]


class _Node:
    """A REFERENCES container (RFC 5256 §3 step 1); msg None while it is a dummy."""

    __slots__ = ("children", "msg", "parent")

    def __init__(self, msg: ThreadMsg | None = None) -> None:
        self.msg = msg
        self.parent: _Node | None = None
        self.children: list[_Node] = []

    def is_ancestor_of(self, other: _Node) -> bool:
        if not self.children:
            return other is self  # cheap and common: a leaf is nobody's ancestor
        n: _Node | None = other
        while n is not None:
            if n is self:
                return True
            n = n.parent
        return False

    def unlink(self) -> None:
        if self.parent is not None:
            self.parent.children.remove(self)
            self.parent = None

    def link_to(self, parent: _Node) -> None:
        self.unlink()
        self.parent = parent
        parent.children.append(self)


def _node_key(n: _Node) -> tuple[float, int]:
    # a dummy sorts by its first child (RFC 5256 §3 steps 5 and 7)
    while n.msg is None:
        if not n.children:
            return (0.0, 0)
        n = n.children[0]
    return (_sent_date(n.msg), n.msg.id)


def thread_references(msgs: list[ThreadMsg]) -> list[Thread]:
    """RFC 5256 §3 REFERENCES threading."""
    table: dict[str, _Node] = {}
    nodes: list[_Node] = []
    # step 1
    for m in sorted(msgs, key=lambda m: m.id):
        mid = m.info.message_id
        node = table.get(mid) if mid else None
        if node is None or node.msg is not None:
            # missing or duplicate Message-ID: the message gets a unique one (step 1 note)
            node = _Node(m)
            if mid and mid not in table:
                table[mid] = node
        else:
            node.msg = m
        nodes.append(node)
        refs = list(m.info.references) or ([m.info.in_reply_to] if m.info.in_reply_to else [])
        # step 1.A: link the references chain without overriding links or making loops
        prev: _Node | None = None
        for ref in refs:
            cur = table.get(ref)
            if cur is None:
                cur = table[ref] = _Node()
            if prev is not None and cur.parent is None and not cur.is_ancestor_of(prev) and cur is not prev:
                cur.link_to(prev)
            prev = cur
        # step 1.B: the last reference is the parent, replacing any existing link
        if prev is not None and prev is not node and not node.is_ancestor_of(prev):
            node.link_to(prev)
        elif prev is None:
            node.unlink()
    # step 2: the root set
    roots = [n for n in {id(n): n for n in (*table.values(), *nodes)}.values() if n.parent is None]
    # step 4: prune dummies
    roots = _prune(roots)
    # step 5: sort the root set by sent date (dummies by their first child)
    for r in roots:
        if r.msg is None:
            r.children.sort(key=_node_key)
    roots.sort(key=_node_key)
    # step 6: merge by base subject
    roots = _group_by_subject(roots)
    # step 7: sort every level of siblings by sent date
    _sort_tree(roots)
    return [_to_thread(r) for r in roots]


def _preorder(roots: list[_Node]) -> list[_Node]:
    # iterative: reply chains thousands deep must not hit the recursion limit
    order: list[_Node] = []
    stack = list(roots)
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(n.children)
    return order


def _prune(roots: list[_Node]) -> list[_Node]:
    """RFC 5256 §3 step 4: drop childless dummies, splice other dummies' children upward
    (but not onto the root level unless there is just one child)."""
    for n in reversed(_preorder(roots)):  # children before their parents
        kids: list[_Node] = []
        for c in n.children:
            if c.msg is None:
                kids.extend(c.children)  # already pruned; none means the dummy just goes
            else:
                kids.append(c)
        for c in kids:
            c.parent = n
        n.children = kids
    out: list[_Node] = []
    for r in roots:
        if r.msg is None and len(r.children) <= 1:
            for c in r.children:
                c.parent = None
            out.extend(r.children)
        else:
            out.append(r)
    return out


def _subject_of(n: _Node) -> tuple[str, bool]:
    m = n.msg if n.msg is not None else (n.children[0].msg if n.children else None)
    if m is None:
        return "", False
    base, reply = base_subject_ext(m.info.subject)
    return base.casefold(), reply


def _group_by_subject(roots: list[_Node]) -> list[_Node]:
    """RFC 5256 §3 step 6: gather root-level threads sharing a base subject."""
    table: dict[str, _Node] = {}
    for r in roots:  # 6.A
        subj, reply = _subject_of(r)
        if not subj:
            continue
        old = table.get(subj)
        # 6.A.iii: only a message entry is replaced, by a dummy or by a non-reply over a reply
        if old is None or (old.msg is not None and (r.msg is None or (_subject_of(old)[1] and not reply))):
            table[subj] = r
    out = list(roots)
    for r in roots:  # 6.B
        if r.parent is not None:
            continue  # already placed under another thread
        subj, reply = _subject_of(r)
        t = table.get(subj) if subj else None
        if t is None or t is r:
            continue
        if t.msg is None and r.msg is None:
            # (a) both dummies: r's children join t's, r goes away
            for c in r.children:
                c.parent = t
            t.children.extend(r.children)
            r.children = []
            r.parent = t  # marks it as gone; it is never rendered
        elif t.msg is None or (reply and not _subject_of(t)[1]):
            # (b) into the dummy, (c) a reply under the original
            r.parent = t
            t.children.append(r)
        else:
            # (d) both become children of a new dummy that takes t's place in the table
            dummy = _Node()
            for x in (t, r):
                x.parent = dummy
                dummy.children.append(x)
            table[subj] = dummy
            out.append(dummy)
    return [n for n in out if n.parent is None]


def _sort_tree(roots: list[_Node]) -> None:
    # sibling order only depends on each node's own key, so the traversal order does not matter
    for n in _preorder(roots):
        n.children.sort(key=_node_key)
    roots.sort(key=_node_key)


def _to_thread(root: _Node) -> Thread:
    top = Thread(root.msg.id if root.msg is not None else None)
    stack = [(root, top)]
    while stack:
        n, t = stack.pop()
        for c in n.children:
            ct = Thread(c.msg.id if c.msg is not None else None)
            t.children.append(ct)
            stack.append((c, ct))
    return top


def _fmt(t: Thread) -> bytes:
    """One thread (RFC 5256 §4): a single child continues the chain, several are each parenthesized."""
    out: list[bytes] = []
    stack: list[bytes | Thread] = [t]
    while stack:
        x = stack.pop()
        if isinstance(x, bytes):
            out.append(x)
            continue
        pieces: list[bytes | Thread] = []
        if x.id is not None:
            pieces.append(b"%d" % x.id)
            if x.children:
                pieces.append(b" ")
        if len(x.children) == 1 and x.id is not None:
            pieces.append(x.children[0])
        else:
            for c in x.children:
                pieces.extend((b"(", c, b")"))
        stack.extend(reversed(pieces))
    return b"".join(out)


def format_threads(threads: list[Thread]) -> bytes:
    """Thread list in wire form, e.g. b"(1 2)(3 (4)(5))" (RFC 5256 §4 thread-list)."""
    return b"".join(b"(" + _fmt(t) + b")" for t in threads)
