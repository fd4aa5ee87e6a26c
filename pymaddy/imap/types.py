"""Values shared by the IMAP parser, the MIME code and the server."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Section:
    """A BODY[...] section spec (RFC 3501 §6.4.5 `section`).

    part: MIME part numbers, () for the whole message.
    specifier: "" (the whole part), "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT" or "MIME".
    fields: upper-cased field names for HEADER.FIELDS(.NOT).
    """

    part: tuple[int, ...] = ()
    specifier: str = ""
    fields: tuple[str, ...] = ()

    def render(self) -> str:
        """The section as it is echoed in a FETCH response (`1.HEADER.FIELDS (FROM TO)`)."""
        parts = [".".join(str(p) for p in self.part)] if self.part else []
        if self.specifier:
            parts.append(self.specifier)
        s = ".".join(parts)
        if self.specifier.startswith("HEADER.FIELDS"):
            s += " (" + " ".join(self.fields) + ")"
        return s


@dataclass(frozen=True)
class FetchItem:
    """One FETCH data item.

    name: ENVELOPE, FLAGS, INTERNALDATE, RFC822, RFC822.HEADER, RFC822.SIZE, RFC822.TEXT, UID,
    BODY (no section: non-extensible BODYSTRUCTURE), BODYSTRUCTURE, MODSEQ, or "BODY[]" for
    a section fetch (see `section`, `peek`, `partial`).
    partial: (start, length) of `<start.length>`, or None.
    """

    name: str
    section: Section | None = None
    peek: bool = False
    partial: tuple[int, int] | None = None

    def response_name(self) -> str:
        """The name this item is answered under (BODY.PEEK[...] is answered as BODY[...]; partial as <start>)."""
        if self.section is None:
            return self.name
        s = f"BODY[{self.section.render()}]"
        if self.partial is not None:
            s += f"<{self.partial[0]}>"
        return s


@dataclass
class FetchRequest:
    items: list[FetchItem] = field(default_factory=list)
    changedsince: int | None = None  # CONDSTORE (RFC 7162 §3.1.4.1)
