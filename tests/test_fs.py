import fsspec
import pytest

from shardsmith.pipelines.core import fs as fsutil


def test_atomic_write_on_memory_fs_commits_only_complete_files():
    fsutil.write_bytes_atomic("memory://bucket/out/a.bin", b"hello", tmp_dir="memory://bucket/out/_tmp")
    assert fsutil.read_bytes("memory://bucket/out/a.bin") == b"hello"
    with pytest.raises(RuntimeError):
        with fsutil.atomic_write("memory://bucket/out/b.bin", tmp_dir="memory://bucket/out/_tmp") as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert not fsutil.exists("memory://bucket/out/b.bin")
    assert fsspec.filesystem("memory").ls("/bucket/out/_tmp") == []


def test_expand_globs_and_braces_on_memory_fs():
    for i in range(3):
        fsutil.write_bytes_atomic(f"memory://ds/{i:05d}.tar", b"")
    found = fsutil.expand("memory://ds/*.tar")
    assert [f.replace("memory:///", "memory://") for f in found] == [f"memory://ds/{i:05d}.tar" for i in range(3)]
    assert [fsutil.read_bytes(f) for f in found] == [b""] * 3
    assert fsutil.expand("memory://ds/{00001,00002}.tar") == ["memory://ds/00001.tar", "memory://ds/00002.tar"]
