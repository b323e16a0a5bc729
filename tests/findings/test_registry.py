"""The detector contract, the registry and the runner; properties every detector must have."""

import json

import numpy as np
import pytest

from biasscope.analysis import analyse, fill_columns
from biasscope.errors import BiasscopeError
from biasscope.findings import (REGISTRY, Context, Detector, DetectorResult, Finding, InvariantError,
                                register, run_detectors)


# --- Finding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sev", [-0.01, 1.01, float("nan"), float("inf"), "high"])
def test_finding_severity_outside_unit_interval_raises(sev):
    with pytest.raises(InvariantError, match="severity"):
        Finding(id="x", kind="k", scope="class", severity=sev, title="t")


def test_finding_scope_is_checked_and_to_dict_round_trips():
    with pytest.raises(InvariantError, match="scope"):
        Finding(id="x", kind="k", scope="dataset", severity=0.5, title="t")
    f = Finding(id="k/class=a", kind="k", scope="class", severity=np.float32(0.5), title="t",
                class_="a", evidence={"n": np.int64(3), "m": np.nan, "v": np.arange(2)},
                examples=["a/1.png"])
    d = f.to_dict()
    assert d["class"] == "a" and d["evidence"] == {"n": 3, "m": None, "v": [0, 1]}
    json.dumps(d, allow_nan=False)
    assert Finding.from_dict(d).to_dict() == d


# --- registry ---------------------------------------------------------------------------------


def _cls(**attrs):
    body = {"name": "probe", "kind": "probe", "scope": "image",
            "run": lambda self, ctx: DetectorResult()}
    body.update(attrs)
    return type("Probe", (Detector,), body)


@pytest.mark.parametrize("attrs, match", [
    ({"scope": "dataset"}, "scope"),
    ({"name": "Bad Name"}, "snake_case"),
    ({"kind": ""}, "snake_case"),
    ({"run": Detector.run}, "implement run"),
    ({"evaluate": lambda self, ctx: None}, "must not override evaluate"),
    ({"name": "misclassified"}, "already registered"),
])
def test_register_validates_the_class(attrs, match):
    before = dict(REGISTRY)
    with pytest.raises(TypeError, match=match):
        register(_cls(**attrs))
    assert REGISTRY == before
    with pytest.raises(TypeError):
        register(object)


def test_registry_holds_the_documented_kinds():
    assert list(REGISTRY) == ["misclassified", "confident_mistake", "label_issue",
                              "off_object_attention", "background_reliance", "spurious_background",
                              "spurious_feature", "clever_hans_cluster", "group_gap"]
    for name, cls in REGISTRY.items():
        assert cls.name == name and cls.description


# --- evaluate() enforces the contract -----------------------------------------------------------


@pytest.fixture
def small_ctx(make_table):
    return Context(table=make_table(["a", "b"], np.array([0, 1, 0, 1])))


@pytest.mark.parametrize("result, match", [
    (DetectorResult(flags=np.zeros(3, bool)), "flags"),
    (DetectorResult(flags=np.zeros(4, int)), "flags"),
    (DetectorResult(scores=np.full(4, 1.5)), "scores"),
    (DetectorResult(scores=np.full(5, 0.5)), "scores"),
    (DetectorResult(findings=[Finding(id="x", kind="other", scope="class", severity=0.1, title="t")]), "kind"),
    (DetectorResult(findings=[Finding(id="x", kind="probe", scope="class", severity=0.1, title="t")] * 2), "duplicate"),
    (DetectorResult(skipped="why", findings=[Finding(id="x", kind="probe", scope="class", severity=0.1, title="t")]), "skipped"),
    ("not a result", "DetectorResult"),
])
def test_evaluate_rejects_broken_results(small_ctx, result, match):
    det = _cls(run=lambda self, ctx: result)()
    with pytest.raises(InvariantError, match=match):
        det.evaluate(small_ctx)


def test_finding_helper_checks_instead_of_clipping(small_ctx):
    det = _cls(run=lambda self, ctx: DetectorResult(findings=[self.finding(severity=1.2, title="t")]))()
    with pytest.raises(InvariantError, match=r"\[0, 1\]"):
        det.evaluate(small_ctx)


def test_nan_scores_are_allowed(small_ctx):
    det = _cls(run=lambda self, ctx: DetectorResult(scores=np.array([0.1, np.nan, 1.0, 0.0])))()
    assert np.isnan(det.evaluate(small_ctx).scores[1])


# --- run_detectors ------------------------------------------------------------------------------


def test_run_detectors_ranks_records_skips_and_does_not_swallow(monkeypatch, small_ctx):
    def boom(self, ctx):
        raise ZeroDivisionError("bug")

    monkeypatch.setitem(REGISTRY, "boom", _cls(name="boom", kind="boom", run=boom))
    with pytest.raises(ZeroDivisionError):
        run_detectors(small_ctx, ["misclassified", "boom"])
    with pytest.raises(BiasscopeError, match="unknown detector"):
        run_detectors(small_ctx, ["nope"])

    findings = [Finding(id=f"rank/{i}", kind="rank", scope="class", severity=s, title="t")
                for i, s in enumerate([0.2, 0.9, 0.5])]
    monkeypatch.setitem(REGISTRY, "rank", _cls(
        name="rank", kind="rank",
        run=lambda self, ctx: DetectorResult(findings=findings, flags=np.array([True, False, True, False]))))
    monkeypatch.setitem(REGISTRY, "skipper", _cls(
        name="skipper", kind="skipper", run=lambda self, ctx: DetectorResult.skip("no masks")))
    out, status, flags = run_detectors(small_ctx, ["rank", "skipper"])
    assert [f.severity for f in out] == [0.9, 0.5, 0.2]
    assert status["skipper"] == {"status": "skipped", "reason": "no masks", "n_findings": 0, "n_flagged": None}
    assert status["rank"]["n_flagged"] == 2 and status["rank"]["status"] == "ok"
    assert flags == [["rank"], [], ["rank"], []]


def test_context_validates_options_and_shapes(make_table):
    t = make_table(["a", "b"], np.array([0, 1, 0]))
    with pytest.raises(BiasscopeError, match="unknown detector option"):
        Context(table=t, options={"confident_treshold": 0.8})
    with pytest.raises(BiasscopeError, match="heatmaps"):
        Context(table=t, heatmaps=np.zeros((2, 7, 7)))
    with pytest.raises(BiasscopeError, match="lacks"):
        Context(table=t.drop(columns=["correct"]))


# --- properties over the whole registry ------------------------------------------------------


def _rich_ctx(make_planted, seed):
    """Masks, attributes, clusters, mistakes and flipped labels: every detector has work."""
    t, heat, _ = make_planted(seed)
    rng = np.random.default_rng(seed)
    n = len(t)
    wrong = rng.random(n) < 0.2
    names = np.array(["a", "b", "c"])
    lab = np.searchsorted(names, t["label"].to_numpy())
    pred = np.where(wrong, (lab + 1) % 3, lab)
    t["pred"], t["pred_idx"], t["correct"] = names[pred], pred, pred == lab
    conf = rng.uniform(0.4, 1.0, n)
    probs = np.tile(((1 - conf) / 2)[:, None], (1, 3))
    probs[np.arange(n), pred] = conf
    order = np.argsort(-probs, axis=1, kind="stable")
    t["confidence"], t["label_prob"] = conf, probs[np.arange(n), lab]
    t["top5"] = list(order)
    t["top5_prob"] = list(np.take_along_axis(probs, order, axis=1))
    t["background"] = rng.choice(["grass", "sand"], n)
    heat[rng.random(n) < 0.05] = 0  # some all-zero CAMs
    cols, an = analyse(t, heat, projection="none", seed=seed)
    # counterfactual figures: class "a" loses accuracy on other backgrounds, "b" does not
    cf = {"classes": {
        "a": {"n": 60, "chance": 1 / 3, "orig_acc": 0.9, "mixed_rand_acc": 0.4, "bg_gap": 0.5,
              "bg_gap_ci": [0.35, 0.65], "flip_rate": 0.55, "flip_ci": [0.4, 0.7]},
        "b": {"n": 60, "chance": 1 / 3, "orig_acc": 0.9, "mixed_rand_acc": 0.88, "bg_gap": 0.02,
              "bg_gap_ci": [-0.05, 0.09], "flip_rate": 0.03, "flip_ci": [0.0, 0.08]},
    }}
    cf["per_image"] = _attracting_per_image(lab, t["background"].to_numpy(), rng)
    return Context(table=fill_columns(t, cols), heatmaps=heat, heatmaps_true=heat[::-1].copy(),
                   analysis=an, counterfactuals=cf)


def _attracting_per_image(lab, background, rng, draws=4):
    """Counterfactual predictions of a model for which grass backgrounds mean class 0."""
    n = len(lab)
    src = rng.integers(0, n, (n, draws))
    src = np.where(src == np.arange(n)[:, None], (src + 1) % n, src)
    grass = background == "grass"
    mixed = np.where(grass[src] & (rng.random((n, draws)) < 0.8), 0, lab[:, None])
    return {"index": list(range(n)), "label_idx": lab.tolist(), "orig_pred": lab.tolist(),
            "only_bg_pred": np.where(grass, 0, 2).tolist(), "only_fg_pred": lab.tolist(),
            "mixed_pred_all": mixed.tolist(), "bg_source_index_all": src.tolist(),
            "pair_tier_all": np.full((n, draws), 2).tolist(),
            "path": [f"img{i}.png" for i in range(n)]}


def _poor_ctx(make_table):
    """One class, no masks, no attributes, no analysis, all-zero CAMs."""
    t = make_table(["only"], np.zeros(6, int))
    return Context(table=t, heatmaps=np.zeros((6, 7, 7)), heatmaps_true=np.zeros((6, 7, 7)))


def _check(ctx, name):
    res = REGISTRY[name]().evaluate(ctx)
    if res.skipped is not None:
        assert isinstance(res.skipped, str) and res.skipped
        return res
    for f in res.findings:
        assert 0.0 <= f.severity <= 1.0 and f.kind == name
        json.dumps(f.to_dict(), allow_nan=False)
    if res.flags is not None:
        assert res.flags.shape == (ctx.n,) and res.flags.dtype == bool
    if res.scores is not None:
        s = res.scores[np.isfinite(res.scores)]
        assert res.scores.shape == (ctx.n,) and ((s >= 0) & (s <= 1)).all()
    return res


@pytest.mark.parametrize("name", list(REGISTRY))
@pytest.mark.parametrize("seed", [0, 1])
def test_every_detector_keeps_the_contract_and_is_deterministic(name, seed, make_planted, make_table):
    ctx = _rich_ctx(make_planted, seed)
    r1, r2 = _check(ctx, name), _check(ctx, name)
    assert [f.to_dict() for f in r1.findings] == [f.to_dict() for f in r2.findings]
    for a, b in ((r1.flags, r2.flags), (r1.scores, r2.scores)):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)
    _check(_poor_ctx(make_table), name)


def test_the_rich_context_exercises_every_detector(make_planted):
    findings, status, flags = run_detectors(_rich_ctx(make_planted, 0))
    assert all(s["status"] == "ok" for s in status.values()), status
    kinds = {f.kind for f in findings}
    assert {"misclassified", "spurious_feature", "off_object_attention"} <= kinds
    # root cause first: class a's background findings are merged into its attractor finding
    (sf,) = [f for f in findings if f.kind == "spurious_feature"]
    assert sf.class_ == "a" and "background_tests" in sf.evidence
    assert not [f for f in findings if f.class_ == "a" and f.kind in (
        "spurious_background", "background_reliance")]
    assert [f.severity for f in findings] == sorted((f.severity for f in findings), reverse=True)
    assert len(flags) == 200 and all(isinstance(k, str) for fl in flags for k in fl)


def test_poor_context_skips_with_reasons(make_table):
    _, status, flags = run_detectors(_poor_ctx(make_table))
    skipped = {k for k, s in status.items() if s["status"] == "skipped"}
    assert skipped == {"label_issue", "off_object_attention", "spurious_background",
                       "clever_hans_cluster", "group_gap", "background_reliance",
                       "spurious_feature"}
    assert all(status[k]["reason"] for k in skipped)
    assert flags == [[] for _ in range(6)]


def test_heatmap_detectors_skip_with_the_reason_when_every_cam_is_zero(make_planted):
    ctx = _rich_ctx(make_planted, 0)
    ctx.options["zero_heatmaps"] = "the heatmaps are all zero at layer L"
    findings, status, _ = run_detectors(ctx)
    heat = {n for n, cls in REGISTRY.items() if cls.needs_heatmaps}
    assert heat == {"clever_hans_cluster", "off_object_attention", "spurious_background"}
    for name in heat:
        assert status[name] == {"status": "skipped", "reason": "the heatmaps are all zero at layer L",
                                "n_findings": 0, "n_flagged": None}
    assert not [f for f in findings if f.kind in heat]
    assert status["misclassified"]["status"] == "ok"
