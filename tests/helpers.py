"""Assertions shared by the command-line tests: one-line errors and untouched outputs."""

from __future__ import annotations

from pathlib import Path


def assert_one_line_error(result, *fragments: str, exit_code: int | None = 1, alone: bool = True) -> str:
    """The command failed with an ``Error: ...`` line holding every fragment, and no traceback.

    ``result`` is a click ``Result`` or a process's stderr text. ``exit_code`` None accepts any
    non-zero status (only checked for a ``Result``). With ``alone`` the error is the only line on
    stderr; otherwise it is the last one (progress lines may come before it). Returns the line.
    """
    if isinstance(result, str):
        stderr = result
    else:
        assert result.exit_code != 0, (result.output, result.exception)
        if exit_code is not None:
            assert result.exit_code == exit_code, (result.output, result.exception)
        stderr = result.stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), stderr
    if alone:
        assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path -> bytes), to compare before and after a command."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_untouched(folder: Path, before: dict[str, bytes]) -> None:
    """No file below ``folder`` changed, appeared (a partial output) or vanished since ``snapshot``."""
    after = snapshot(folder)
    assert sorted(after) == sorted(before), (sorted(set(after) ^ set(before)))
    changed = [name for name in before if after[name] != before[name]]
    assert not changed, changed


def unwritable_folder(folder: Path) -> Path:
    """A folder nobody may write into: ``folder/locked`` made read-only, or /sys when (as root) modes do
    not stop writes (skips the test when neither works)."""
    import pytest

    locked = folder / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        (locked / "probe").touch()
    except PermissionError:
        return locked
    (locked / "probe").unlink()
    if not Path("/sys").is_dir():
        pytest.skip("running as root without /sys: no folder is unwritable")
    return Path("/sys")


TINY_BENCH = """name: tiny
foundation_model: {model}
target: {{files: {target}}}
split: {{pool: [0, 12], valid: [12, 16], test: [16, 24]}}
budgets: [6]
seeds: [0]
mace_args: {{E0s: estimated, max_num_epochs: 1, batch_size: 2, default_dtype: float64}}
methods:
  - {{method: naive}}
"""  # a one-run bench over a tiny model and 24 labelled molecules: format(model=..., target=...)
