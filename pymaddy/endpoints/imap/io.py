"""Buffered line/literal I/O for an IMAP connection, with STARTTLS and COMPRESS=DEFLATE.

The session reads through its own buffer rather than StreamReader.readuntil so
that the same code serves plain, TLS and deflate-compressed streams (RFC 4978:
everything after the tagged OK of COMPRESS is raw DEFLATE in both directions).
"""

from __future__ import annotations

import asyncio
import zlib

READ_CHUNK = 64 * 1024


class LineTooLong(Exception):
    pass


class Closed(Exception):
    pass


class IMAPStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.out: list[bytes] = []
        self._inflate: zlib._Decompress | None = None
        self._deflate: zlib._Compress | None = None

    @property
    def compressed(self) -> bool:
        return self._deflate is not None

    async def _fill(self) -> None:
        chunk = await self.reader.read(READ_CHUNK)
        if not chunk:
            raise Closed
        if self._inflate is not None:
            try:
                chunk = self._inflate.decompress(chunk)
            except zlib.error:
                raise Closed from None
        self.buf += chunk

    async def readline(self, limit: int) -> bytes:
        """One line including its LF; LineTooLong past `limit` bytes (the buffer is then discarded)."""
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > limit:
                self.buf.clear()
                raise LineTooLong
            start = len(self.buf)
            await self._fill()

    async def readexactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def discard(self, n: int) -> None:
        while n > 0:
            if not self.buf:
                await self._fill()
            k = min(n, len(self.buf))
            del self.buf[:k]
            n -= k

    def has_buffered(self) -> bool:
        return bool(self.buf)

    def write(self, data: bytes) -> None:
        self.out.append(data)

    async def flush(self) -> None:
        if not self.out:
            return
        data = b"".join(self.out)
        self.out.clear()
        if self._deflate is not None:
            data = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        self.writer.write(data)
        await self.writer.drain()

    def start_compression(self) -> None:
        """Switch both directions to raw DEFLATE (RFC 4978 §3); bytes already buffered are compressed data."""
        self._inflate = zlib.decompressobj(-15)
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        if self.buf:
            pending, self.buf = bytes(self.buf), bytearray()
            try:
                self.buf += self._inflate.decompress(pending)
            except zlib.error:
                raise Closed from None
