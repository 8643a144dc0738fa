"""Safe outputs: a folder replaced only when complete."""

import pytest

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io.outputs import atomic_directory


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
