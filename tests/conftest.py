"""Shared fixtures: tiny MACE models and structure files made by the suite, and ../shared when present."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")

from tiny_models import build_tiny_mace, write_molecules  # noqa: E402

SHARED = Path(os.environ.get("PROTOALIGN_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's ../shared folder (or $PROTOALIGN_SHARED); skips the test when absent."""
    if not (SHARED / "models" / "ani500k_small_CC.model").is_file():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A session folder holding the tiny models and structure files."""
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir) -> Path:
    """ScaleShiftMACE, scalar (8x0e) hidden features, one head."""
    return build_tiny_mace(tiny_dir / "tiny.model")


@pytest.fixture(scope="session")
def tiny_l1_model(tiny_dir) -> Path:
    """ScaleShiftMACE with L = 1 hidden features (8x0e + 8x1o)."""
    return build_tiny_mace(tiny_dir / "tiny_l1.model", hidden="8x0e+8x1o", seed=1)


@pytest.fixture(scope="session")
def tiny_two_head_model(tiny_dir) -> Path:
    """ScaleShiftMACE with two heads of different E0, scale and shift."""
    return build_tiny_mace(tiny_dir / "tiny_2h.model", heads=["dft", "cc"], seed=2)


@pytest.fixture(scope="session")
def tiny_plain_model(tiny_dir) -> Path:
    """Plain MACE (no scale/shift) with pair repulsion."""
    return build_tiny_mace(tiny_dir / "tiny_plain.model", plain=True, pair_repulsion=True, seed=3)


@pytest.fixture(scope="session")
def molecules_xyz(tiny_dir) -> Path:
    """24 rattled small molecules (H, C, N, O) with EMT-based REF_energy/REF_forces."""
    return write_molecules(tiny_dir / "molecules.xyz")


@pytest.fixture(scope="session")
def prototypes_file(tiny_model, molecules_xyz, tmp_path_factory) -> Path:
    """Prototypes (2 per element) of the tiny model's latents over its own molecules (extract + prototypes)."""
    from click.testing import CliRunner

    from protoalign_cli.cli import main

    folder = tmp_path_factory.mktemp("prototypes")
    latents, prototypes = folder / "latents.h5", folder / "prototypes.h5"
    for args in (("extract", "--model", tiny_model, "--configs", molecules_xyz, "--out", latents),
                 ("prototypes", latents, "--out", prototypes, "--k", "2")):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, (result.output, result.stderr)
    return prototypes
