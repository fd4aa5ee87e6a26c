"""Message compression in the blob store (`compression off | lz4 [LEVEL] | zstd [LEVEL]`).

A blob records how it was stored (`blobs.compression`, NULL = plain), so
changing the setting never strands old messages: reads decompress by what the
row says, writes use what the config says. lz4 uses the frame format and zstd
its standard frames, so the stored bytes are what the `lz4`/`zstd` tools read.
"""

from __future__ import annotations

from typing import Protocol


class Codec(Protocol):
    name: str

    def compress(self, data: bytes) -> bytes: ...


class _LZ4:
    name = "lz4"

    def __init__(self, level: int | None) -> None:
        import lz4.frame

        self._mod = lz4.frame
        self.level = 0 if level is None else level

    def compress(self, data: bytes) -> bytes:
        out: bytes = self._mod.compress(data, compression_level=self.level)
        return out


class _Zstd:
    name = "zstd"

    def __init__(self, level: int | None) -> None:
        import zstandard

        self._c = zstandard.ZstdCompressor(level=3 if level is None else level)

    def compress(self, data: bytes) -> bytes:
        return self._c.compress(data)


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
