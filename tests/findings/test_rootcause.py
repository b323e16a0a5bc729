"""Root cause first (biasscope.findings.rootcause.consolidate): merging and explaining.

Hand-made findings on a context whose counterfactual pass has a planted attractor, class
'zero' (tests/shortcut_data.py): featured backgrounds of classes 'one' and 'two' are read as
'zero' and pull pasted objects there; some of the featured images are predicted 'zero'
(the victims).
"""

import copy

import numpy as np
import pytest
from shortcut_data import CLASSES, S, cf_of, reference_flips, shortcut_per_image

from biasscope.findings import Context, Finding
from biasscope.findings.rootcause import consolidate, explained_images


def F(kind, cls, severity, *, cluster=None, group=None, **evidence):
    parts = [kind, f"class={cls}"] + ([f"cluster={cluster}"] if cluster is not None else []) \
        + ([f"{group['attribute']}={group['value']}"] if group else [])
    scope = "cluster" if cluster is not None else "group" if group else "class"
    return Finding(id="/".join(parts), kind=kind, scope=scope, severity=severity,
                   title=f"{kind} of {cls}", class_=cls, cluster=cluster, group=group,
                   evidence={"marker": kind, **evidence}, examples=[f"{kind}/{cls}.png"])


N_UNEXPLAINED = 7  # class-'one' mistakes the attractor does not explain


@pytest.fixture(scope="module")
def world():
    """(per_image, truth, unexplained rows): the planted pass plus N_UNEXPLAINED class-'one'
    images predicted 'three' on their own (non-featured) background."""
    pi, truth = shortcut_per_image(pull=0.8)
    pi = copy.deepcopy(pi)
    lab = np.asarray(pi["label_idx"])
    orig = np.asarray(pi["orig_pred"])
    plain_one = np.flatnonzero((lab == 1) & ~truth["featured"])[:N_UNEXPLAINED]
    orig[plain_one] = 3
    pi["orig_pred"] = orig.tolist()
    return pi, truth, plain_one


@pytest.fixture
def ctx(make_table, world):
    def build(**kw):
        pi, truth, unexplained = world
        conf = np.full(len(pi["index"]), 0.8)
        conf[unexplained] = 0.95  # the unexplained mistakes are the confident ones
        t = make_table(CLASSES, np.asarray(pi["label_idx"]), np.asarray(pi["orig_pred"]),
                       confidence=conf, background=truth["background"])
        t["index"], t["path"] = pi["index"], pi["path"]
        return Context(table=t, counterfactuals=cf_of(pi), **kw)
    return build


def _ranked(out):
    assert [f.severity for f in out] == sorted((f.severity for f in out), reverse=True)
    ids = [f.id for f in out]
    assert len(ids) == len(set(ids))
    return {f.id: f for f in out}


def test_an_attractor_absorbs_its_own_background_and_cluster_findings(ctx):
    sf = F("spurious_feature", "zero", 0.6, victims={"one": {}})
    sb = F("spurious_background", "zero", 0.7, drop=0.3)
    br = F("background_reliance", "zero", 0.5, bg_gap=0.2)
    ch = F("clever_hans_cluster", "zero", 0.8, cluster=3, reasons=["fixed_location"])
    other = F("clever_hans_cluster", "three", 0.3, cluster=9, reasons=["off_object"])
    out = _ranked(consolidate(ctx(), [sb, br, ch, sf, other]))
    assert list(out) == [sf.id, other.id]  # one finding per (class, cause)
    m = out[sf.id]
    assert m.severity == 0.8  # the largest of the merged
    assert m.evidence["attention"] == {"title": sb.title, "severity": 0.7, **sb.evidence}
    assert m.evidence["background_tests"] == {"title": br.title, "severity": 0.5, **br.evidence}
    assert m.evidence["clusters"] == [{"id": ch.id, "title": ch.title, "severity": 0.8, **ch.evidence}]
    assert sorted(m.evidence["merged"]) == sorted([sb.id, br.id, ch.id])
    assert m.evidence["victims"] == {"one": {}} and m.evidence["marker"] == "spurious_feature"
    assert m.examples == sf.examples and m.kind == "spurious_feature" and m.class_ == "zero"
    assert out[other.id] == other  # another class's cluster is left as it is
    # the merged severity is the largest of the parts, also when the attractor's is largest
    out = consolidate(ctx(), [F("spurious_feature", "zero", 0.9), sb])
    assert [(f.id, f.severity) for f in out] == [("spurious_feature/class=zero", 0.9)]


def test_without_an_attractor_background_reliance_merges_into_spurious_background(ctx):
    sb = F("spurious_background", "one", 0.4, drop=0.2)
    br = F("background_reliance", "one", 0.6, bg_gap=0.3)
    br2 = F("background_reliance", "two", 0.3)  # no spurious_background to merge into
    ch = F("clever_hans_cluster", "one", 0.5, cluster=1, reasons=["fixed_location"])
    out = _ranked(consolidate(ctx(), [sb, br, br2, ch]))
    assert set(out) == {sb.id, br2.id, ch.id}
    m = out[sb.id]
    assert m.severity == 0.6
    assert m.evidence["background_tests"] == {"title": br.title, "severity": 0.6, **br.evidence}
    assert m.evidence["merged"] == [br.id] and "attention" not in m.evidence
    assert out[br2.id] == br2 and out[ch.id] == ch  # nothing explains them: no attractor


@pytest.mark.parametrize("root_sev", [0.7, 0.1, 0.012])
def test_a_victims_background_findings_are_explained_by_the_attractor(ctx, world, root_sev):
    pi = world[0]
    sf = F("spurious_feature", "zero", root_sev)
    br3 = F("background_reliance", "three", 0.9)
    sb1 = F("spurious_background", "one", 0.5)
    br1 = F("background_reliance", "one", 0.8)  # merges into sb1 first
    out = _ranked(consolidate(ctx(), [br3, sb1, br1, sf]))
    assert list(out)[0] == sf.id  # the root ranks first
    assert out[sf.id].severity == root_sev and "explained_by" not in out[sf.id].evidence
    flips = reference_flips(pi, {S})
    for f, cls, sev in ((out[br3.id], 3, 0.9), (out[sb1.id], 1, 0.8)):
        share = flips[cls]["n_explained"] / flips[cls]["n_flips"]
        assert share >= 0.5  # the planted shortcut explains most of the flips
        ev = f.evidence
        assert ev["explained_by"] == [sf.id]
        assert ev["explained_share"] == pytest.approx(share, abs=1e-4)
        assert ev["explained_n"] == flips[cls]["n_explained"]
        assert ev["unexplained_severity"] == pytest.approx(sev * (1 - share), abs=1e-4)
        assert f.severity == pytest.approx(max(0.01, min(sev * (1 - share), root_sev - 0.01)))
        assert f.severity < root_sev
    assert "background_tests" in out[sb1.id].evidence


def test_a_victims_mistakes_are_explained_by_images_predicted_as_the_attractor(ctx, world):
    pi, truth, unexplained = world
    lab = np.asarray(pi["label_idx"])
    n_victims = int((truth["victim"] & (lab == 1)).sum())
    sf = F("spurious_feature", "zero", 0.6)
    mis = F("misclassified", "one", 0.8)
    conf = F("confident_mistake", "one", 0.5)  # only the unexplained mistakes are confident
    grass = F("group_gap", "one", 0.4, group={"attribute": "background", "value": "grass"})
    out = _ranked(consolidate(ctx(), [mis, conf, grass, sf]))
    share = n_victims / (n_victims + N_UNEXPLAINED)
    m = out[mis.id]
    assert m.evidence["explained_by"] == [sf.id]
    assert m.evidence["explained_n"] == n_victims
    assert m.evidence["explained_share"] == pytest.approx(share, abs=1e-4)
    assert m.severity == pytest.approx(max(0.01, min(0.8 * (1 - share), 0.6 - 0.01)))
    assert out[conf.id] == conf  # its errors are not the attractor's
    g = out[grass.id]  # every mistake on grass is a victim
    assert g.evidence["explained_share"] == 1.0 and g.severity == 0.01
    assert list(out).index(mis.id) > list(out).index(sf.id)
    # the images behind it: exactly the victims
    idx = np.asarray(pi["index"])
    assert explained_images(ctx(), [sf]) == {int(i): sf.id for i in idx[truth["victim"]]}


def test_a_finding_below_the_explained_share_is_left_alone(ctx, world):
    pi, truth, _ = world
    n_victims = int((truth["victim"] & (np.asarray(pi["label_idx"]) == 1)).sum())
    share = n_victims / (n_victims + N_UNEXPLAINED)
    sf = F("spurious_feature", "zero", 0.6)
    mis = F("misclassified", "one", 0.8)
    out = {f.id: f for f in consolidate(ctx(options={"explained_min_share": share + 1e-3}), [sf, mis])}
    assert out[mis.id] == mis
    out = {f.id: f for f in consolidate(ctx(options={"explained_min_share": share}), [sf, mis])}
    assert out[mis.id].evidence["explained_by"] == [sf.id]


def test_without_counterfactuals_nothing_is_linked_to_the_attractor(make_table, world):
    pi, truth, _ = world
    t = make_table(CLASSES, np.asarray(pi["label_idx"]), np.asarray(pi["orig_pred"]))
    t["index"] = pi["index"]
    sf = F("spurious_feature", "zero", 0.6)
    mis, br = F("misclassified", "one", 0.8), F("background_reliance", "three", 0.9)
    out = consolidate(Context(table=t), [sf, mis, br])
    assert [f.id for f in out] == [br.id, mis.id, sf.id]
    assert all("explained_by" not in f.evidence for f in out)


def test_occlusion_of_a_clever_hans_cluster_explains_mistakes(make_table):
    # class b: 10 images predicted a; hiding cluster 5's spot changes 8 of them
    label = np.array([0] * 20 + [1] * 20)
    pred = label.copy()
    pred[20:30] = 0
    t = make_table(["a", "b"], label, pred)
    t["index"] = 500 + np.arange(40)
    occ = {"clusters": {"5": {"index": (500 + np.r_[0:5, 20:30]).tolist(),
                              "changed": [False] * 5 + [True] * 8 + [False] * 2}}}
    ch = F("clever_hans_cluster", "a", 0.7, cluster=5, reasons=["occlusion", "fixed_location"])
    mis = F("misclassified", "b", 0.9)
    out = _ranked(consolidate(Context(table=t, occlusion=occ), [mis, ch]))
    m = out[mis.id]
    assert m.evidence["explained_by"] == [ch.id] and m.evidence["explained_share"] == 0.8
    assert m.severity == pytest.approx(min(0.9 * 0.2, 0.7 - 0.01))
    assert list(out) == [ch.id, mis.id]
    # attention alone (no occlusion reason) is no evidence that the spot caused the mistakes
    ch2 = F("clever_hans_cluster", "a", 0.7, cluster=5, reasons=["fixed_location"])
    out = {f.id: f for f in consolidate(Context(table=t, occlusion=occ), [mis, ch2])}
    assert out[mis.id] == mis


def test_everything_together_is_ranked_with_unique_ids(ctx):
    fs = [F("spurious_feature", "zero", 0.6), F("spurious_background", "zero", 0.7),
          F("background_reliance", "zero", 0.5), F("clever_hans_cluster", "zero", 0.2, cluster=0),
          F("background_reliance", "three", 0.95), F("misclassified", "one", 0.8),
          F("misclassified", "two", 0.3), F("confident_mistake", "one", 0.5),
          F("spurious_background", "one", 0.4), F("background_reliance", "one", 0.45),
          F("group_gap", "two", 0.1, group={"attribute": "background", "value": "sand"})]
    out = _ranked(consolidate(ctx(), fs))
    assert out[next(iter(out))].kind == "spurious_feature"
    assert not [f for f in out.values() if f.class_ == "zero" and f.kind != "spurious_feature"]
    # zero's three background/cluster findings are absorbed, one's reliance merges into its
    # spurious_background
    assert len(out) == len(fs) - 4
    assert out["spurious_feature/class=zero"].severity == 0.7
