"""The shard reader gives what webdataset's gives (local files read member by member, pipes streamed),
also from tars with metadata members, directories, dotted keys and a cut-off end; members of a local
shard asked for by reference are MemberRefs to the same bytes."""
import io
import tarfile

import pytest
import webdataset as wds

from pipeline.data import tars
from pipeline.data.members import MemberRef
from pipeline.data.tars import tar_samples


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind=tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "s-000000.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "__index__", b"{}")  # webdataset skips metadata members
        add(tar, "dir", kind=tarfile.DIRTYPE)
        for i in range(5):
            add(tar, f"dir/{i:03d}.jpg", bytes([i]) * (1000 + 300_000 * i))  # up to 1.2 MB, many blocks
            add(tar, f"dir/{i:03d}.txt", f"caption {i}".encode())
            add(tar, f"dir/{i:03d}.seg.v1.json", b"[%d]" % i)  # the key ends at the first dot of the name
    return path


def webdataset_samples(url: str) -> tuple[list[dict], list[Exception]]:
    errors = []
    return list(wds.tarfile_to_samples(handler=lambda e: errors.append(e) or True)([{"url": url}])), errors


def ours(url: str, lazy=()) -> tuple[list[dict], list[Exception]]:
    errors = []
    return list(tar_samples([{"url": url}], lambda e: errors.append(e) or True, lazy)), errors


def resolved(samples: list[dict]) -> list[dict]:
    """The samples with each MemberRef replaced by the bytes it refers to."""
    def read(value):
        if not isinstance(value, MemberRef):
            return value
        with value.open() as view:
            return view.read()
    return [{k: read(v) for k, v in s.items()} for s in samples]


def test_same_samples_as_webdataset_from_a_file_and_from_a_pipe(shard, monkeypatch):
    expected, _ = webdataset_samples(str(shard))
    assert [s["__key__"] for s in expected] == [f"dir/{i:03d}" for i in range(5)]
    assert (ours(str(shard))[0]) == expected

    streamed = []
    monkeypatch.setattr(tars, "_local_members", lambda *a: streamed.append(a) or iter(()))
    assert ours(str(shard))[0] == []  # a local file takes the member-by-member reader ...
    assert len(streamed) == 1
    piped, _ = ours(f"pipe:cat {shard}")  # ... a pipe cannot seek: webdataset's stream reader
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in piped] == \
        [{k: v for k, v in s.items() if k != "__url__"} for s in expected]


def test_members_asked_for_by_reference_are_references_to_the_same_bytes_in_local_shards_only(shard):
    expected, _ = webdataset_samples(str(shard))
    got, errors = ours(str(shard), lazy={"jpg"})
    assert not errors and all(isinstance(s["jpg"], MemberRef) for s in got)
    assert all(isinstance(s["txt"], bytes) and isinstance(s["seg.v1.json"], bytes) for s in got)
    assert resolved(got) == expected
    piped, _ = ours(f"pipe:cat {shard}", lazy={"jpg"})  # a stream cannot be read later: bytes
    assert [s["jpg"] for s in piped] == [s["jpg"] for s in expected]


@pytest.mark.parametrize("lazy", [(), ("jpg",)])
@pytest.mark.parametrize("cut", [0.5, 0.97])
def test_a_cut_off_tar_gives_the_same_samples_and_one_error(shard, cut, lazy):
    """Also when the member cut short is left unread (a reference): it is reported, not handed on."""
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * cut) // 512 * 512 + 100])  # inside a member's data
    expected, expected_errors = webdataset_samples(str(shard))
    got, errors = ours(str(shard), lazy)
    assert resolved(got) == expected
    assert expected_errors and [type(e) for e in errors] == [tarfile.ReadError]  # reported once, then the shard ends


def test_not_a_tar_is_an_error_not_a_sample(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(b"this is not a tar file" * 100)
    got, errors = ours(str(path))
    assert got == [] and len(errors) == 1
