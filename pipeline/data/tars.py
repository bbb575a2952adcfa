"""Samples of tar shards: webdataset's reader, with one read per member for local files, or none.

webdataset reads every tar as a stream (`tarfile` mode "r|"), which pulls a member through in 10-KB
blocks and copies it twice more on the way: 6 ms for an 8-MB member (a minute of 48 kHz stereo
FLAC), 9x the cost of reading it in one call. A local file can seek, so its members are read the
way `tarfile` reads a file on disk: header, then the data in one read. Members whose decoder reads
only part of them (`lazy`: audio, where a crop needs a sixth of a minute-long file) are not read at
all: the sample carries a `MemberRef` to them (pipeline.data.members), and the decoder reads what it
needs. Remote and piped shards (http, s3, pipe:) keep webdataset's stream reader, and bytes. Either
way the members are grouped into samples by webdataset, and errors go to the same handler.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
from typing import Callable, Collection, Iterable, Iterator

from webdataset import tariterators

from pipeline.data.members import MemberRef

META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as it skips them


def member_extension(name: str) -> str | None:
    """The sample key a member is stored under (webdataset's: everything after the first dot, lower case)."""
    extension = tariterators.base_plus_ext(name)[1]
    return extension.lower() if extension is not None else None


def _member_data(tar: tarfile.TarFile, info: tarfile.TarInfo, path: str, file_size: int,
                 lazy: Collection[str]) -> bytes | MemberRef:
    if member_extension(info.name) in lazy and not info.issparse():
        if info.offset_data + info.size > file_size:  # what reading it would have found: a member cut short
            raise tarfile.ReadError("unexpected end of data")
        return MemberRef(path, info.offset_data, info.size)
    file = tar.extractfile(info)
    assert file is not None  # a regular member has a file object
    return file.read()


def _local_members(source: dict, handler: Callable[[Exception], bool], lazy: Collection[str]) -> Iterator[dict]:
    """{fname, data, __url__} of each regular member of a seekable tar: bytes read in one call, or a MemberRef
    for extensions in `lazy`. A read error (not a tar, a damaged header, a member cut short) goes to `handler`
    once and ends the shard: nothing after it can be found."""
    stream = source["stream"]
    try:
        path, file_size = os.path.abspath(stream.name), os.fstat(stream.fileno()).st_size
        tar = tarfile.open(fileobj=stream, mode="r:")
        while (info := tar.next()) is not None:
            # headers are not kept: shards hold many thousands of members (typeshed omits TarFile.members)
            tar.members = []  # pyright: ignore[reportAttributeAccessIssue]
            if info.isreg() and not META_MEMBER.match(info.name):
                yield {"fname": info.name, "data": _member_data(tar, info, path, file_size, lazy),
                       "__url__": source["url"]}
    except Exception as exc:
        exc.args = exc.args + (source["url"],)
        handler(exc)
    finally:
        stream.close()


def _members(sources: Iterable[dict], handler: Callable[[Exception], bool], lazy: Collection[str]) -> Iterator[dict]:
    for source in sources:
        if isinstance(source["stream"], io.BufferedReader) and source["stream"].seekable():
            yield from _local_members(source, handler, lazy)
        else:
            yield from tariterators.tar_file_expander([source], handler=handler)


def tar_samples(urls: Iterable[dict], handler: Callable[[Exception], bool],
                lazy: Collection[str] = ()) -> Iterator[dict]:
    """What `webdataset.tarfile_to_samples(handler=handler)(urls)` gives: {__key__, __url__, ext: bytes}, except
    that in local shards the members stored under an extension in `lazy` are MemberRefs."""
    streams = tariterators.url_opener(urls, handler=handler)
    return tariterators.group_by_keys(_members(streams, handler, lazy), handler=handler)
