"""End to end on the real model: ANI-CC fine-tuned on 25 PBE aspirin configurations with prototypes
of the xTB source geometries of five small molecules (../shared); slow, CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from protoalign_cli.cli import main

SOURCES = ("benzene", "ethanol", "malonaldehyde", "toluene", "uracil")


def run_cli(*args):
    """Invoke ``protoalign`` in-process and require success."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    return result


@pytest.mark.slow
@pytest.mark.shared
def test_ani_cc_on_aspirin_end_to_end(shared_dir, tmp_path):
    import ase.io
    from mace.calculators import MACECalculator

    model = shared_dir / "models" / "ani500k_small_CC.model"
    aspirin = shared_dir / "data" / "md17-pbe" / "aspirin.xyz"
    source = tmp_path / "source.xyz"
    ase.io.write(source, [a for name in SOURCES
                          for a in ase.io.read(shared_dir / "data" / "md17-xtb" / f"{name}.xyz", index="::20")])
    pool = ase.io.read(aspirin, index="0:400")
    chosen = sorted(np.random.default_rng(0).choice(len(pool), 25, replace=False))
    train, valid = tmp_path / "train.xyz", tmp_path / "valid.xyz"
    ase.io.write(train, [pool[i] for i in chosen])
    ase.io.write(valid, ase.io.read(aspirin, index="400:480"))

    latents, prototypes = tmp_path / "latents.h5", tmp_path / "prototypes.h5"
    run_cli("extract", "--model", model, "--configs", source, "--out", latents)
    run_cli("prototypes", latents, "--out", prototypes)
    work_dir = tmp_path / "run"
    run_cli("finetune", "--prototypes", prototypes, "--align-weight", "0.1", "--",
            "--name", "aspirin", "--seed", "3", "--work_dir", work_dir, "--foundation_model", model,
            "--train_file", train, "--valid_file", valid, "--energy_key", "REF_energy", "--forces_key", "REF_forces",
            "--E0s", "estimated", "--multiheads_finetuning", "False", "--max_num_epochs", "2", "--batch_size", "5",
            "--valid_batch_size", "20", "--lr", "0.001", "--default_dtype", "float64", "--device", "cpu")

    record = json.loads((work_dir / "protoalign_finetune.json").read_text())
    assert record["results"]["status"] == "finished"
    assert record["results"]["assignment"]["configurations"] == {"train": 25, "valid": 80}
    assert set(record["results"]["assignment"]["per_element"]) == {"H", "C", "O"}
    jsonl = work_dir / "protoalign" / "align_aspirin_run-3.jsonl"
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    epochs = [r for r in lines if "event" not in r and not r["initial"]]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert all(r["train"]["align"] > 0 and r["train"]["graphs_missing"] == 0 for r in epochs)

    calculator = MACECalculator(model_paths=str(work_dir / "aspirin.model"), device="cpu", default_dtype="float64")
    atoms = ase.io.read(valid, index="0")
    reference = atoms.info["REF_energy"]
    atoms.calc = calculator
    assert abs(atoms.get_potential_energy() - reference) / len(atoms) < 0.05  # eV/atom, after 2 epochs
    assert np.isfinite(atoms.get_forces()).all()
