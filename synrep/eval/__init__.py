"""Frozen-feature evaluation: feature extraction, linear probes (L-BFGS, SGD head grid), kNN."""

from synrep.eval.features import extract_features, load_features, save_features
from synrep.eval.knn import knn_classify
from synrep.eval.linear import fit_logreg, lbfgs_probe, sgd_probe_grid, stratified_split

__all__ = [
    "extract_features",
    "fit_logreg",
    "knn_classify",
    "lbfgs_probe",
    "load_features",
    "save_features",
    "sgd_probe_grid",
    "stratified_split",
]
