import io
import json
import tarfile

import numpy as np
import pytest

from synrep.shards import ShardError, ShardWriter, check_member_name, list_shards, read_shard, shard_done, write_index
from synrep.sources import ShardSource


def _images(n, seed, shape=(8, 8, 1)):
    return list(np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8))


def _write(folder, index, groups=3, n=2):
    path = folder / f"shard-{index:05d}.tar"
    with ShardWriter(path) as w:
        for g in range(groups):
            w.add(f"{index * 100 + g:09d}", _images(n, index * 100 + g), {"caption": f"cap {g}", "concept": "c", "seeds": [1, 2]})
    return path


def test_round_trip_identical_images_and_metadata(tmp_path):
    path = _write(tmp_path, 0)
    samples = read_shard(path)
    assert [s.key for s in samples] == ["000000000", "000000001", "000000002"]
    for g, s in enumerate(samples):
        np.testing.assert_array_equal(s.images, np.stack(_images(2, g)))
        assert s.meta["caption"] == f"cap {g}" and s.meta["seeds"] == [1, 2] and s.meta["n_images"] == 2
    assert shard_done(path)
    stats = json.loads(path.with_suffix(".json").read_text())
    assert stats["samples"] == 3 and stats["images"] == 6


def test_webdataset_member_names(tmp_path):
    path = _write(tmp_path, 0, groups=1)
    with tarfile.open(path) as tar:
        assert tar.getnames() == ["000000000.json", "000000000.0.png", "000000000.1.png"]


def test_truncated_shard_is_detected_and_left_out(tmp_path):
    for i in range(3):
        _write(tmp_path, i)
    write_index(tmp_path, {})
    bad = tmp_path / "shard-00001.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    assert not shard_done(bad), "size no longer matches the done-marker"
    with pytest.raises(ShardError, match="truncated"):
        read_shard(bad)
    source = ShardSource(tmp_path)
    assert len(source) == 6 and source.skipped_shards == ["shard-00001.tar"]


def test_writer_killed_before_rename_is_invisible(tmp_path):
    _write(tmp_path, 0)
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "shard-00001.tar") as w:
            w.add("000000100", _images(2, 5), {"caption": "x"})
            raise RuntimeError("killed")
    # A hard kill leaves the temporary file behind: it must not be listed either.
    (tmp_path / ".shard-00002.tar.tmp").write_bytes(b"partial")
    assert [p.name for p in list_shards(tmp_path)] == ["shard-00000.tar"]
    assert not list(tmp_path.glob(".shard-00001.tar.tmp*"))


@pytest.mark.parametrize("name", ["/etc/passwd", "../evil.png", "a/../../b.json", "sub/x.png", ".hidden"])
def test_path_traversal_names_refused(name, tmp_path):
    with pytest.raises(ShardError):
        check_member_name(name)
    path = tmp_path / "shard-00000.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ShardError, match="name"):
        read_shard(path)


def test_index_counts_and_concepts(tmp_path):
    _write(tmp_path, 0)
    _write(tmp_path, 1, groups=2)
    index = json.loads(write_index(tmp_path, {"generator": "test"}).read_text())
    assert index["num_groups"] == 5 and index["num_images"] == 10 and index["generator"] == "test"
    assert index["concepts"] == ["c"] and index["concept_counts"] == {"c": 5}
