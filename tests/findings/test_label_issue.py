"""label_issue: confident learning with per-class self-confidence thresholds."""

import numpy as np

from biasscope.findings import Context, run_detector
from biasscope.findings.label_issue import class_probabilities, confident_learning


def test_confident_learning_rule_on_a_hand_matrix():
    P = np.array([[0.9, 0.1, 0.0],     # labelled 0, confidently 0
                  [0.7, 0.3, 0.0],     # labelled 0; t_0 = 0.8: no class passes
                  [0.2, 0.8, 0.0],     # labelled 1, confidently 1
                  [0.85, 0.15, 0.0],   # labelled 1; t_1 = 0.475: only class 0 passes -> issue
                  [0.5, 0.1, 0.4],     # labelled 2; t_2 = 0.4: only class 2 passes
                  [0.1, 0.5, 0.4]])    # labelled 2: 1 and 2 pass, the larger (1) wins -> issue
    labels = np.array([0, 0, 1, 1, 2, 2])
    issue, suggested, t = confident_learning(P, labels)
    np.testing.assert_allclose(t, [0.8, 0.475, 0.4])
    assert issue.tolist() == [False, False, False, True, False, True]
    assert suggested.tolist() == [0, -1, 1, 0, 2, 1]
    # Argmax among the classes that pass, not over all classes.
    issue, suggested, _ = confident_learning(np.array([[0.5, 0.45, 0.05], [0.9, 0.1, 0.0],
                                                       [0.0, 0.4, 0.6], [0.0, 0.0, 1.0]]),
                                             np.array([2, 0, 1, 2]))
    assert suggested[0] == 1 and issue[0]  # class 0 (0.5 < t_0 = 0.9) does not pass


def test_missing_mass_is_spread_over_classes_outside_the_top5(make_table):
    classes = [f"k{i}" for i in range(8)]
    probs = np.array([[0.5, 0.2, 0.1, 0.05, 0.05, 0.02, 0.04, 0.04]])
    t = make_table(classes, np.array([5]), probs=probs)  # label k5 (0.02) is not in the top 5
    ctx = Context(table=t, classes=classes)
    P = class_probabilities(ctx)
    # Known: top5 (sum 0.9) and the label's exact 0.02; k6, k7 share the remaining 0.08.
    np.testing.assert_allclose(P[0], [0.5, 0.2, 0.1, 0.05, 0.05, 0.02, 0.04, 0.04], atol=1e-6)
    # With <= 5 classes the top 5 is the whole vector.
    probs3 = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    ctx3 = Context(table=make_table(["a", "b", "c"], np.array([0, 2]), probs=probs3),
                   classes=["a", "b", "c"])
    np.testing.assert_allclose(class_probabilities(ctx3), probs3, atol=1e-6)


def test_class_index_maps_model_outputs_to_dataset_classes(make_table):
    # A model with more outputs than classes: dataset classes are outputs 3 and 7.
    t = make_table(["x", "y"], np.array([0, 1]), probs=np.array([[0.9, 0.1], [0.2, 0.8]]))
    t["top5"] = [np.array([3, 7]), np.array([7, 3])]
    ctx = Context(table=t, classes=["x", "y"], class_index={"x": 3, "y": 7})
    np.testing.assert_allclose(class_probabilities(ctx), [[0.9, 0.1], [0.2, 0.8]], atol=1e-6)


def _flipped_scan(make_table, seed=0, n=600, K=4, flip=0.08):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, K, n)
    probs = rng.dirichlet(np.full(K, 0.3), n) * 0.15
    probs[np.arange(n), true] += 0.85  # the model is right and sure about the true class
    hard = rng.random(n) < 0.05       # genuine model mistakes, with low confidence
    probs[hard] = rng.dirichlet(np.full(K, 3.0), hard.sum())
    flipped = (rng.random(n) < flip) & ~hard
    label = true.copy()
    label[flipped] = (true[flipped] + rng.integers(1, K, flipped.sum())) % K
    probs /= probs.sum(axis=1, keepdims=True)
    t = make_table([f"c{i}" for i in range(K)], label, probs=probs)
    return t, flipped, true


def test_recovers_flipped_labels_with_precision_and_recall(make_table):
    t, flipped, true = _flipped_scan(make_table)
    hw = 7
    heat = np.ones((len(t), hw, hw), np.float32)
    heat_true = heat.copy()
    heat_true[flipped] = 0.05  # little evidence for the (wrong) labelled class
    res = run_detector(Context(table=t, heatmaps=heat, heatmaps_true=heat_true), "label_issue")
    found = res.flags
    tp = (found & flipped).sum()
    precision, recall = tp / found.sum(), tp / flipped.sum()
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    # Suggested class = the true class.
    for f in res.findings:
        assert f.evidence["suggested"] != f.evidence["given"]
        for img in f.evidence["images"]:
            i = int(np.flatnonzero(t["path"].to_numpy() == img["path"])[0])
            assert f.evidence["suggested"] == f"c{true[i]}" or not flipped[i]
    # Attention evidence: the labelled class's CAM is weak for the flipped images.
    assert sum(f.evidence["n_label_cam_weak"] for f in res.findings) >= 0.9 * tp
    # Score = 1 - self-confidence: higher for flipped images.
    assert res.scores[flipped].mean() > 0.7 > res.scores[~flipped].mean()
    np.testing.assert_allclose(res.scores, 1 - t["label_prob"].to_numpy())


def test_agreeing_prediction_is_never_an_issue(make_table):
    t, flipped, _ = _flipped_scan(make_table, seed=1)
    res = run_detector(Context(table=t), "label_issue")
    assert not (res.flags & t["correct"].to_numpy()).any()
    # Row 0: labelled a and predicted a (0.45), below t_a = 0.9; b passes t_b = 0.4. Confident
    # learning alone would call it an issue; as in cleanlab, agreement with the label wins.
    probs = np.array([[0.45, 0.40, 0.15]] + [[0.95, 0.05, 0.0]] * 5 + [[0.0, 0.4, 0.6]] * 3
                     + [[0.1, 0.0, 0.9]] * 3)
    t = make_table(["a", "b", "c"], np.array([0] * 6 + [1] * 3 + [2] * 3), probs=probs)
    p_a = probs[:6, 0].mean()
    assert p_a > 0.45 and probs[0, 1] >= 0.4
    assert not run_detector(Context(table=t), "label_issue").flags[0]


def test_severity_and_grouping(make_table):
    t, flipped, _ = _flipped_scan(make_table, seed=2)
    res = run_detector(Context(table=t), "label_issue")
    ids = [f.id for f in res.findings]
    assert len(ids) == len(set(ids))
    assert sum(f.evidence["n"] for f in res.findings) == res.flags.sum()
    for f in res.findings:
        assert 0 <= f.severity <= 1
        assert f.evidence["mean_p_suggested"] > f.evidence["mean_p_given"]


def test_skipped_without_label_prob_or_with_one_class(make_table):
    t = make_table(["a", "b"], np.array([0, 1, 0]))
    res = run_detector(Context(table=t.drop(columns=["label_prob"])), "label_issue")
    assert res.skipped and "label_prob" in res.skipped
    one = make_table(["a"], np.zeros(5, int))
    assert "single class" in run_detector(Context(table=one), "label_issue").skipped


def test_attention_gate_sets_aside_labels_seen_on_the_object(make_table):
    t, flipped, _ = _flipped_scan(make_table, seed=3)
    base = run_detector(Context(table=t), "label_issue").flags
    assert base.any()
    # The labelled class's CAM sits on the object (lift 2) for half the candidates: those are
    # model mistakes, not label errors; the rest have none of it there (lift 0.3) or none at all.
    cand = np.flatnonzero(base)
    seen = np.zeros(len(t), bool)
    seen[cand[::2]] = True
    t["mask_frac"] = 0.2
    t["lift_true"] = np.where(seen, 2.0, 0.3)
    t.loc[cand[1], "lift_true"] = np.nan  # an all-zero labelled-class CAM: no evidence at all
    gated = run_detector(Context(table=t), "label_issue")
    np.testing.assert_array_equal(gated.flags, base & ~seen)
    # each finding counts the images it set aside (pairs set aside entirely have no finding)
    set_aside = sum(f.evidence["n_set_aside_label_seen_on_object"] for f in gated.findings)
    assert 0 < set_aside <= seen.sum()
    # images without a mask are not gated
    t["mask_frac"] = np.nan
    np.testing.assert_array_equal(run_detector(Context(table=t), "label_issue").flags, base)
