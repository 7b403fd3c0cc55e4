import pytest

from mlpspec.fileio import atomic_folder, atomic_write, keyed_file


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "cache" / "model"
    with pytest.raises(RuntimeError):
        with atomic_folder(final) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed mid-write")
    assert not final.exists()
    assert list(final.parent.iterdir()) == []
    with atomic_folder(final) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (final / "config.json").read_text() == "{}"
    assert list(final.parent.iterdir()) == [final]


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_text("old")

    def failing(path):
        with open(path, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    atomic_write(target, lambda path: open(path, "w").write("new"))
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


def test_keyed_file_names_a_file_by_everything_it_depends_on(tmp_path):
    one = keyed_file(tmp_path, {"host": "a", "threads": 2})
    assert one.parent == tmp_path and one.suffix == ".json" and len(one.stem) == 16
    assert keyed_file(tmp_path, {"threads": 2, "host": "a"}) == one  # the order of the keys is no change
    assert keyed_file(tmp_path, {"host": "a", "threads": 4}) != one
