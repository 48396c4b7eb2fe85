import io
import tarfile

import pytest

from shardsmith.pipelines.formats.inputs import InputError, plan_shards
from shardsmith.pipelines.formats.laion import metadata_column_map
from shardsmith.pipelines.formats.tar import iter_tar_samples, split_member_name


def make_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_member_names_split_like_webdataset():
    assert split_member_name("000123.jpg") == ("000123", "jpg")
    assert split_member_name("dir/a b.JSON") == ("dir/a b", "json")
    assert split_member_name("x.seg.png") == ("x", "seg.png")
    assert split_member_name("README") is None


def test_grouping_duplicates_and_missing_images(tmp_path):
    p = tmp_path / "00000.tar"
    make_tar(p, [("a.jpg", b"1"), ("a.txt", b"cap a"), ("b.txt", b"no image"), ("../c.png", b"3"),
                 ("a.jpg", b"again"), ("d.webp", b"4"), ("d.txt", b"\xff\xfe bad utf8")])
    s = list(iter_tar_samples(str(p)))
    assert [x.key for x in s] == ["a", "b", "../c", "a", "d"]
    assert [x.row for x in s] == [0, 1, 2, 3, 4]
    assert s[0].error_kind is None and s[0].caption() == "cap a"
    assert s[1].error_kind == "missing_image" and "has: txt" in s[1].error
    assert s[2].error_kind == "unsafe_key" and "climbs out" in s[2].error  # never copied to an output tar
    assert s[3].error_kind == "duplicate_key"
    assert s[4].caption().endswith("bad utf8")


def test_truncated_tar_yields_complete_samples_then_an_error(tmp_path):
    p = tmp_path / "00000.tar"
    make_tar(p, [("a.jpg", b"x" * 600), ("b.jpg", b"y" * 3000), ("c.jpg", b"z" * 600)])
    data = p.read_bytes()
    p.write_bytes(data[:2200])  # cut inside b.jpg
    s = list(iter_tar_samples(str(p)))
    assert s[0].key == "a" and s[0].error_kind is None
    assert s[-1].error_kind == "truncated_tar"
    assert len(s) == 2


def test_empty_tar_is_an_empty_shard(tmp_path):
    p = tmp_path / "00000.tar"
    p.write_bytes(b"")
    assert list(iter_tar_samples(str(p))) == []
    make_tar(tmp_path / "00001.tar", [])
    assert list(iter_tar_samples(str(tmp_path / "00001.tar"))) == []


def test_planning_rejects_unreadable_inputs(tmp_path):
    with pytest.raises(InputError, match="no input files found"):
        plan_shards(str(tmp_path / "nothing-*.tar"))
    (tmp_path / "00000.tar").write_bytes(b"this is not a tar" * 100)
    with pytest.raises(InputError, match="00000.tar: not a tar archive"):
        plan_shards(str(tmp_path))
    with pytest.raises(InputError, match="input file not found"):
        plan_shards(str(tmp_path / "missing.tar"))


def test_brace_and_glob_patterns(tmp_path):
    for i in range(3):
        make_tar(tmp_path / f"{i:05d}.tar", [("a.jpg", b"1")])
    mode, shards = plan_shards(str(tmp_path / "{00000,00002}.tar"))
    assert mode == "images" and [s.name for s in shards] == ["00000", "00002"]
    _, shards = plan_shards(str(tmp_path / "0000[01].tar"))
    assert [s.name for s in shards] == ["00000", "00001"]


def test_laion_column_names_any_case():
    m = metadata_column_map(["url", "TEXT", "Width", "HEIGHT", "AESTHETIC_SCORE", "pwatermark", "SAMPLE_ID"])
    assert m["caption"] == "TEXT" and m["original_width"] == "Width" and m["aesthetic"] == "AESTHETIC_SCORE"
    assert m["key"] == "SAMPLE_ID"
