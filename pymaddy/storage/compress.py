"""Message compression in the blob store (`compression off | lz4 [LEVEL] | zstd [LEVEL]`).

A blob records how it was stored (`blobs.compression`, NULL = plain), so
changing the setting never strands old messages: reads decompress by what the
row says, writes use what the config says. lz4 uses the frame format and zstd
its standard frames, so the stored bytes are what the `lz4`/`zstd` tools read.
"""

from __future__ import annotations

from typing import Any, Protocol


class Stream(Protocol):
    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class Codec(Protocol):
    name: str

    def compress(self, data: bytes) -> bytes: ...

    def stream(self) -> Stream:
        """A compressor for a message written in chunks (large messages go to blob files that way)."""
        ...


class _LZ4:
    name = "lz4"

    def __init__(self, level: int | None) -> None:
        import lz4.frame

        self._mod = lz4.frame
        self.level = 0 if level is None else level

    def compress(self, data: bytes) -> bytes:
        out: bytes = self._mod.compress(data, compression_level=self.level)
        return out

    def stream(self) -> Stream:
        return _LZ4Stream(self._mod.LZ4FrameCompressor(compression_level=self.level))


class _Zstd:
    name = "zstd"

    def __init__(self, level: int | None) -> None:
        import zstandard

        self._c = zstandard.ZstdCompressor(level=3 if level is None else level)

    def compress(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def stream(self) -> Stream:
        obj = self._c.compressobj()
        return _ZstdStream(obj)


class _LZ4Stream:
    def __init__(self, c: Any) -> None:
        self._c = c
        self._started = False

    def compress(self, data: bytes) -> bytes:
        head = b""
        if not self._started:
            head, self._started = self._c.begin(), True
        return head + bytes(self._c.compress(data))

    def flush(self) -> bytes:
        head = b"" if self._started else self._c.begin()
        self._started = True
        return head + bytes(self._c.flush())


class _ZstdStream:
    def __init__(self, c: Any) -> None:
        self._c = c

    def compress(self, data: bytes) -> bytes:
        return bytes(self._c.compress(data))

    def flush(self) -> bytes:
        return bytes(self._c.flush())


def codec(algo: str, level: int | None = None) -> Codec | None:
    """The codec for a `compression` setting; None for `off`. ValueError for an unknown name."""
    if algo in ("", "off"):
        return None
    if algo == "lz4":
        return _LZ4(level)
    if algo == "zstd":
        return _Zstd(level)
    raise ValueError(f"unknown compression algorithm {algo!r}")


def decompress(algo: str | None, data: bytes) -> bytes:
    if not algo:
        return data
    if algo == "lz4":
        import lz4.frame

        out: bytes = lz4.frame.decompress(data)
        return out
    if algo == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    raise ValueError(f"blob compressed with unknown algorithm {algo!r}")
