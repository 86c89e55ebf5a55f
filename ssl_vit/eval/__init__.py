"""Representation quality: k-NN (DINO's protocol) and linear probe (MAE's), on frozen features."""

from ssl_vit.data.views import EvalView
from ssl_vit.eval.callback import EvaluationCallback
from ssl_vit.eval.evaluator import Evaluator
from ssl_vit.eval.features import FeatureSet, extract_features, load_features, pooled_features, save_features
from ssl_vit.eval.knn import knn_classify
from ssl_vit.eval.linear import LinearProbeHead, train_linear_probe

__all__ = [
    "EvalView",
    "EvaluationCallback",
    "Evaluator",
    "FeatureSet",
    "LinearProbeHead",
    "extract_features",
    "knn_classify",
    "load_features",
    "pooled_features",
    "save_features",
    "train_linear_probe",
]
