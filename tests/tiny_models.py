"""Tiny MACE models and structure sets built by the test suite itself (no ../shared needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from make_example import E0, labelled_frames  # noqa: E402

ELEMENTS = (1, 6, 7, 8)
MOLECULES = ("CH4", "H2O", "NH3", "CH3OH", "C2H6", "HCOOH", "CH3CN", "H2CO")


def build_tiny_mace(path: Path, *, hidden: str = "8x0e", heads=None, plain: bool = False, seed: int = 0,
                    num_interactions: int = 2, pair_repulsion: bool = False) -> Path:
    """Build a randomly initialised (Scale-Shift)MACE for H, C, N, O, r_max 4 Å, save it with torch.save."""
    import mace  # noqa: F401
    import torch
    from e3nn import o3
    from mace import modules

    torch.manual_seed(seed)
    heads = list(heads) if heads else ["Default"]
    e0s = np.array([[E0[z] + 0.1 * h for z in ELEMENTS] for h in range(len(heads))])
    kwargs = dict(
        r_max=4.0, num_bessel=4, num_polynomial_cutoff=5, max_ell=2,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=num_interactions, num_elements=len(ELEMENTS), hidden_irreps=o3.Irreps(hidden),
        MLP_irreps=o3.Irreps("8x0e"), atomic_energies=e0s if len(heads) > 1 else e0s[0],
        avg_num_neighbors=4.0, atomic_numbers=list(ELEMENTS), correlation=2, gate=torch.nn.functional.silu,
        heads=heads, pair_repulsion=pair_repulsion,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # E0s, scale and shift rounded to float32 as the tests expect, whatever an
    # earlier test left as torch's default dtype
    try:
        model = _build(modules, kwargs, heads, plain)
    finally:
        torch.set_default_dtype(previous)
    torch.save(model, path)
    return path


def _build(modules, kwargs: dict, heads: list, plain: bool):
    """The (Scale-Shift)MACE of ``build_tiny_mace``, built in torch's default dtype and returned in float64."""
    import torch

    with torch.no_grad():
        if plain:
            model = modules.MACE(**kwargs)
        else:
            scale = [0.8 + 0.3 * h for h in range(len(heads))] if len(heads) > 1 else 0.9
            shift = [0.05 * (h + 1) for h in range(len(heads))] if len(heads) > 1 else 0.07
            model = modules.ScaleShiftMACE(**kwargs, atomic_inter_scale=scale, atomic_inter_shift=shift)
    return model.to(torch.float64)


def write_molecules(path: Path, n_configs: int = 24, seed: int = 0, molecules=MOLECULES, rattle: float = 0.05) -> Path:
    """Write rattled small H/C/N/O molecules with EMT energies/forces as REF_energy/REF_forces (extxyz).

    The labelling is the bundled example's (examples/make_example.py), so tests and example agree.
    """
    import ase.io

    ase.io.write(path, labelled_frames(molecules, n_configs, rattle, seed), format="extxyz")
    return path
