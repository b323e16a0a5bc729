"""The detector contract: findings, results, the context a detector reads, the registry, the runner.

A detector is a registered :class:`Detector` subclass with one method, ``run(ctx)``, that reads
an explicit :class:`Context` and returns a :class:`DetectorResult`. It never writes anywhere and
never reaches into another object's private state; :meth:`Detector.evaluate` checks what it
returned (severities in [0, 1], per-image arrays of length N, finding kinds), so a broken
detector fails loudly instead of producing a report that lies. A detector that cannot run on
this scan (no masks, no attributes) returns :meth:`DetectorResult.skip` with the reason.
Exceptions are never swallowed here: a bug in a detector is a bug in biasscope.

Conventions shared by every detector:

* ``severity`` (of a finding) is in [0, 1]; bands: high >= 0.7, medium >= 0.4, low below.
* ``scores`` (per image) are in [0, 1] with **higher = more suspicious**, NaN where an image
  cannot be scored (e.g. it has no mask); ``flags`` are per-image booleans.
* Image-level detectors (``scope = "image"``) flag and score images but *report* them grouped
  per class (finding scope ``"class"``): ten thousand one-image findings are unreadable.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from biasscope.analysis import infer_attributes, to_jsonable
from biasscope.errors import BiasscopeError

__all__ = [
    "BANDS", "DEFAULT_OPTIONS", "REGISTRY", "SCOPES", "Context", "Detector", "DetectorResult",
    "Finding", "InvariantError", "register", "run_detector", "run_detectors", "severity_band",
]

SCOPES = ("image", "class", "cluster", "group")

#: Every option a detector reads, with its default. Unknown option names are an error, so a
#: typo cannot silently leave a default in force.
DEFAULT_OPTIONS: dict[str, Any] = {
    # confident_mistake: a wrong prediction at or above this confidence.
    "confident_threshold": 0.9,
    # off_object_attention: inside_frac below this AND lift below off_object_lift.
    "off_object_inside": 0.5,
    "off_object_lift": 1.0,
    # spurious_background: classes need this many correctly classified images with a mask;
    # flagged when the class's mean inside_frac is this far below the median of the others
    # (and significantly so), or when its mean lift is at most 1 (chance-level attention).
    "min_class_images": 5,
    "spurious_min_drop": 0.15,
    # clever_hans_cluster: a cluster must hold at least max(cluster_min_size,
    # cluster_min_share * class size) images.
    "cluster_min_size": 5,
    "cluster_min_share": 0.05,
    # clever_hans_cluster: "fixed location" = half of the cluster's mean attention in at most
    # this fraction of the image ...
    "cluster_hot_area": 0.1,
    # ... where the rest of its class puts at most this much of its attention, and whose
    # members' own centres of mass lie within this RMS distance (image units) of each other.
    "cluster_rest_mass": 0.2,
    "cluster_jitter": 0.04,
    # clever_hans_cluster: "off the object" = cluster mean inside_frac below off_object_inside
    # and at least this far below the rest of its class.
    "cluster_inside_gap": 0.15,
    # group_gap: groups (and the rest of their class) need this many images; a gap must be at
    # least min_gap; significance after Holm correction at level alpha.
    "group_min_n": 10,
    "group_min_gap": 0.1,
    "alpha": 0.05,
    # label_issue, object view: neighbours per image in the object-embedding kNN.
    "label_knn": 20,
    # label_issue, model view (images without an object embedding): a candidate is kept only
    # when the labelled class's CAM has a lift on the object below this (1 = chance level);
    # images without a mask are not gated.
    "label_max_lift": 1.0,
    # label_issue, object view: an issue needs at most this share of the object's look-alikes
    # to carry its label (1 of 20 neighbours) ...
    "label_max_share": 0.05,
    # ... or at most this share when the model's prediction disagrees with the label too
    # (and no shortcut explains the prediction) ...
    "label_max_share_confirmed": 0.1,
    # ... and below this leave-one-out agreement of the kNN with the labels
    # the view is unreliable and the model's prediction must confirm an issue too.
    "label_min_agreement": 0.85,
    # label_issue: the labelled class's CAM is "weak" below this share of the predicted one's.
    "label_cam_weak": 0.25,
    # background_reliance and the counterfactual backing of spurious_background: a BG-gap
    # counts when its bootstrap CI lies above 0 and either it is at least background_min_gap or
    # at least background_min_flip of the class's correct predictions flip on other backgrounds
    # (lower CI bound of the flip rate; flips alone also flag background_reliance). 0.15, not
    # 0.1: on the benchmark, a shortcut-free model's default answer for empty backgrounds gives
    # its class a significant gap of 0.10-0.12 with under 15% flips.
    "background_min_gap": 0.15,
    "background_min_flip": 0.2,
    # background_reliance: the Only-BG rate's lower CI bound must exceed chance by this margin
    # (the transplant rate's must exceed chance), and both must exceed the rate on other
    # classes' backgrounds (a model's default guess on empty images is not a shortcut).
    "background_only_bg_margin": 0.1,
    # spurious_feature: the attraction to a class (share of other classes' objects predicted
    # as it on backgrounds the model reads as it, minus the share on other backgrounds) needs a
    # lower CI bound of at least feature_min_attraction, a rate on the featured backgrounds of
    # at least feature_min_rate, and feature_min_backgrounds featured background images.
    "feature_min_attraction": 0.15,
    "feature_min_rate": 0.2,
    "feature_min_backgrounds": 20,
    # root cause first: a finding is explained by an attractor when at least this share of
    # its errors (or flips) went to the attractor's class on backgrounds read as that class.
    "explained_min_share": 0.5,
    # clever_hans_cluster with occlusion: the cluster's predictions change when its hot spot
    # is occluded (lower CI bound of the change rate at least occlusion_min_change, and at
    # least occlusion_min_excess above the change rate of other images occluded there).
    "occlusion_min_change": 0.3,
    "occlusion_min_excess": 0.2,
    # Paths listed per finding.
    "max_examples": 10,
    # Set (to the reason) when every CAM of the scan is zero: detectors whose evidence is the
    # heatmap itself (``needs_heatmaps``) then skip with that reason.
    "zero_heatmaps": None,
}

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class InvariantError(RuntimeError):
    """A detector broke the contract (a bug in biasscope, not a problem with the input)."""


#: Severity bands: name and lower bound (inclusive), checked in this order.
BANDS = (("high", 0.7), ("medium", 0.4), ("low", 0.0))


def severity_band(severity: float) -> str:
    """``high`` (>= 0.7), ``medium`` (>= 0.4) or ``low``."""
    return next(name for name, lo in BANDS if severity >= lo)


def _check_unit(x, what: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise InvariantError(f"{what} must be a number in [0, 1], got {x!r}") from None
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise InvariantError(f"{what} must be in [0, 1], got {v!r}")
    return v


# ----------------------------------------------------------------------------------------------
# Findings and results
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One finding. ``class_`` is written ``class`` in :meth:`to_dict` (a Python keyword here).

    ``group`` is ``{"attribute": name, "value": value}`` for group findings; ``evidence`` holds
    the figures behind the finding (JSON-safe after :meth:`to_dict`); ``examples`` are image
    paths, most telling first.
    """

    id: str
    kind: str
    scope: str
    severity: float
    title: str
    class_: str | None = None
    cluster: int | None = None
    group: dict | None = None
    evidence: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise InvariantError(f"finding {self.id!r}: scope must be one of {SCOPES}, got {self.scope!r}")
        object.__setattr__(self, "severity", _check_unit(self.severity, f"finding {self.id!r}: severity"))
        if not self.id or not self.kind or not self.title:
            raise InvariantError(f"finding {self.id!r}: id, kind and title must be non-empty")

    @property
    def band(self) -> str:
        return severity_band(self.severity)

    def to_dict(self) -> dict:
        return to_jsonable({
            "id": self.id, "kind": self.kind, "scope": self.scope, "class": self.class_,
            "cluster": self.cluster, "group": self.group, "severity": round(self.severity, 4),
            "title": self.title, "evidence": self.evidence, "examples": list(self.examples),
        })

    @classmethod
    def from_dict(cls, d: dict) -> "Finding":
        return cls(id=d["id"], kind=d["kind"], scope=d["scope"], severity=d["severity"],
                   title=d["title"], class_=d.get("class"), cluster=d.get("cluster"),
                   group=d.get("group"), evidence=d.get("evidence", {}),
                   examples=d.get("examples", []))


@dataclass
class DetectorResult:
    """What a detector returns: per-image ``scores`` and ``flags`` (or None where the detector
    has none), its ``findings``, and ``skipped`` = the reason when it could not run."""

    scores: np.ndarray | None = None
    flags: np.ndarray | None = None
    findings: list = field(default_factory=list)
    skipped: str | None = None

    @classmethod
    def skip(cls, reason: str) -> "DetectorResult":
        return cls(skipped=str(reason))


# ----------------------------------------------------------------------------------------------
# Context
# ----------------------------------------------------------------------------------------------


@dataclass
class Context:
    """Everything a detector may read, passed explicitly.

    Parameters
    ----------
    table : DataFrame, one row per image
        The scan table (``Scan.table``), ideally with ``cluster`` filled by the analysis.
    heatmaps, heatmaps_true : array of shape (N, h, w), optional
        CAMs of the predicted and of the labelled class.
    analysis : dict
        :func:`biasscope.analysis.analyse`'s analysis dict ({} when not run).
    classes : list of str
        The dataset's classes in order (``scan.meta["classes"]``); default: the names in the
        table's label and pred columns, by output index.
    class_index : dict
        Class name -> model output index (``scan.meta["class_index"]``); default: the position
        in ``classes``, overridden by the table's (label, label_idx) and (pred, pred_idx) pairs.
    attributes : list of str, optional
        Attribute columns; default: every non-core column of the table.
    options : dict
        Overrides of :data:`DEFAULT_OPTIONS`; unknown names raise BiasscopeError.
    counterfactuals : dict, optional
        The background tests of :func:`biasscope.counterfactuals.run_counterfactuals`:
        ``{"classes": {class: {figures}}, "per_image": {...}}`` or ``{"skipped": reason}``; read
        by ``background_reliance`` and, as backing evidence, ``spurious_background``.
    object_embedding : array of shape (N, C), optional
        Per image, the model's embedding of the object alone (the target layer's mean
        activation on the Only-FG image of the counterfactual pass); NaN rows for images
        without one. Read by ``label_issue``.
    occlusion : dict, optional
        Occlusion tests of heatmap clusters' hot spots (:func:`biasscope.api` runs them with
        the model): ``{"clusters": {cluster id: figures}}``; read by ``clever_hans_cluster``
        and ``label_issue``.
    """

    table: pd.DataFrame
    heatmaps: np.ndarray | None = None
    heatmaps_true: np.ndarray | None = None
    analysis: dict = field(default_factory=dict)
    classes: list | None = None
    class_index: dict | None = None
    attributes: list | None = None
    options: dict = field(default_factory=dict)
    counterfactuals: dict | None = None
    object_embedding: np.ndarray | None = None
    occlusion: dict | None = None

    def __post_init__(self):
        if not isinstance(self.table, pd.DataFrame):
            raise BiasscopeError(f"ctx.table must be a DataFrame, got {type(self.table).__name__}")
        missing = [c for c in ("label", "pred", "correct") if c not in self.table.columns]
        if missing:
            raise BiasscopeError(f"ctx.table lacks column(s) {missing}")
        for name in ("heatmaps", "heatmaps_true"):
            h = getattr(self, name)
            if h is not None and (np.ndim(h) != 3 or np.shape(h)[0] != self.n):
                raise BiasscopeError(f"ctx.{name} must have shape (N={self.n}, h, w), got {np.shape(h)}")
        e = self.object_embedding
        if e is not None and (np.ndim(e) != 2 or np.shape(e)[0] != self.n):
            raise BiasscopeError(f"ctx.object_embedding must have shape (N={self.n}, C), got {np.shape(e)}")
        unknown = sorted(set(self.options) - set(DEFAULT_OPTIONS))
        if unknown:
            raise BiasscopeError(f"unknown detector option(s) {unknown}; known: {sorted(DEFAULT_OPTIONS)}")
        self.options = {**DEFAULT_OPTIONS, **self.options}
        if self.class_index is None:
            # Given classes are numbered by position (the Keras convention); the table's own
            # (name, index) pairs, where present, are the truth.
            self.class_index = {**{str(c): i for i, c in enumerate(self.classes or [])},
                                **self._index_from_table()}
        if self.classes is None:
            # Dataset classes by output index; "#i" names are model outputs outside the dataset.
            named = {c: i for c, i in self.class_index.items() if not c.startswith("#")}
            self.classes = sorted(named, key=lambda c: (named[c], c))
        self.classes = [str(c) for c in self.classes]
        if any(c not in self.class_index for c in self.classes):
            n0 = len(self.class_index)
            for j, c in enumerate(c for c in self.classes if c not in self.class_index):
                self.class_index[c] = n0 + j  # unknown outputs: never matched by top5
        if self.attributes is None:
            self.attributes = list(self.analysis.get("attributes", infer_attributes(self.table)))
        self.analysis = self.analysis or {}

    @classmethod
    def from_scan(cls, scan, analysis: dict | None = None, *, options=None, counterfactuals=None):
        """A context for a :class:`biasscope.store.Scan` (its stored analysis unless given)."""
        meta = scan.meta or {}
        return cls(table=scan.table, heatmaps=scan.heatmaps, heatmaps_true=scan.heatmaps_true,
                   analysis=analysis if analysis is not None else (scan.analysis or {}),
                   classes=meta.get("classes"), class_index=meta.get("class_index"),
                   attributes=meta.get("attributes"), options=dict(options or {}),
                   counterfactuals=counterfactuals)

    def _index_from_table(self) -> dict:
        """Class name -> model output index from the table's (label, label_idx) and
        (pred, pred_idx) pairs; sorted names numbered 0.. when those columns are absent."""
        t = self.table
        pairs = {}
        for name, idx in (("label", "label_idx"), ("pred", "pred_idx")):
            if idx in t.columns:
                pairs.update(zip(t[name].astype(str), t[idx].astype(int)))
        if pairs:
            return dict(sorted(pairs.items(), key=lambda kv: kv[1]))
        names = sorted(set(t["label"].astype(str)) | set(t["pred"].astype(str)))
        return {c: i for i, c in enumerate(names)}

    @property
    def n(self) -> int:
        return len(self.table)

    @functools.cached_property
    def attractors(self) -> dict | None:
        """:func:`biasscope.attractors.find_attractors` of the counterfactual pass with the
        ``spurious_feature`` rule (None without one), computed once per context."""
        from biasscope.attractors import find_attractors

        from .spurious_feature import passes

        cf = self.counterfactuals
        if not cf or cf.get("skipped"):
            return None
        attrs = {}
        if "index" in self.table.columns:
            idx = self.table["index"].to_numpy(np.int64)
            for a in self.attributes or []:
                if a in self.table.columns:
                    attrs[a] = dict(zip(idx.tolist(), self.table[a].astype(str).tolist()))
        names = {c: int(self.class_index[c]) for c in self.classes}
        return find_attractors(cf, names, lambda f: passes(f, self.options), attributes=attrs,
                               seed=int(cf.get("seed", 0)),
                               n_boot=int(cf.get("n_boot", 1000)) or 1000,
                               max_examples=int(self.options["max_examples"]))

    def row_of_index(self) -> dict:
        """Dataset index (the table's ``index`` column) -> table row position."""
        if "index" not in self.table.columns:
            return {i: i for i in range(self.n)}
        return {int(v): i for i, v in enumerate(self.table["index"].to_numpy(np.int64))}

    def col(self, name: str) -> np.ndarray:
        """A numeric column as float64 (NaN for missing values, all NaN if absent)."""
        if name not in self.table.columns:
            return np.full(self.n, np.nan)
        return pd.to_numeric(self.table[name], errors="coerce").to_numpy(np.float64, na_value=np.nan)

    def strings(self, name: str) -> np.ndarray:
        return self.table[name].astype(str).to_numpy()

    @property
    def correct(self) -> np.ndarray:
        return self.table["correct"].to_numpy(dtype=bool)

    @functools.cached_property
    def paths(self) -> np.ndarray:
        if "path" in self.table.columns:
            return self.table["path"].astype(str).to_numpy()
        return np.array([f"#{i}" for i in range(self.n)], dtype=object)

    def examples(self, rows, order=None) -> list[str]:
        """Paths of ``rows`` (positions), sorted by ``order`` descending when given."""
        rows = np.asarray(rows, dtype=np.int64)
        if order is not None and len(rows):
            rows = rows[np.argsort(-np.asarray(order, dtype=np.float64), kind="stable")]
        return [str(p) for p in self.paths[rows[: int(self.options["max_examples"])]]]


# ----------------------------------------------------------------------------------------------
# Detector base and registry
# ----------------------------------------------------------------------------------------------


class Detector:
    """Base class: set ``name``, ``kind``, ``scope`` and ``description``; implement :meth:`run`.

    ``scope`` is what the detector judges (for image detectors: images, reported grouped per
    class). Call :meth:`evaluate` (not :meth:`run`) to get a checked result.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    scope: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: The detector's evidence is the heatmap itself: it skips when every CAM is zero.
    needs_heatmaps: ClassVar[bool] = False

    def run(self, ctx: Context) -> DetectorResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def finding(self, *, severity: float, title: str, class_=None, cluster=None, group=None,
                evidence=None, examples=None, scope=None, key=None) -> Finding:
        """A finding of this detector's kind with a stable id built from what it is about.

        ``severity`` is checked, not clipped: a value outside [0, 1] raises InvariantError.
        ``key`` is an extra id part for detectors with several findings about one thing.
        """
        parts = [self.kind]
        if class_ is not None:
            parts.append(f"class={class_}")
        if cluster is not None:
            parts.append(f"cluster={int(cluster)}")
        if group is not None:
            parts.append(f"{group['attribute']}={group['value']}")
        if key is not None:
            parts.append(str(key))
        return Finding(id="/".join(parts), kind=self.kind, scope=scope or self.scope,
                       severity=severity,
                       title=title, class_=class_, cluster=None if cluster is None else int(cluster),
                       group=group, evidence=evidence or {}, examples=list(examples or []))

    def evaluate(self, ctx: Context) -> DetectorResult:
        """Run the detector and check the contract; raises :class:`InvariantError` if broken."""
        if self.needs_heatmaps and ctx.options.get("zero_heatmaps"):
            return DetectorResult.skip(str(ctx.options["zero_heatmaps"]))
        res = self.run(ctx)
        who = f"detector {self.name!r}"
        if not isinstance(res, DetectorResult):
            raise InvariantError(f"{who} returned {type(res).__name__}, not a DetectorResult")
        if res.skipped is not None:
            if res.findings or res.scores is not None or res.flags is not None:
                raise InvariantError(f"{who} was skipped but returned results")
            return res
        if res.scores is not None:
            s = np.asarray(res.scores, dtype=np.float64)
            if s.shape != (ctx.n,):
                raise InvariantError(f"{who}: scores must have shape ({ctx.n},), got {s.shape}")
            bad = np.isfinite(s) & ((s < 0) | (s > 1)) | np.isinf(s)
            if bad.any():
                raise InvariantError(f"{who}: scores must be in [0, 1] or NaN; e.g. {s[bad][0]!r}")
            res.scores = s
        if res.flags is not None:
            f = np.asarray(res.flags)
            if f.shape != (ctx.n,) or f.dtype != bool:
                raise InvariantError(f"{who}: flags must be bool of shape ({ctx.n},), got "
                                     f"{f.dtype} {f.shape}")
            res.flags = f
        for fd in res.findings:
            if not isinstance(fd, Finding):
                raise InvariantError(f"{who} returned a {type(fd).__name__} as a finding")
            if fd.kind != self.kind:
                raise InvariantError(f"{who} returned a finding of kind {fd.kind!r}")
            _check_unit(fd.severity, f"{who}: finding {fd.id!r} severity")
        ids = [fd.id for fd in res.findings]
        if len(set(ids)) != len(ids):
            raise InvariantError(f"{who} returned duplicate finding ids")
        return res


#: name -> detector class, in registration order (which is the order detectors run in).
REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator: validate a detector class and add it to :data:`REGISTRY`."""
    if not (isinstance(cls, type) and issubclass(cls, Detector)) or cls is Detector:
        raise TypeError(f"@register takes a Detector subclass, got {cls!r}")
    for attr in ("name", "kind"):
        value = getattr(cls, attr)
        if not isinstance(value, str) or not _NAME.match(value):
            raise TypeError(f"{cls.__name__}.{attr} must be a snake_case name, got {value!r}")
    if cls.scope not in SCOPES:
        raise TypeError(f"{cls.__name__}.scope must be one of {SCOPES}, got {cls.scope!r}")
    if cls.run is Detector.run:
        raise TypeError(f"{cls.__name__} must implement run(ctx)")
    if cls.evaluate is not Detector.evaluate:
        raise TypeError(f"{cls.__name__} must not override evaluate(): it enforces the contract")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise TypeError(f"a detector named {cls.name!r} is already registered "
                        f"({REGISTRY[cls.name].__qualname__})")
    REGISTRY[cls.name] = cls
    return cls


def _resolve(names) -> list[str]:
    if names is None:
        return list(REGISTRY)
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise BiasscopeError(f"unknown detector(s) {unknown}; known: {list(REGISTRY)}")
    return list(dict.fromkeys(names))


def run_detector(ctx: Context, name: str) -> DetectorResult:
    """Run one registered detector (checked); its per-image ``scores`` are in the result."""
    return REGISTRY[_resolve([name])[0]]().evaluate(ctx)


def run_detectors(ctx: Context, names=None):
    """Run detectors (all registered ones by default, in registration order).

    Returns
    -------
    findings : list of Finding
        Ranked by severity (highest first); ties by kind and id, so the order is stable.
    status : dict
        Per detector: ``{"status": "ok" | "skipped", "reason", "n_findings", "n_flagged"}``.
    flags : list of list of str, length N
        Per image, the kinds of the detectors that flagged it.
    """
    findings: list[Finding] = []
    status: dict[str, dict] = {}
    per_image: list[list[str]] = [[] for _ in range(ctx.n)]
    for name in _resolve(names):
        det = REGISTRY[name]()
        res = det.evaluate(ctx)
        if res.skipped is not None:
            status[name] = {"status": "skipped", "reason": res.skipped, "n_findings": 0,
                            "n_flagged": None}
            continue
        findings.extend(res.findings)
        n_flagged = None
        if res.flags is not None:
            for i in np.flatnonzero(res.flags):
                per_image[i].append(det.kind)
            n_flagged = int(res.flags.sum())
        status[name] = {"status": "ok", "reason": None, "n_findings": len(res.findings),
                        "n_flagged": n_flagged}
    ids = [f.id for f in findings]
    if len(set(ids)) != len(ids):
        raise InvariantError("two detectors returned findings with the same id")
    findings.sort(key=lambda f: (-f.severity, f.kind, f.id))
    if names is None:  # the whole registry ran: one finding per (class, cause), roots first
        from .rootcause import consolidate

        findings = consolidate(ctx, findings)
    return findings, status, per_image


def detect(ctx_args: dict, maps: dict) -> tuple:
    """Every registered detector (:func:`run_detectors`) on ``Context(**ctx_args)`` with the
    CAMs of ``maps``: ``{"heatmaps" | "heatmaps_true": (stored maps, peaks) or None}``, the
    maps as stored (unit peak, shape (N, h, w)) and each map's peak (``cam_max`` /
    ``cam_true_max``), multiplied back to their own scale here. Returns ``(findings, status,
    flags, attractors)``: :func:`run_detectors`' three and the context's
    :attr:`Context.attractors`. What the scan runs, in its own process or in the console
    script's helper process (:mod:`biasscope.helper`)."""
    raw = {name: None if got is None or got[0] is None else
           np.asarray(got[0], np.float32) * np.asarray(got[1], np.float32)[:, None, None]
           for name, got in maps.items()}
    ctx = Context(**ctx_args, **raw)
    findings, status, flags = run_detectors(ctx)
    return findings, status, flags, ctx.attractors
