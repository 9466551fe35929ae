"""Calibration: statistics of site inputs on calibration text, turned into a SparsityPlan.

    plan = actsparse.calibration.calibrate(model, texts, method="teal-greedy", sparsity=0.5,
                                           tokenizer=tok)

Each method is a registered class (``method.METHODS``): ``teal`` (uniform quantile
thresholds, optionally on WINA scores), ``teal-greedy`` (TEAL's per-block greedy allocation),
``cats`` (MLP activation thresholds), ``cett`` (MLP thresholds from an output-error budget),
``stat-topk`` (calibration-free statistical top-k), ``predictor`` (learned predictors), ``polar``
(attention head routers; ``head_density=`` adds them to any method's plan).
Every module of this package is imported here, so a new method is one new file: its class,
decorated with ``register_method``.
"""

import importlib
import pkgutil

from . import teal, greedy, cats, cett, stat_topk, predictor, heads  # noqa: F401,I001  (registers the methods, in this order)
from .calibrator import Calibrator, calibrate
from .data import CALIBRATION_ARTICLES, token_batches, wikitext2_split
from .greedy import greedy_for
from .histogram import LogHistogram
from .method import METHODS, CalibrationError, Made, Method, get_method, register_method
from .predictor import PredictorConfig, PredictorTrainer, train_predictor_plan
from .sites import SiteRecord, overall_sparsity, trace_sites
from .statistics import Statistics, collect_statistics

for _mod in pkgutil.iter_modules(__path__):  # methods beyond the ones named above register on import
    if _mod.name != "command":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "CALIBRATION_ARTICLES",
    "METHODS",
    "CalibrationError",
    "Calibrator",
    "LogHistogram",
    "Made",
    "Method",
    "PredictorConfig",
    "PredictorTrainer",
    "SiteRecord",
    "Statistics",
    "calibrate",
    "collect_statistics",
    "get_method",
    "greedy_for",
    "overall_sparsity",
    "register_method",
    "token_batches",
    "trace_sites",
    "train_predictor_plan",
    "wikitext2_split",
]
