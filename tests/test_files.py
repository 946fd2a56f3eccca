"""Atomic writes: the one mechanism every engine writer uses."""

from __future__ import annotations

import os

import pytest

from near_engine.errors import AssetError, NearError
from near_engine.files import write_atomically, write_bytes_atomically


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    write_bytes_atomically(path, b"old")
    os.chmod(path, 0o640)

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("encoder exploded")

    with pytest.raises(AssetError, match="Could not write 'out.bin': encoder exploded"):
        write_atomically(path, half_then_fail, AssetError)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    write_bytes_atomically(path, b"new")
    assert path.read_bytes() == b"new"
    assert (path.stat().st_mode & 0o777) == 0o640  # an existing file keeps its permissions


def test_unwritable_targets_raise_the_given_error(tmp_path):
    with pytest.raises(NearError, match="Could not write 'x.bin'"):
        write_bytes_atomically(tmp_path / "missing" / "x.bin", b"data")
    (tmp_path / "folder").mkdir()
    with pytest.raises(NearError, match="folder of that name is in the way"):
        write_bytes_atomically(tmp_path / "folder", b"data")
