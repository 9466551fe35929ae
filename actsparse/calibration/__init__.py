"""Calibration: statistics of site inputs on calibration text, turned into a SparsityPlan.

    plan = actsparse.calibration.calibrate(model, texts, method="teal-greedy", sparsity=0.5,
                                           tokenizer=tok)

Methods: ``teal`` (uniform quantile thresholds), ``teal-greedy`` (TEAL's per-block greedy
allocation), ``cats`` (MLP activation thresholds), ``cett`` (MLP thresholds from an output-error
budget), ``stat-topk`` (calibration-free statistical top-k). See methods.py.
"""

from .histogram import LogHistogram, Statistics, collect_statistics
from .methods import (CALIBRATE_METHODS, CALIBRATION_ARTICLES, METHODS, CalibrationError, Calibrator, calibrate,
                      overall_sparsity, token_batches, wikitext2_split)
from .predictor import PredictorConfig, PredictorTrainer, train_predictor_plan
from .sites import SiteRecord, trace_sites

__all__ = [
    "CALIBRATION_ARTICLES",
    "METHODS",
    "CALIBRATE_METHODS",
    "PredictorConfig",
    "PredictorTrainer",
    "train_predictor_plan",
    "CalibrationError",
    "Calibrator",
    "LogHistogram",
    "SiteRecord",
    "Statistics",
    "calibrate",
    "collect_statistics",
    "overall_sparsity",
    "token_batches",
    "trace_sites",
    "wikitext2_split",
]
