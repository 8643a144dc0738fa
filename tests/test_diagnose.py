"""protoalign diagnose, the pure statistics: ratios, coverage, offsets, agreement, verdict, output folder."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from protoalign_cli.diagnose import stats as dg
from protoalign_cli.diagnose.diagnostics.atom_energies import AgreementTable, AtomAgreement, AtomEnergiesResult
from protoalign_cli.diagnose.diagnostics.coverage import CoverageResult, ElementCoverage
from protoalign_cli.diagnose.diagnostics.predictor import PredictorErrors, PredictorResult
from protoalign_cli.diagnose.results import verdict_lines
from protoalign_cli.io.schema import read_latents
from protoalign_cli.prototypes.assignment import assign, distance_ratio


def test_distance_ratio_divides_by_the_assigned_radius():
    radius = np.array([2.0, 0.5, 0.0])
    prototype_id = np.array([0, 1, -1, 2, 2, 0])
    distance = np.array([1.0, 1.0, np.inf, 0.0, 0.3, 3.0])
    ratio = distance_ratio(distance, prototype_id, radius)
    np.testing.assert_array_equal(ratio, [0.5, 2.0, np.inf, 0.0, np.inf, 1.5])


def test_element_coverage_counts_atoms_within_the_factor():
    z = np.array([1, 1, 1, 1, 6, 6, 7])
    ratio = np.array([0.2, 1.0, 1.5, 1.6, 0.9, 3.0, np.inf])
    table = dg.element_coverage(z, ratio, 1.5, elements_with_prototypes=[1, 6])
    assert table[1]["n_atoms"] == 4 and table[1]["n_covered"] == 3 and table[1]["coverage"] == 0.75
    assert table[6]["n_covered"] == 1 and table[6]["ratio_max"] == 3.0
    assert table[7] == {"n_atoms": 1, "n_covered": 0, "coverage": 0.0, "has_prototypes": False,
                        "ratio_quantiles": {}, "ratio_max": None}
    assert dg.element_coverage(z, ratio, 1.0, [1, 6])[1]["n_covered"] == 2


def test_prototype_usage_ignores_unassigned_atoms():
    np.testing.assert_array_equal(dg.prototype_usage(np.array([0, 2, 2, -1, 2]), 4), [1, 0, 3, 0])


def test_composition_and_per_config_sums():
    config_index = np.array([0, 0, 0, 1, 1])
    z = np.array([1, 1, 8, 6, 8])
    np.testing.assert_array_equal(dg.composition_matrix(config_index, z, [1, 6, 8], 2), [[2, 0, 1], [0, 1, 1]])
    np.testing.assert_allclose(dg.per_config_sum(config_index, np.array([1.0, 2, 3, 4, 5]), 2), [6.0, 9.0])


def test_offsets_recover_a_per_element_shift_exactly():
    rng = np.random.default_rng(0)
    composition = rng.integers(1, 6, size=(30, 3)).astype(float)
    predicted = rng.normal(size=30)
    true_offsets = np.array([0.5, -2.0, 7.0])
    reference = predicted + composition @ true_offsets
    stats = dg.offset_corrected_errors(predicted, reference, composition)
    np.testing.assert_allclose(stats["offsets_eV"], true_offsets, atol=1e-10)
    assert stats["mae_meV"] < 1e-8 and stats["mae_raw_meV"] > 1000
    assert stats["pearson"] == pytest.approx(1.0)


def test_offsets_with_one_composition_remove_the_mean_residual():
    composition = np.tile([9.0, 8.0, 4.0], (5, 1))
    predicted = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    reference = np.array([10.0, 10.5, 12.5, 13.0, 14.0])
    stats = dg.offset_corrected_errors(predicted, reference, composition)
    corrected = predicted + (reference - predicted).mean()
    assert stats["mae_meV"] == pytest.approx(np.mean(np.abs(corrected - reference)) * 1000)
    assert stats["mae_meV_per_atom"] == pytest.approx(stats["mae_meV"] / 21)
    assert stats["pearson"] == pytest.approx(np.corrcoef(predicted, reference)[0, 1])
    assert stats["pearson_beyond_composition"] == pytest.approx(stats["pearson"])
    np.testing.assert_allclose(dg.beyond_composition(reference, composition), reference - reference.mean())


def test_corrected_error_is_the_difference_beyond_composition():
    rng = np.random.default_rng(1)
    composition = rng.integers(1, 4, size=(12, 2)).astype(float)
    predicted, reference = rng.normal(size=12), rng.normal(size=12)
    stats = dg.offset_corrected_errors(predicted, reference, composition)
    difference = dg.beyond_composition(predicted, composition) - dg.beyond_composition(reference, composition)
    assert stats["mae_meV"] == pytest.approx(np.mean(np.abs(difference)) * 1000)


def test_pearson_is_none_for_constant_or_single_values():
    assert dg.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    assert dg.pearson([1.0], [2.0]) is None
    assert dg.pearson([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_atom_energy_agreement_separates_bias_from_scatter():
    z = np.array([1, 1, 1, 1, 6, 6])
    eps_star = np.array([0.0, 0.0, 1.0, 1.0, 2.0, 3.0])
    eps = eps_star + np.array([0.1, 0.3, 0.1, 0.3, -1.0, -1.0])
    member_std = np.array([0.1, 0.1, 0.05, 0.05, 0.2, 0.2])
    table = dg.atom_energy_agreement(z, eps, eps_star, member_std)
    assert table[1]["bias_meV"] == pytest.approx(200.0)
    assert table[1]["mae_meV"] == pytest.approx(100.0)
    assert table[1]["mae_raw_meV"] == pytest.approx(200.0)
    assert table[1]["rms_meV"] == pytest.approx(100.0)
    assert table[1]["source_rms_std_meV"] == pytest.approx(1000 * np.sqrt((0.01 + 0.0025) / 2))
    assert table[1]["scatter_ratio"] == pytest.approx(0.1 / np.sqrt(0.00625))
    assert table[1]["bias_ratio"] == pytest.approx(0.2 / np.sqrt(0.00625))
    assert table[6]["bias_meV"] == pytest.approx(-1000.0) and table[6]["mae_meV"] == pytest.approx(0.0)
    assert table[6]["scatter_ratio"] == pytest.approx(0.0) and table[6]["bias_ratio"] == pytest.approx(5.0)
    assert table[6]["pearson"] == pytest.approx(1.0)


def test_source_members_have_scatter_ratio_one_and_no_bias():
    """Atoms that are exactly the members of their prototypes (eps* their mean, std their population
    std) scatter as the source does: ratio 1, bias 0."""
    rng = np.random.default_rng(3)
    prototype_id = np.repeat([0, 1, 2], [5, 9, 4])
    eps = rng.normal(size=18) + prototype_id
    mean = np.array([eps[prototype_id == p].mean() for p in range(3)])
    std = np.array([eps[prototype_id == p].std() for p in range(3)])
    row = dg.atom_energy_agreement(np.ones(18, int), eps, mean[prototype_id], std[prototype_id])[1]
    assert row["scatter_ratio"] == pytest.approx(1.0, abs=1e-12) and row["bias_meV"] == pytest.approx(0.0, abs=1e-9)


def test_site_statistics_per_atom_position_of_fixed_molecules():
    from ase import Atoms

    water = [Atoms("OH2"), Atoms("OH2")]
    assert dg.fixed_molecule_files(water + [Atoms("OH2"), Atoms("H2O")], [2, 2]) == [0]
    file_index = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
    atom_index = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    z = np.array([8, 1, 1, 8, 1, 1, 8, 1, 1])
    ratio = np.array([0.5, 2.0, np.inf, 0.7, 1.0, np.inf, 0.1, 0.1, 0.1])
    difference = np.array([0.1, 0.2, np.nan, 0.3, 0.4, np.nan, 0.0, 0.0, 0.0])
    rows = dg.site_statistics(file_index, atom_index, z, ratio, 1.5, difference, fixed_files=[0])
    assert [(r["file"], r["atom_index"], r["element"], r["n_configs"]) for r in rows] == [(0, 0, "O", 2), (0, 1, "H", 2),
                                                                                           (0, 2, "H", 2)]
    assert [r["coverage"] for r in rows] == [1.0, 0.5, 0.0]
    assert rows[0]["ratio_median"] == pytest.approx(0.6) and rows[2]["ratio_median"] is None
    assert rows[1]["pretrained_bias_meV"] == pytest.approx(300.0) and rows[2]["pretrained_bias_meV"] is None


def test_prototype_disagreement_and_element_bias():
    z = np.array([1, 1, 6])
    np.testing.assert_allclose(dg.element_bias(z, np.array([1.0, 3.0, 5.0])), [2.0, 2.0, 5.0])
    result = dg.prototype_disagreement(np.array([0, 0, 2, -1]), np.array([1.0, 3.0, 4.0, 9.0]), 3)
    np.testing.assert_array_equal(result, [2.0, np.nan, 4.0])


def test_wide_prototypes_uses_a_strict_threshold():
    np.testing.assert_array_equal(dg.wide_prototypes(np.array([0.01, 0.05, 0.051, 0.2]), 0.05), [2, 3])


def test_pca_keeps_distances_of_points_on_a_plane():
    rng = np.random.default_rng(2)
    plane = rng.normal(size=(40, 2)) * [3.0, 1.0]
    basis, _ = np.linalg.qr(rng.normal(size=(6, 2)))
    points = plane @ basis.T + 5.0
    projected = dg.pca_2d(points)
    distances = lambda x: np.linalg.norm(x[:, None] - x[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(distances(projected), distances(points), atol=1e-10)
    assert projected[:, 0].var() > projected[:, 1].var()


def _agreement(scatter_ratio=1.0, bias_ratio=0.0):
    return AtomAgreement(n_atoms=10, bias_meV=10.0 * bias_ratio, mae_meV=10.0, mae_raw_meV=10.0,
                         rms_meV=10.0 * scatter_ratio, source_rms_std_meV=10.0, scatter_ratio=scatter_ratio,
                         bias_ratio=bias_ratio, pearson=0.5)


def _element(n_atoms, n_covered, has_prototypes):
    return ElementCoverage(n_atoms=n_atoms, n_covered=n_covered, coverage=n_covered / n_atoms,
                           has_prototypes=has_prototypes, ratio_quantiles={}, ratio_max=None, n_prototypes=1,
                           n_prototypes_used=1)


def _errors(mae):
    return PredictorErrors(n_configs=5, mae_raw_meV=mae, mae_meV=mae, mae_meV_per_atom=mae / 10, rmse_meV=mae,
                           pearson=0.9, pearson_beyond_composition=0.5, offsets_eV={})


def _results(coverage=0.95, has_n=True, predictor=True, pretrained=None, finetuned=None, prototype_mae=30.0):
    """Typed coverage, predictor and atom-energy results in registry order, and the element names."""
    by_element = {"H": _element(10, 10, True)}
    if not has_n:
        by_element["N"] = _element(2, 0, False)
    parts = [
        CoverageResult(radius_factor=1.5, overall=coverage, n_covered=11, by_element=by_element),
        (PredictorResult(available=True, note="", errors={"prototype": _errors(prototype_mae),
                                                          "composition_only": _errors(20.0)})
         if predictor else PredictorResult(available=False, note="no reference energies")),
        AtomEnergiesResult(
            pretrained=AgreementTable({"H": _agreement(**(pretrained or {}))}),
            finetuned=None if finetuned is None else AgreementTable({"H": _agreement(**finetuned)}, []),
        ),
    ]
    return parts, list(by_element)


@pytest.mark.parametrize("changes, safe, reason", [
    ({}, True, None),
    ({"coverage": 0.85}, False, "coverage below 0.9"),
    ({"has_n": False}, False, "N has no prototypes"),
    ({"predictor": False}, True, None),
    ({"pretrained": {"scatter_ratio": 1.4}}, True, None),
    ({"pretrained": {"scatter_ratio": 1.6}}, False, "H pretrained atom energies scatter more than 1.5 x source"),
    ({"pretrained": {"bias_ratio": 1.6}}, False, "H atom energies are shifted from their prototypes"),
    ({"finetuned": {"scatter_ratio": 1.2, "bias_ratio": 3.0}}, True, None),
    ({"finetuned": {"scatter_ratio": 1.7}}, False, "H fine-tuned atom energies scatter more than 1.5 x source"),
])
def test_verdict(changes, safe, reason):
    lines, is_safe = verdict_lines(*_results(**changes))
    assert is_safe is safe
    assert lines[-1].startswith("overall: coverage")
    assert ("SAFE" in lines[-1]) is safe
    if reason:
        assert reason in lines[-1]
    assert lines[0].startswith("H: coverage 1.000 (10/10 atoms within 1.5 x radius); pretrained eps - eps*: bias")
    assert ("fine-tuned eps - eps*" in lines[0]) is ("finetuned" in changes)


@pytest.mark.parametrize("changes, expect_no_gain", [
    ({}, True),                       # prototype predictor 30 meV vs composition-only 20 meV
    ({"prototype_mae": 20.0}, True),  # a tie is no better
    ({"prototype_mae": 19.0}, False),
    ({"predictor": False}, False),    # not measured: nothing said
    ({"prototype_mae": 19.0, "coverage": 0.5}, False),
])
def test_verdict_says_when_prototype_energies_cannot_help(changes, expect_no_gain):
    lines, _ = verdict_lines(*_results(**changes))
    assert ("expect no gain in energy error from alignment" in lines[-1]) is expect_no_gain


# ----------------------------------------------------------------------------- structure and figures

DIAGNOSE_PACKAGE = Path(__file__).resolve().parents[1] / "protoalign_cli" / "diagnose"


def diagnose_import_graph() -> dict[str, set[str]]:
    """Module → the protoalign_cli.diagnose modules it imports (any from-import: top level, in functions or
    under TYPE_CHECKING). A package's implicit import of its parents is not an edge."""
    root = DIAGNOSE_PACKAGE.parents[1]
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for p in DIAGNOSE_PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
        graph[module] = targets - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order), or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_diagnose_modules_import_one_way():
    graph = diagnose_import_graph()
    assert "protoalign_cli.diagnose.figures" in graph and graph["protoalign_cli.diagnose.results"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert not any(target.startswith("protoalign_cli.diagnose.diagnostics")
                   for target in graph["protoalign_cli.diagnose.figures"])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """40 prototypes per element (H, C) built from synthetic latents, and those atoms as a target of
    which the first 50 of each element are pushed far from every prototype (not covered)."""
    from prototype_files import build, write_synthetic_latents

    folder = tmp_path_factory.mktemp("crowded")
    latents_path = write_synthetic_latents(folder / "source.h5", {1: 40, 6: 40}, n_per_cluster=25)
    prototypes = build(latents_path, folder / "prototypes.h5", k=40)
    latents = read_latents(latents_path)
    latent = latents.latent.copy()
    for z in (1, 6):
        latent[np.flatnonzero(latents.atomic_number == z)[:50]] += 200.0
    prototype_id, distance = assign(prototypes, latent, latents.atomic_number)
    ratio = distance_ratio(distance, prototype_id, prototypes.radius)
    return SimpleNamespace(folder=folder, prototypes=prototypes, latent=latent, z=latents.atomic_number,
                           prototype_id=prototype_id, ratio=ratio)


def drawn(figure) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure).draw()


def test_map_numbers_few_prototypes_draws_source_atoms_and_names_every_kind_of_point(crowded):
    from protoalign_cli.diagnose.figures import map_figure
    from protoalign_cli.diagnose.settings import MAP_NUMBERED_PROTOTYPES
    from protoalign_cli.diagnose.source_atoms import sample_source_atoms

    source = sample_source_atoms(crowded.prototypes, per_element=300)
    assert source.note == "" and sorted(np.unique(source.atomic_number, return_counts=True)[1]) == [300, 300]
    figure = map_figure(crowded.prototypes, crowded.latent, crowded.z, crowded.prototype_id, crowded.ratio, 1.5,
                        "pca", source)
    drawn(figure)
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert len(panels) == 2
    for ax in panels:
        numbers = [int(text.get_text()) for text in ax.texts]
        assert 0 < len(numbers) <= MAP_NUMBERED_PROTOTYPES
        sizes = sorted(len(collection.get_offsets()) for collection in ax.collections)
        assert sizes == sorted([300, 1000 - 50, 50, 40])  # source, target covered / not covered, centroids
    (legend,) = figure.legends
    texts = " | ".join(text.get_text() for text in legend.get_texts())
    for fragment in ("source atoms (a sample)", "target atoms, covered", "target atoms, not covered", "prototype centroids"):
        assert fragment in texts, texts


def test_map_says_when_the_source_latent_file_is_gone(crowded, tmp_path):
    import shutil

    from protoalign_cli.diagnose.figures import map_figure
    from protoalign_cli.diagnose.source_atoms import sample_source_atoms
    from protoalign_cli.prototypes.assignment import load_prototypes

    shutil.copy(crowded.folder / "prototypes.h5", tmp_path / "prototypes.h5")
    prototypes = load_prototypes(tmp_path / "prototypes.h5")
    prototypes.latent_files = [{**record, "path": "source.h5"} for record in prototypes.latent_files]
    source = sample_source_atoms(prototypes, per_element=10)
    assert len(source.atomic_number) == 0 and source.note == "source.h5 not found"
    shutil.copy(crowded.folder / "source.h5", tmp_path / "source.h5")  # beside the prototype file: found
    assert len(sample_source_atoms(prototypes, per_element=10).atomic_number) == 20
    figure = map_figure(prototypes, crowded.latent, crowded.z, crowded.prototype_id, crowded.ratio, 1.5, "pca",
                        source)
    drawn(figure)
    assert "source atoms: not drawn (source.h5 not found)" in [t.get_text() for t in figure.legends[0].get_texts()]


def test_ratio_histogram_legend_names_both_lines(crowded):
    from protoalign_cli.diagnose.figures import ratio_figure

    rows = {name: _element(1000, 950, True) for name in ("H", "C")}
    figure = ratio_figure(crowded.z, [1, 6], crowded.ratio, 1.5, rows)
    drawn(figure)
    for ax in figure.axes:
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert labels == ["ratio 1 (the radius)", "radius factor 1.5 (covered: left)"]
