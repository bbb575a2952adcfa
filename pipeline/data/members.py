"""A tar member of a local shard by reference: where its bytes are, not the bytes.

A 10-s crop of a minute of 48 kHz stereo FLAC needs a sixth of its 8 MB; reading the member whole costs
the rest, and a shuffle buffer of whole members holds gigabytes. The local shard reader
(pipeline.data.tars) hands such members on as a `MemberRef`, and a decoder that can seek (soundfile)
reads them through a `MemberView`: a read-only, seekable window on the shard file, each read going
straight into the caller's buffer with `preadv` (no copy, no shared file position).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MemberRef:
    """The member's data is bytes [offset, offset + size) of the file at `path`."""

    path: str
    offset: int
    size: int

    def open(self) -> MemberView:
        return MemberView(self)


class MemberView(io.RawIOBase):
    """The member as a read-only file positioned at its start; `bytes_read` counts what was read through it."""

    def __init__(self, ref: MemberRef):
        super().__init__()
        self.fd = os.open(ref.path, os.O_RDONLY)
        self.start, self.size, self.position, self.bytes_read = ref.offset, ref.size, 0, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(f"seek to {base + offset}, before the start of the member")
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.size - self.position))
        got = os.preadv(self.fd, [memoryview(buffer)[:count]], self.start + self.position) if count else 0
        self.position += got
        self.bytes_read += got
        return got

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()
