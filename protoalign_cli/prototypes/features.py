"""Latent columns clustered into prototypes and their per-element standardization (pure functions)."""

from __future__ import annotations

import numpy as np

from protoalign_cli.errors import ProtoalignError
from protoalign_cli.io import schema

FEATURE_KINDS = {"all": ("interaction", "energy"), "interaction": ("interaction",), "energy": ("energy",)}


def feature_columns(header: schema.LatentHeader, features: str) -> np.ndarray:
    """Latent column indices of the blocks clustered for ``features`` ('all', 'interaction', 'energy')."""
    if features not in FEATURE_KINDS:
        raise ProtoalignError(f"--features must be one of {', '.join(FEATURE_KINDS)}, not {features!r}")
    columns = header.columns(FEATURE_KINDS[features])
    if not columns.size:
        raise ProtoalignError(f"the latent layout has no block of kind {' or '.join(FEATURE_KINDS[features])}")
    return columns.astype(np.int64)


def select_features(latent: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The clustered columns of full latent rows ([n, latent_dim] -> [n, d]); a view when contiguous."""
    columns = np.asarray(columns)
    if columns.size and np.array_equal(columns, np.arange(columns[0], columns[0] + columns.size)):
        return latent[:, columns[0]:columns[0] + columns.size]
    return latent[:, columns]


def feature_scaling(features: np.ndarray, standardize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation of ``features`` [n, d] (float64), as ``scaling_of`` maps them."""
    return scaling_of(features.mean(axis=0, dtype=np.float64), features.std(axis=0, dtype=np.float64), standardize)


def scaling_of(mean: np.ndarray, std: np.ndarray, standardize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The stored standardization map (mean, std) of features with this per-feature mean and population std.

    Features whose spread is zero (std <= 1e-12 * max(1, |mean|)) get std 1, so they map to 0
    instead of dividing by zero. Without ``standardize`` the identity map is returned (mean 0, std 1).
    """
    if not standardize:
        return np.zeros(len(mean)), np.ones(len(mean))
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return mean, std


def standardize(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Z-scores ``(features - mean) / std`` in float64 ([n, d]), the map stored in a prototype file."""
    scaled = np.subtract(features, mean, dtype=np.float64)
    np.divide(scaled, std, out=scaled)
    return scaled
