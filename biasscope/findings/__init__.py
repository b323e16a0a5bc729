"""Findings: a registry of small detectors over a stored scan (DESIGN section 6).

>>> from biasscope.findings import Context, run_detectors
>>> findings, status, flags = run_detectors(Context.from_scan(scan, analysis))  # doctest: +SKIP

Each detector lives in its own module and registers itself with :func:`register`; importing
this package registers them all, in the order below (which is the order they run in).
``background_reliance`` reads the counterfactual background tests (run with the model by
:mod:`biasscope.counterfactuals`) from ``Context.counterfactuals`` and skips without them.
"""

from .base import (BANDS, DEFAULT_OPTIONS, REGISTRY, SCOPES, Context, Detector, DetectorResult, Finding,
                   InvariantError, detect, register, run_detector, run_detectors, severity_band)
from . import (misclassified, confident_mistake, label_issue, off_object_attention,  # noqa: F401,E402
               background_reliance, spurious_background, spurious_feature, clever_hans_cluster,
               group_gap)

__all__ = ["BANDS", "DEFAULT_OPTIONS", "REGISTRY", "SCOPES", "Context", "Detector", "DetectorResult",
           "Finding", "InvariantError", "detect", "register", "run_detector", "run_detectors", "severity_band"]
