"""The PNG figures of ``protoalign diagnose`` (matplotlib, imported inside the functions).

Each ``*_figure`` function builds a matplotlib Figure from arrays and plain values (the diagnostics
call them; this module imports none of them: what it reads of their results is described by the
protocols below); ``save`` writes one. Energies in eV; distances in the prototypes' standardized
feature space.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

import numpy as np

from protoalign_cli.diagnose.settings import FIGURE_DPI, MAP_NUMBERED_PROTOTYPES, MAP_POINTS_PER_ELEMENT
from protoalign_cli.diagnose.source_atoms import SourceAtoms
from protoalign_cli.diagnose.stats import pca_2d, prototype_usage, symbol, tsne_2d

if TYPE_CHECKING:
    from protoalign_cli.io.schema import Prototypes

SOURCE_COLOUR = "0.78"
MAP_LABEL_SPACING = 0.08  # axes fraction: a prototype number closer than this to one already drawn is left out
UNCOVERED_COLOUR = "0.15"


class ElementCoverageRow(Protocol):
    """What the ratio figure reads of one element's coverage."""

    n_atoms: int
    coverage: float
    has_prototypes: bool


class PredictorErrorsRow(Protocol):
    """What the predictor figure reads of one predictor's errors (meV)."""

    n_configs: int
    mae_meV: float
    pearson_beyond_composition: float | None


class AtomAgreementRow(Protocol):
    """What the atom-energy figure reads of one element's agreement (meV)."""

    bias_meV: float
    mae_meV: float
    pearson: float | None


def save(figure, path: Path) -> Path:
    """Write ``figure`` as PNG to ``path``; return the path."""
    figure.savefig(path)
    return path


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
    """Latent rows in the prototypes' per-element standardized feature space ([n, d]).

    Rows of elements without prototypes are NaN.
    """
    from protoalign_cli.prototypes.features import select_features, standardize

    atomic_number = np.asarray(atomic_number)
    features = np.full((len(latent), len(prototypes.columns)), np.nan)
    if not len(latent):
        return features
    for e, z in enumerate(prototypes.elements):
        rows = np.flatnonzero(atomic_number == z)
        features[rows] = standardize(select_features(latent[rows], prototypes.columns),
                                     prototypes.feature_mean[e], prototypes.feature_std[e])
    return features


def numbered_prototypes(mine: np.ndarray, usage: np.ndarray, limit: int = MAP_NUMBERED_PROTOTYPES) -> np.ndarray:
    """Of an element's prototypes ``mine``, the at most ``limit`` that hold the most target atoms (usage > 0),
    most used first."""
    held = usage[mine]
    order = np.argsort(-held, kind="stable")[:limit]
    return mine[order[held[order] > 0]]


def _draw_map_panel(ax, xy: dict[str, np.ndarray], mine: np.ndarray, local: np.ndarray, covered: np.ndarray,
                    numbered: np.ndarray) -> None:
    """Source atoms (faint), target atoms (coloured by prototype; crosses: not covered), centroids (stars),
    the ``numbered`` ones (most used first) labelled with their prototype number where it has room."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(mine) <= 10 else "tab20"]
    target, centroids = xy["target"], xy["centroids"]
    ax.scatter(xy["source"][:, 0], xy["source"][:, 1], s=3, c=SOURCE_COLOUR, linewidths=0, zorder=1)
    ax.scatter(target[covered, 0], target[covered, 1], s=5, c=palette(local[covered] % palette.N), alpha=0.7,
               linewidths=0, zorder=2)
    ax.scatter(target[~covered, 0], target[~covered, 1], s=9, c=UNCOVERED_COLOUR, marker="x", linewidths=0.6,
               zorder=3)
    ax.scatter(centroids[:, 0], centroids[:, 1], s=70 if len(mine) <= 16 else 36,
               c=palette(np.arange(len(mine)) % palette.N), marker="*", edgecolors="k", linewidths=0.5, zorder=4)
    ax.autoscale_view()
    to_axes = ax.transData + ax.transAxes.inverted()
    placed: list[np.ndarray] = []
    for p in numbered:
        x, y = centroids[np.searchsorted(mine, p)]
        where = to_axes.transform((x, y))
        if any(np.abs(where - other).max() < MAP_LABEL_SPACING for other in placed):
            continue
        placed.append(where)
        ax.annotate(str(p), (x, y), fontsize=6, xytext=(4, 4), textcoords="offset points", zorder=5,
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "0.6", "alpha": 0.8})


def _map_legend(figure, radius_factor: float, source: SourceAtoms) -> None:
    """One legend for every panel, below them: source atoms, target atoms covered / not, prototypes."""
    from matplotlib.lines import Line2D

    source_label = ("source atoms (a sample)" if len(source.atomic_number)
                    else f"source atoms: not drawn ({source.note or 'no latent files recorded'})")
    handles = [
        Line2D([], [], linestyle="none", marker="o", markersize=3, color=SOURCE_COLOUR, label=source_label),
        Line2D([], [], linestyle="none", marker="o", markersize=3, color="tab:blue",
               label=f"target atoms, covered (ratio <= {radius_factor:g}); colour: their prototype"),
        Line2D([], [], linestyle="none", marker="x", markersize=4, color=UNCOVERED_COLOUR,
               label="target atoms, not covered"),
        Line2D([], [], linestyle="none", marker="*", markersize=8, markerfacecolor="tab:orange",
               markeredgecolor="k", markeredgewidth=0.5,
               label=f"prototype centroids (numbered: up to {MAP_NUMBERED_PROTOTYPES} holding most target atoms, "
                     "where there is room)"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=7, frameon=False)


def _sample(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """At most MAP_POINTS_PER_ELEMENT of ``rows`` (sorted)."""
    if len(rows) <= MAP_POINTS_PER_ELEMENT:
        return rows
    return np.sort(rng.choice(rows, MAP_POINTS_PER_ELEMENT, replace=False))


def map_figure(prototypes: Prototypes, latent: np.ndarray, z: np.ndarray, prototype_id: np.ndarray,
               ratio: np.ndarray, radius_factor: float, method: str, source: SourceAtoms, seed: int = 0):
    """Per target element, a 2-D map (PCA or t-SNE, fitted on centroids, source and target atoms together)
    of the prototype centroids (stars; the MAP_NUMBERED_PROTOTYPES holding most target atoms numbered),
    a sample of the source atoms (faint grey) and the target atoms (dots coloured by their prototype;
    crosses: not covered), in the prototypes' standardized feature space."""
    rng = np.random.default_rng(seed)
    elements = sorted(set(int(v) for v in z))
    figure, axes = _figure(len(elements), panel_inches=3.6)
    features = standardized_features(prototypes, latent, z)
    source_features = standardized_features(prototypes, source.latent, source.atomic_number)
    usage = prototype_usage(prototype_id, len(prototypes.element))
    for ax, element in zip(axes, elements):
        mine = np.flatnonzero(np.asarray(prototypes.element) == element)
        atoms = _sample(np.flatnonzero(z == element), rng)
        source_rows = np.flatnonzero(np.asarray(source.atomic_number) == element)
        points = np.vstack([np.asarray(prototypes.centroid)[mine], source_features[source_rows], features[atoms]])
        if not len(mine):
            _note(ax, f"no prototypes for {symbol(element)}:\nevery target atom is uncovered")
        elif len(points) < 3:
            _note(ax, "too few points to map")
        else:
            xy = tsne_2d(points, seed) if method == "tsne" else pca_2d(points)
            split = np.cumsum([len(mine), len(source_rows)])
            _draw_map_panel(ax, dict(zip(("centroids", "source", "target"), np.split(xy, split))), mine,
                            np.searchsorted(mine, prototype_id[atoms]), ratio[atoms] <= radius_factor,
                            numbered_prototypes(mine, usage))
        ax.set_title(f"{symbol(element)}: {len(mine)} prototypes, {int((z == element).sum())} target atoms",
                     fontsize=8)
        ax.set_xlabel(f"{method.upper()} 1", fontsize=7)
        ax.set_ylabel(f"{method.upper()} 2", fontsize=7)
        ax.tick_params(labelsize=6)
    _map_legend(figure, radius_factor, source)
    return figure


def ratio_figure(z: np.ndarray, elements: Sequence[int], ratio: np.ndarray, radius_factor: float,
                 by_element: Mapping[str, ElementCoverageRow]):
    """Per element, a histogram of target atoms' distance / radius of their nearest prototype.

    Values beyond the plotted range are gathered in the last bin; the dashed line is the radius
    factor (covered to its left), the dotted one a ratio of 1 (the radius itself); a legend says so.
    """
    finite = ratio[np.isfinite(ratio)]
    limit = max(2 * radius_factor, min(float(np.ceil(np.percentile(finite, 99))) if len(finite) else 0.0, 10.0))
    figure, axes = _figure(len(elements))
    for ax, element in zip(axes, elements):
        row = by_element[symbol(element)]
        if not row.has_prototypes:
            _note(ax, f"no prototypes for {symbol(element)}\n({row.n_atoms} atoms)")
        else:
            ax.hist(np.minimum(ratio[z == element], limit), bins=60, range=(0, limit), color="tab:blue")
            ax.axvline(1.0, color="k", linestyle=":", linewidth=0.8, label="ratio 1 (the radius)")
            ax.axvline(radius_factor, color="tab:red", linestyle="--", linewidth=1.0,
                       label=f"radius factor {radius_factor:g} (covered: left)")
            ax.legend(fontsize=6, loc="upper right")
        ax.set_title(f"{symbol(element)}: coverage {row.coverage:.3f}", fontsize=8)
        ax.set_xlabel(f"distance / radius (last bin: >= {limit:g})", fontsize=7)
        ax.set_ylabel("target atoms", fontsize=7)
        ax.tick_params(labelsize=6)
    return figure


def predictor_figure(beyond: Mapping[str, np.ndarray], errors: Mapping[str, PredictorErrorsRow]):
    """Prototype predictor (and pretrained model) against reference energies, both beyond
    composition (less their per-element offset fits; for one molecule: less their mean), in eV.

    The vertical distance of a point to the diagonal is its offset-corrected error; the
    composition-only baseline predicts 0 beyond composition (the dashed line).
    """
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
    return figure


def atom_energies_figure(z: np.ndarray, eps_star: np.ndarray, eps: np.ndarray,
                         by_element: Mapping[str, AtomAgreementRow]):
    """Per element, the fine-tuned model's atom energy minus E0 (less the element's bias) against the
    assigned prototype's mean energy (eV)."""
    elements = sorted(set(int(v) for v in z))
    figure, axes = _figure(len(elements))
    for ax, element in zip(axes, elements):
        mask = z == element
        row = by_element[symbol(element)]
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
    return figure
