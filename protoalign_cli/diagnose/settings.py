"""Choices, defaults and thresholds of ``protoalign diagnose``, defined once (the CLI imports them)."""

DEFAULT_ENERGY_KEY = "REF_energy"
DEFAULT_RADIUS_FACTOR = 1.5
DEFAULT_SPREAD_THRESHOLD_MEV = 50.0
MAP_METHODS = ("pca", "tsne")
DEFAULT_MAP_METHOD = "pca"

SAFE_COVERAGE = 0.9
SAFE_SCATTER_RATIO = 1.5
WORST_PROTOTYPES_SHOWN = 10
MAP_POINTS_PER_ELEMENT = 3000  # target atoms, and source atoms, drawn per element
MAP_NUMBERED_PROTOTYPES = 8  # prototypes numbered per element on map.png (those holding most target atoms)
FIGURE_DPI = 100
PREDICTORS = ("prototype", "composition_only", "pretrained_model")
