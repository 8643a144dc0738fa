"""The PNG figures of ``protoalign diagnose`` (matplotlib, imported inside the functions).

Energies in eV; distances in the prototypes' standardized feature space.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from protoalign_cli.diagnose.settings import FIGURE_DPI, MAP_POINTS_PER_ELEMENT
from protoalign_cli.diagnose.stats import pca_2d, symbol, tsne_2d

if TYPE_CHECKING:
    from protoalign_cli.diagnose.diagnostics.atom_energies import AgreementTable
    from protoalign_cli.diagnose.diagnostics.coverage import CoverageResult
    from protoalign_cli.diagnose.diagnostics.predictor import PredictorResult
    from protoalign_cli.io.schema import Prototypes


def _figure(n_panels: int, panel_inches: float = 3.2):
    from matplotlib.figure import Figure

    columns = min(n_panels, 4)
    rows = -(-n_panels // columns)
    figure = Figure(figsize=(panel_inches * columns, panel_inches * rows), dpi=FIGURE_DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return figure, axes[:n_panels]


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8)


def standardized_features(prototypes: Prototypes, latent: np.ndarray, atomic_number: np.ndarray) -> np.ndarray:
    """Target latents in the prototypes' per-element standardized feature space ([n, d]).

    Rows of elements without prototypes are NaN.
    """
    from protoalign_cli.prototypes.features import select_features, standardize

    atomic_number = np.asarray(atomic_number)
    features = np.full((len(latent), len(prototypes.columns)), np.nan)
    for e, z in enumerate(prototypes.elements):
        rows = np.flatnonzero(atomic_number == z)
        features[rows] = standardize(select_features(latent[rows], prototypes.columns),
                                     prototypes.feature_mean[e], prototypes.feature_std[e])
    return features


def _draw_map_panel(ax, centroids_xy: np.ndarray, atoms_xy: np.ndarray, mine: np.ndarray, local: np.ndarray,
                    covered: np.ndarray) -> None:
    """Target atoms (coloured by prototype; crosses: not covered) and numbered centroids (stars)."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(mine) <= 10 else "tab20"]
    ax.scatter(atoms_xy[covered, 0], atoms_xy[covered, 1], s=4, c=palette(local[covered] % palette.N),
               alpha=0.6, linewidths=0)
    ax.scatter(atoms_xy[~covered, 0], atoms_xy[~covered, 1], s=10, c="0.4", marker="x", linewidths=0.6,
               label="not covered")
    ax.scatter(centroids_xy[:, 0], centroids_xy[:, 1], s=90, c=palette(np.arange(len(mine)) % palette.N),
               marker="*", edgecolors="k", linewidths=0.7, label="prototype")
    for p, (x, y) in zip(mine, centroids_xy):
        ax.annotate(str(p), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.legend(fontsize=6, loc="best")


def plot_map(path: Path, prototypes: Prototypes, latent: np.ndarray, z: np.ndarray, prototype_id: np.ndarray,
             ratio: np.ndarray, radius_factor: float, method: str, seed: int = 0) -> Path:
    """Per target element, a 2-D map (PCA or t-SNE, fitted on centroids and target atoms together)
    of the prototype centroids (stars, numbered) and the target atoms (dots coloured by their
    prototype; grey crosses: not covered), in the prototypes' standardized feature space."""
    rng = np.random.default_rng(seed)
    elements = sorted(set(int(v) for v in z))
    figure, axes = _figure(len(elements))
    features = standardized_features(prototypes, latent, z)
    for ax, element in zip(axes, elements):
        mine = np.flatnonzero(np.asarray(prototypes.element) == element)
        atoms = np.flatnonzero(z == element)
        if len(atoms) > MAP_POINTS_PER_ELEMENT:
            atoms = np.sort(rng.choice(atoms, MAP_POINTS_PER_ELEMENT, replace=False))
        points = np.vstack([np.asarray(prototypes.centroid)[mine], features[atoms]])
        if not len(mine):
            _note(ax, f"no prototypes for {symbol(element)}:\nevery target atom is uncovered")
        elif len(points) < 3:
            _note(ax, "too few points to map")
        else:
            xy = tsne_2d(points, seed) if method == "tsne" else pca_2d(points)
            _draw_map_panel(ax, xy[: len(mine)], xy[len(mine):], mine, np.searchsorted(mine, prototype_id[atoms]),
                            ratio[atoms] <= radius_factor)
        ax.set_title(f"{symbol(element)}: {len(mine)} prototypes, {int((z == element).sum())} target atoms",
                     fontsize=8)
        ax.set_xlabel(f"{method.upper()} 1", fontsize=7)
        ax.set_ylabel(f"{method.upper()} 2", fontsize=7)
        ax.tick_params(labelsize=6)
    figure.savefig(path)
    return path


def plot_ratios(path: Path, z: np.ndarray, elements: Sequence[int], ratio: np.ndarray,
                coverage: CoverageResult) -> Path:
    """Per element, a histogram of target atoms' distance / radius of their nearest prototype.

    Values beyond the plotted range are gathered in the last bin; the dashed line is the radius
    factor (covered to its left), the dotted one a ratio of 1 (the radius itself).
    """
    factor = coverage.radius_factor
    finite = ratio[np.isfinite(ratio)]
    limit = max(2 * factor, min(float(np.ceil(np.percentile(finite, 99))) if len(finite) else 0.0, 10.0))
    figure, axes = _figure(len(elements))
    for ax, element in zip(axes, elements):
        row = coverage.by_element[symbol(element)]
        values = ratio[z == element]
        if not row.has_prototypes:
            _note(ax, f"no prototypes for {symbol(element)}\n({row.n_atoms} atoms)")
        else:
            ax.hist(np.minimum(values, limit), bins=60, range=(0, limit), color="tab:blue")
            ax.axvline(1.0, color="k", linestyle=":", linewidth=0.8)
            ax.axvline(factor, color="tab:red", linestyle="--", linewidth=1.0)
        ax.set_title(f"{symbol(element)}: coverage {row.coverage:.3f}", fontsize=8)
        ax.set_xlabel(f"distance / radius (last bin: >= {limit:g})", fontsize=7)
        ax.set_ylabel("target atoms", fontsize=7)
        ax.tick_params(labelsize=6)
    figure.savefig(path)
    return path


def plot_predictor(path: Path, predictor: PredictorResult) -> Path:
    """Prototype predictor (and pretrained model) against reference energies, both beyond
    composition (less their per-element offset fits; for one molecule: less their mean), in eV.

    The vertical distance of a point to the diagonal is its offset-corrected error; the
    composition-only baseline predicts 0 beyond composition (the dashed line).
    """
    beyond, errors = predictor.beyond_composition_eV, predictor.errors
    figure, (ax,) = _figure(1, panel_inches=4.0)
    x = beyond["reference"]
    ax.scatter(x, beyond["pretrained_model"], s=5, c="0.6", linewidths=0,
               label=f"pretrained model (MAE {errors['pretrained_model'].mae_meV:.0f} meV)")
    ax.scatter(x, beyond["prototype"], s=6, c="tab:blue", linewidths=0,
               label=f"prototype predictor (MAE {errors['prototype'].mae_meV:.0f} meV)")
    span = [min(x.min(), ax.get_ylim()[0]), max(x.max(), ax.get_ylim()[1])]
    ax.plot(span, span, "k-", linewidth=0.6)
    ax.axhline(0, color="tab:red", linestyle="--", linewidth=0.8,
               label=f"composition only (MAE {errors['composition_only'].mae_meV:.0f} meV)")
    r = errors["prototype"].pearson_beyond_composition
    ax.set_title(f"{errors['prototype'].n_configs} configurations, prototype predictor r = "
                 f"{'n/a' if r is None else f'{r:.2f}'}", fontsize=8)
    ax.set_xlabel("reference energy beyond composition (eV)", fontsize=7)
    ax.set_ylabel("predicted energy beyond composition (eV)", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6, loc="upper left")
    figure.savefig(path)
    return path


def plot_atom_energies(path: Path, z: np.ndarray, eps_star: np.ndarray, eps: np.ndarray,
                       finetuned: AgreementTable) -> Path:
    """Per element, the fine-tuned model's atom energy minus E0 (less the element's bias) against
    the assigned prototype's mean energy (eV)."""
    elements = sorted(set(int(v) for v in z))
    figure, axes = _figure(len(elements))
    for ax, element in zip(axes, elements):
        mask = z == element
        row = finetuned.by_element[symbol(element)]
        shifted = eps[mask] - row.bias_meV / 1000
        ax.scatter(eps_star[mask], shifted, s=4, alpha=0.4, linewidths=0)
        span = [min(eps_star[mask].min(), shifted.min()), max(eps_star[mask].max(), shifted.max())]
        ax.plot(span, span, "k-", linewidth=0.6)
        r = row.pearson
        ax.set_title(f"{symbol(element)}: MAE {row.mae_meV:.0f} meV, r {'n/a' if r is None else f'{r:.2f}'}, "
                     f"bias {row.bias_meV:+.0f} meV", fontsize=8)
        ax.set_xlabel("prototype energy eps*_p (eV)", fontsize=7)
        ax.set_ylabel("fine-tuned eps_i - bias (eV)", fontsize=7)
        ax.tick_params(labelsize=6)
    figure.savefig(path)
    return path
