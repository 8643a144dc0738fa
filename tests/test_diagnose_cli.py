"""protoalign diagnose end to end on the tiny model: exact coverage and predictor identities, out of
distribution targets, the report files, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from protoalign_cli.cli import main
from protoalign_cli.extract import ExtractRequest, run_extract
from protoalign_cli.prototypes.assignment import assign, load_prototypes
from protoalign_cli.prototypes.build import PrototypesRequest, build_prototypes
from protoalign_cli.io.schema import read_latents
from helpers import assert_one_line_error
from tiny_models import write_molecules

HCO_MOLECULES = ("CH4", "H2O", "CH3OH", "C2H6", "HCOOH", "H2CO")


def build_source(folder: Path, model: Path, structures: Path, k: int = 2) -> tuple[Path, Path]:
    """Latents of ``structures`` under ``model`` and K prototypes per element from them."""
    latents, prototypes = folder / "source.h5", folder / "prototypes.h5"
    run_extract(ExtractRequest(model=str(model), configs=[structures], out=latents))
    build_prototypes(PrototypesRequest(latents=[latents], out=prototypes, k=k))
    return latents, prototypes


def diagnose(*args: str, expect: int = 0):
    """Run ``protoalign diagnose ARGS`` in-process; check the exit status; return the click result."""
    result = CliRunner().invoke(main, ["diagnose", *map(str, args)])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


def read_report(out: Path) -> dict:
    """The ``results`` of a diagnose report."""
    return json.loads((out / "report.json").read_text())["results"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_model, molecules_xyz):
    """Prototypes (K=2) of the tiny model over the test molecules, and those molecules as a target
    whose MODEL_energy is the tiny model's own total energy (from the source latent file)."""
    import ase.io

    folder = tmp_path_factory.mktemp("diagnose")
    latents_path, prototypes_path = build_source(folder, tiny_model, molecules_xyz)
    latents = read_latents(latents_path)
    totals = np.bincount(latents.config_index, weights=latents.node_energy)
    frames = ase.io.read(molecules_xyz, ":")
    for atoms, total in zip(frames, totals):
        atoms.info["MODEL_energy"] = total
    ase.io.write(folder / "target.xyz", frames)
    return SimpleNamespace(folder=folder, latents=latents, prototypes=prototypes_path, target=folder / "target.xyz")


@pytest.fixture(scope="module")
def identical(source, tiny_model):
    """Diagnose of the source structures against their own prototypes, with the foundation model
    itself as the "fine-tuned" model and the model's own energies as reference (exit status 0
    with --fail-below-coverage under the coverage)."""
    out = source.folder / "identical"
    result = diagnose("--prototypes", source.prototypes, "--configs", source.target, "--energy-key", "MODEL_energy",
                      "--finetuned-model", tiny_model, "--fail-below-coverage", "0.9", "--out", out)
    return SimpleNamespace(out=out, results=read_report(out), stdout=result.stdout)


def test_identical_target_uses_every_prototype_as_often_as_the_source(source, identical):
    prototypes = load_prototypes(source.prototypes)
    usage = [row["target_count"] for row in identical.results["prototype_usage"]]
    np.testing.assert_array_equal(usage, prototypes.count)


def test_identical_target_coverage_at_the_radius_is_the_percentile_fraction(source, tiny_model):
    """With --radius-factor 1, exactly the members within the 95th percentile are covered: for n
    distinct distances numpy's percentile (linear) covers floor(percentile of 0..n-1) + 1 of them."""
    out = source.folder / "factor1"
    diagnose("--prototypes", source.prototypes, "--configs", source.target, "--radius-factor", "1", "--out", out)
    results = read_report(out)
    counts = load_prototypes(source.prototypes).count
    expected = sum(int(np.floor(np.percentile(np.arange(n), 95))) + 1 for n in counts) / counts.sum()
    assert results["coverage"]["overall"] == pytest.approx(expected, abs=1e-12)
    assert results["coverage"]["overall"] < 1.0


def test_identical_target_coverage_is_the_source_coverage(source, identical):
    """At the default factor 1.5 the target's coverage is the source atoms' own, computed from the
    source latent file; with a factor above every source member's ratio it is 1."""
    prototypes = load_prototypes(source.prototypes)
    prototype_id, distance = assign(prototypes, source.latents.latent, source.latents.atomic_number)
    ratio = distance / prototypes.radius[prototype_id]
    assert identical.results["coverage"]["overall"] == pytest.approx(np.mean(ratio <= 1.5), abs=1e-12)
    assert identical.results["coverage"]["overall"] > 0.95
    out = source.folder / "generous"
    factor = float(np.ceil(ratio.max() * 10) / 10)
    diagnose("--prototypes", source.prototypes, "--configs", source.target, "--radius-factor", factor, "--out", out)
    assert read_report(out)["coverage"]["overall"] == 1.0


def test_identical_target_predictor_error_is_the_clustering_error(source, identical):
    """Reference = the model's own energies, so the prototype predictor's error is the error of
    replacing every atom energy by its prototype's mean: sum_i (E0 + eps*_p(i)) vs sum_i (E0 + eps_i)."""
    latents = source.latents
    prototypes = load_prototypes(source.prototypes)
    prototype_id, _ = assign(prototypes, latents.latent, latents.atomic_number)
    e0 = latents.header.e0_of(latents.atomic_number)
    clustered = np.bincount(latents.config_index, weights=e0 + prototypes.energy_mean[prototype_id])
    model = np.bincount(latents.config_index, weights=e0 + latents.energy_minus_e0)
    elements = np.unique(latents.atomic_number)
    composition = np.stack([np.bincount(latents.config_index, weights=latents.atomic_number == z) for z in elements], 1)
    offsets, *_ = np.linalg.lstsq(composition, model - clustered, rcond=None)
    predictor = identical.results["energy_predictor"]
    assert predictor["available"] and predictor["prototype"]["n_configs"] == len(model)
    assert predictor["prototype"]["mae_raw_meV"] == pytest.approx(np.mean(np.abs(clustered - model)) * 1000, rel=1e-9)
    corrected_error = clustered + composition @ offsets - model
    assert predictor["prototype"]["mae_meV"] == pytest.approx(np.mean(np.abs(corrected_error)) * 1000, rel=1e-9)
    assert predictor["prototype"]["mae_meV"] > 1.0
    assert predictor["pretrained_model"]["mae_raw_meV"] < 1e-6


def test_identical_target_atoms_scatter_around_prototypes_as_the_source_does(identical):
    """The target atoms are the members: per element the bias is 0 and the scatter ratio exactly 1."""
    for name, row in identical.results["atom_energies"]["pretrained"]["by_element"].items():
        assert row["bias_meV"] == pytest.approx(0.0, abs=1e-9), name
        assert row["scatter_ratio"] == pytest.approx(1.0, abs=1e-9), name


def test_foundation_as_finetuned_model_agrees_with_the_pretrained_comparison(identical):
    finetuned = identical.results["atom_energies"]["finetuned"]
    pretrained = identical.results["atom_energies"]["pretrained"]
    assert finetuned["by_element"].keys() == pretrained["by_element"].keys() == {"H", "C", "N", "O"}
    for name, row in finetuned["by_element"].items():
        assert row == pytest.approx(pretrained["by_element"][name], abs=1e-9)
    worst = finetuned["worst_prototypes"]
    assert worst and all(a["mean_abs_difference_meV"] >= b["mean_abs_difference_meV"] for a, b in zip(worst, worst[1:]))


def test_report_files_and_verdict(identical):
    names = sorted(p.name for p in identical.out.iterdir())
    assert names == ["atom_energies.png", "distance_ratio.png", "map.png", "predictor.png", "report.json", "report.md"]
    for name in names:
        if name.endswith(".png"):
            assert (identical.out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert (identical.out / name).stat().st_size < 300_000
    verdict = identical.results["verdict"]
    assert identical.stdout.splitlines()[:len(verdict)] == verdict
    assert [line.split(":")[0] for line in verdict] == ["H", "C", "N", "O", "overall"]
    markdown = (identical.out / "report.md").read_text()
    assert verdict[-1] in markdown and "![map.png](map.png)" in markdown
    summary = json.loads((identical.out / "report.json").read_text())
    assert summary["command"] == "diagnose" and summary["inputs"]["energy_key"] == "MODEL_energy"


@pytest.fixture(scope="module")
def hco_prototypes(tmp_path_factory, tiny_model):
    """Prototypes from molecules of H, C and O only (the tiny model also knows N)."""
    folder = tmp_path_factory.mktemp("hco")
    structures = write_molecules(folder / "hco.xyz", molecules=HCO_MOLECULES)
    return build_source(folder, tiny_model, structures)[1]


def test_element_absent_from_the_source_is_out_of_distribution(tmp_path, hco_prototypes):
    target = write_molecules(tmp_path / "with_n.xyz", n_configs=6, seed=5, molecules=("NH3", "CH3CN", "CH4"))
    out = tmp_path / "report"
    result = diagnose("--prototypes", hco_prototypes, "--configs", target, "--out", out,
                      "--fail-below-coverage", "0.9", expect=2)
    results = read_report(out)
    nitrogen = results["coverage"]["by_element"]["N"]
    assert nitrogen["has_prototypes"] is False and nitrogen["coverage"] == 0.0 and nitrogen["n_atoms"] == 4
    assert results["safe"] is False and "N has no prototypes" in results["verdict"][-1]
    assert "no prototypes for this element" in result.stdout
    assert "Error: coverage" in result.stderr and "below 0.9" in result.stderr
    assert results["energy_predictor"]["prototype"]["n_configs"] == 2
    assert "4 configurations with an element without prototypes left out" in results["energy_predictor"]["note"]


def test_compressed_geometries_are_out_of_distribution(tmp_path, source, identical):
    import ase.io

    frames = ase.io.read(source.target, ":")
    for atoms in frames:
        centre = atoms.positions.mean(axis=0)
        atoms.positions = centre + 0.7 * (atoms.positions - centre)
    ase.io.write(tmp_path / "compressed.xyz", frames)
    out = tmp_path / "report"
    diagnose("--prototypes", source.prototypes, "--configs", tmp_path / "compressed.xyz", "--out", out)
    results = read_report(out)
    assert results["coverage"]["overall"] < 0.2 < identical.results["coverage"]["overall"]
    assert results["safe"] is False and "coverage below 0.9" in results["verdict"][-1]


def test_fixed_molecule_target_reports_every_site(tmp_path, source):
    target = write_molecules(tmp_path / "methane.xyz", n_configs=6, seed=7, molecules=("CH4",))
    out = tmp_path / "report"
    diagnose("--prototypes", source.prototypes, "--configs", target, "--configs", source.target, "--out", out)
    results = read_report(out)
    sites = results["sites"]
    assert [(row["file"], row["atom_index"], row["element"], row["n_configs"]) for row in sites] == [
        (0, 0, "C", 6), (0, 1, "H", 6), (0, 2, "H", 6), (0, 3, "H", 6), (0, 4, "H", 6)]
    assert all(row["ratio_median"] is not None and row["pretrained_bias_meV"] is not None for row in sites)
    assert "## Sites" in (out / "report.md").read_text()


def test_missing_default_energy_key_skips_the_predictor_with_a_note(tmp_path, source):
    import ase.io

    frames = ase.io.read(source.target, ":")
    for atoms in frames:
        atoms.info.pop("REF_energy", None)
    ase.io.write(tmp_path / "unlabelled.xyz", frames)
    out = tmp_path / "report"
    result = diagnose("--prototypes", source.prototypes, "--configs", tmp_path / "unlabelled.xyz", "--out", out)
    predictor = read_report(out)["energy_predictor"]
    assert predictor["available"] is False and "no reference energies" in predictor["note"]
    assert "predictor not measured" in result.stdout
    assert not (out / "predictor.png").exists() and (out / "map.png").exists()


def test_explicit_energy_key_absent_everywhere_is_an_error(tmp_path, source):
    result = CliRunner().invoke(main, ["diagnose", "--prototypes", str(source.prototypes), "--configs",
                                       str(source.target), "--energy-key", "DFT_energy", "--out", str(tmp_path / "r")])
    assert_one_line_error(result, "energy key 'DFT_energy'")
    assert not (tmp_path / "r").exists()


def test_bad_inputs_give_one_line_errors(tmp_path, source, tiny_l1_model, tiny_model):
    def run(*args):
        return CliRunner().invoke(main, ["diagnose", *map(str, args)])

    base = ("--prototypes", source.prototypes, "--configs", source.target)
    assert_one_line_error(run("--prototypes", tmp_path / "none.h5", "--configs", source.target, "--out", tmp_path / "a"),
                          "prototype file", "does not exist")
    assert_one_line_error(run("--prototypes", source.target, "--configs", source.target, "--out", tmp_path / "a"),
                          "prototype file")
    assert_one_line_error(run(*base, "--foundation-model", tiny_l1_model, "--out", tmp_path / "a"),
                          "is not the model the prototypes were built with")
    assert_one_line_error(run("--prototypes", source.prototypes, "--configs", tmp_path / "none.xyz", "--out", tmp_path / "a"),
                          "none.xyz does not exist")
    assert_one_line_error(run(*base, "--finetuned-model", tmp_path / "none.model", "--out", tmp_path / "a"),
                          "fine-tuned model", "does not exist")
    assert_one_line_error(run(*base, "--out", tmp_path / "missing" / "a"), "does not exist")
    assert_one_line_error(run(*base, "--radius-factor", "0", "--out", tmp_path / "a"), "--radius-factor")
    assert_one_line_error(run(*base, "--fail-below-coverage", "2", "--out", tmp_path / "a"), "--fail-below-coverage")
    assert not (tmp_path / "a").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert_one_line_error(run(*base, "--out", existing), "exists; pass --overwrite")
    assert (existing / "keep.txt").read_text() == "mine"


def test_element_unknown_to_the_model_is_an_error(tmp_path, source):
    from ase import Atoms
    import ase.io

    ase.io.write(tmp_path / "si.xyz", Atoms("SiH4", positions=np.eye(5, 3) * 1.5))
    result = CliRunner().invoke(main, ["diagnose", "--prototypes", str(source.prototypes), "--configs",
                                       str(tmp_path / "si.xyz"), "--out", str(tmp_path / "r")])
    assert_one_line_error(result, "si.xyz, configuration 0: element(s) Si not in the model")


def test_moved_foundation_model_needs_the_option_and_is_sha_checked(tmp_path, tiny_model, molecules_xyz):
    moved = tmp_path / "foundation.model"
    shutil.copy(tiny_model, moved)
    _, prototypes = build_source(tmp_path, moved, molecules_xyz)
    elsewhere = tmp_path / "elsewhere.model"
    moved.rename(elsewhere)
    result = CliRunner().invoke(main, ["diagnose", "--prototypes", str(prototypes), "--configs", str(molecules_xyz),
                                       "--out", str(tmp_path / "r")])
    assert_one_line_error(result, "foundation.model is not there", "--foundation-model")
    diagnose("--prototypes", prototypes, "--configs", molecules_xyz, "--foundation-model", elsewhere,
             "--out", tmp_path / "r")
    assert read_report(tmp_path / "r")["coverage"]["overall"] > 0.95


def test_report_records_paths_as_given_with_their_sha256(tmp_path, source, tiny_model, monkeypatch):
    """Relative paths stay relative and a foundation name stays a name (not mace's cache path), so a
    committed report reads as its command was typed; the sha256s identify the files."""
    import protoalign_cli.mace.models as models
    from protoalign_cli.io.provenance import sha256_file

    cache, work = tmp_path / "cache", tmp_path / "work"
    cache.mkdir()
    work.mkdir()
    shutil.copy(tiny_model, cache / "small.model")
    monkeypatch.setattr(models, "_download_foundation", lambda name: cache / f"{name}.model")
    for name, original in (("p.h5", source.prototypes), ("target.xyz", source.target), ("ft.model", tiny_model)):
        shutil.copy(original, work / name)
    monkeypatch.chdir(work)
    diagnose("--prototypes", "p.h5", "--configs", "target.xyz", "--foundation-model", "small", "--finetuned-model", "ft.model",
             "--out", "report")
    inputs = json.loads(Path("report/report.json").read_text())["inputs"]
    digest = sha256_file(tiny_model)
    assert (inputs["prototypes"], inputs["configs"], inputs["model"]) == ("p.h5", ["target.xyz"], "ft.model")
    assert inputs["foundation_model"] == "small"
    assert inputs["foundation_model_sha256"] == inputs["model_sha256"] == digest
    header = Path("report/report.md").read_text().split("## Verdict")[0]
    assert str(tmp_path) not in header
    assert f"- pretrained model: `small` (sha256 {digest[:12]}...), head Default" in header
    assert f"- fine-tuned model: `ft.model` (sha256 {digest[:12]}...), head Default" in header


def test_model_evaluations_and_figures_report_progress_in_a_log(tmp_path, source, tiny_model, monkeypatch):
    """Output that is not a terminal (a log) gets plain progress lines: every update here, the interval set to 0."""
    import protoalign_cli.progress

    monkeypatch.setattr(protoalign_cli.progress, "LOG_INTERVAL_S", 0.0)
    result = diagnose("--prototypes", source.prototypes, "--configs", source.target, "--finetuned-model", tiny_model,
                      "--batch-size", "10", "--out", tmp_path / "r")
    lines = result.stderr.splitlines()
    for model in ("pretrained", "fine-tuned"):
        assert [line.split(",")[0] for line in lines if line.startswith(f"diagnose: {model} model:")][:3] == [
            f"diagnose: {model} model: {done}/24 configs ({100 * done / 24:.0f}%)" for done in (10, 20, 24)]
    assert any(line.startswith("diagnose: figures: 6/6 diagnostics (100%)") for line in lines), lines


def test_overwrite_replaces_the_report(tmp_path, source):
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("old")
    diagnose("--prototypes", source.prototypes, "--configs", source.target, "--out", out, "--overwrite")
    assert not (out / "old.txt").exists() and (out / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_tsne_map_needs_scikit_learn(tmp_path, source):
    try:
        import sklearn  # noqa: F401
    except ImportError:
        result = CliRunner().invoke(main, ["diagnose", "--prototypes", str(source.prototypes), "--configs",
                                           str(source.target), "--map", "tsne", "--out", str(tmp_path / "r")])
        assert_one_line_error(result, "--map tsne needs scikit-learn")
        assert not (tmp_path / "r").exists()
    else:
        diagnose("--prototypes", source.prototypes, "--configs", source.target, "--map", "tsne", "--out", tmp_path / "r")
        assert (tmp_path / "r" / "map.png").is_file()


@pytest.mark.slow
@pytest.mark.shared
def test_shared_model_naphthalene_against_benzene_prototypes(tmp_path, shared_dir):
    """The real ANI-CC model: benzene prototypes cover naphthalene's H better than its C (the fused
    ring carbons have no benzene counterpart), and the model itself beats composition alone."""
    import ase.io

    model = shared_dir / "models" / "ani500k_small_CC.model"
    latents, prototypes = tmp_path / "benzene.h5", tmp_path / "benzene_p.h5"
    run_extract(ExtractRequest(model=str(model), configs=[shared_dir / "data" / "md17-xtb" / "benzene.xyz"],
                               out=latents, max_configs=80))
    build_prototypes(PrototypesRequest(latents=[latents], out=prototypes, k=4))
    ase.io.write(tmp_path / "naphthalene.xyz", ase.io.read(shared_dir / "data" / "md17-pbe" / "naphthalene.xyz", ":40"))
    diagnose("--prototypes", prototypes, "--configs", tmp_path / "naphthalene.xyz", "--out", tmp_path / "r")
    results = read_report(tmp_path / "r")
    by_element = results["coverage"]["by_element"]
    assert by_element.keys() == {"H", "C"}
    assert by_element["H"]["coverage"] > by_element["C"]["coverage"]
    predictor = results["energy_predictor"]
    assert predictor["prototype"]["n_configs"] == 40
    assert predictor["pretrained_model"]["mae_meV"] < predictor["composition_only"]["mae_meV"]
