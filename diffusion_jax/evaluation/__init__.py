"""Evaluation: noise-prediction metrics, bits/dim, Frechet distances, reports with pictures."""
from diffusion_jax.evaluation.frechet import (feature_statistics, frechet_distance, load_statistics,
                                              save_statistics)
from diffusion_jax.evaluation.metrics import prediction_metrics, regression_metrics
from diffusion_jax.evaluation.report import evaluate_run

__all__ = ["evaluate_run", "feature_statistics", "frechet_distance", "load_statistics",
           "prediction_metrics", "regression_metrics", "save_statistics"]
