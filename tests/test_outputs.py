"""Safe outputs: a folder replaced only when complete; an output that cannot be written refused up front."""

import re
from pathlib import Path

import pytest

from helpers import unwritable_folder

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io.outputs import atomic_directory, atomic_output, check_output_folder, check_writable


def test_atomic_directory_replaces_only_on_success(tmp_path):
    out = tmp_path / "report"
    with atomic_directory(out, overwrite=False) as folder:
        (folder / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(ProtoalignError, match="exists; pass --overwrite"):
        with atomic_directory(out, overwrite=False):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True) as folder:
            (folder / "b.txt").write_text("second")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    with atomic_directory(out, overwrite=True) as folder:
        (folder / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


@pytest.mark.parametrize("output", [check_writable, atomic_output, atomic_directory])
@pytest.mark.parametrize("where", ["under a file", "unwritable"])
def test_an_output_that_cannot_be_written_is_refused_before_anything_is_written(output, where, tmp_path):
    if where == "under a file":
        folder = tmp_path / "notes.txt"
        folder.write_text("x")
        expected = f"{folder} is a file, not a folder"
    else:
        folder = unwritable_folder(tmp_path)
        expected = f"cannot write into {folder}"
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ProtoalignError, match=re.escape(expected)):
        if output is check_writable:
            check_writable(folder / "out.h5", overwrite=False)
        else:
            with output(folder / "out.h5", overwrite=False):
                pass
    assert sorted(tmp_path.rglob("*")) == before


def test_a_folder_where_an_output_file_should_go_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "out.h5").mkdir()
    for overwrite in (False, True):
        with pytest.raises(ProtoalignError, match="is a folder"):
            with atomic_output(tmp_path / "out.h5", overwrite=overwrite):
                pass
    assert (tmp_path / "out.h5").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]


@pytest.mark.parametrize("where", ["under a file", "unwritable", "missing"])
def test_an_output_folder_that_cannot_be_made_is_refused(where, tmp_path):
    if where == "under a file":
        (tmp_path / "notes.txt").write_text("x")
        out, expected = tmp_path / "notes.txt" / "deeper" / "out", "is a file, not a folder"
    elif where == "unwritable":
        out, expected = unwritable_folder(tmp_path) / "out", "cannot write into"
    else:
        out, expected = tmp_path / "a" / "b" / "out", None
    before = sorted(tmp_path.rglob("*"))
    if expected is None:
        check_output_folder(out)  # made later with its parents
    else:
        with pytest.raises(ProtoalignError, match=expected):
            check_output_folder(out)
    assert sorted(tmp_path.rglob("*")) == before
