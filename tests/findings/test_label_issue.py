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
        assert sum(p["n"] for p in f.evidence["pairs"]) == f.evidence["n"]
        for img in f.evidence["images"]:
            i = int(np.flatnonzero(t["path"].to_numpy() == img["path"])[0])
            assert img["suggested"] == f"c{true[i]}" or not flipped[i]
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
    # one finding per labelled class
    assert len({f.class_ for f in res.findings}) == len(res.findings)
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
    # each finding counts the images of its class it set aside (classes set aside entirely
    # have no finding)
    set_aside = sum(f.evidence["n_set_aside_label_seen_on_object"] for f in gated.findings)
    assert 0 < set_aside <= seen.sum()
    # images without a mask are not gated
    t["mask_frac"] = np.nan
    np.testing.assert_array_equal(run_detector(Context(table=t), "label_issue").flags, base)


# --- the object view: kNN over object embeddings -------------------------------------------------


def _object_scan(make_table, seed=0, n_per_class=50, K=3, n_flip=9, dims=24):
    """Objects of class c embed near centre c; the model is a shortcut model, confidently
    predicting class 0 for a third of all images whatever they show; a few labels are flipped."""
    rng = np.random.default_rng(seed)
    true = np.repeat(np.arange(K), n_per_class)
    centres = rng.random((K, dims)) * 4
    emb = centres[true] + rng.normal(0, 0.3, (len(true), dims))
    flipped = np.zeros(len(true), bool)
    flipped[rng.choice(len(true), n_flip, replace=False)] = True
    label = true.copy()
    label[flipped] = (true[flipped] + rng.integers(1, K, n_flip)) % K
    probs = np.full((len(true), K), 0.05)
    probs[np.arange(len(true)), true] = 0.9
    shortcut = rng.random(len(true)) < 0.33
    probs[shortcut] = 0.05
    probs[shortcut, 0] = 0.9
    probs /= probs.sum(axis=1, keepdims=True)
    t = make_table([f"c{i}" for i in range(K)], label, probs=probs)
    return t, emb.astype(np.float32), flipped, true


def test_object_view_finds_labels_that_disagree_with_look_alike_objects(make_table):
    t, emb, flipped, true = _object_scan(make_table)
    model_view = run_detector(Context(table=t), "label_issue")
    res = run_detector(Context(table=t, object_embedding=emb), "label_issue")
    np.testing.assert_array_equal(res.flags, flipped)
    # the shortcut model's own probabilities flag correctly labelled images too
    assert (model_view.flags & ~flipped).sum() >= 5
    for f in res.findings:
        assert f.evidence["views"] == ["object"]
        for img in f.evidence["images"]:
            i = int(np.flatnonzero(t["path"].to_numpy() == img["path"])[0])
            assert img["suggested"] == f"c{true[i]}"
            assert img["view"] == "object" and img["p_suggested"] > img["p_given"]
            # the nearest look-alikes carry the suggested label
            assert img["nearest_with_suggested_label"]
            assert all(p.startswith(img["suggested"] + "/") for p in img["nearest_with_suggested_label"])
    # score = 1 - the share of neighbours with the given label
    assert res.scores[flipped].min() > res.scores[~flipped].max()


def test_object_view_is_not_cleared_by_a_model_that_agrees_with_the_wrong_label(make_table):
    t, emb, flipped, _ = _object_scan(make_table, seed=1)
    before = run_detector(Context(table=t, object_embedding=emb), "label_issue")
    # one whose look-alikes alone make it an issue (at most 1 of 20 carries its label)
    i = int(np.flatnonzero(flipped & before.flags & (before.scores >= 0.95 - 1e-9))[0])
    t.loc[i, ["pred", "pred_idx", "correct"]] = [t.loc[i, "label"], t.loc[i, "label_idx"], True]
    res = run_detector(Context(table=t, object_embedding=emb), "label_issue")
    assert res.flags[i]


def _only_fg(t, fg_pred):
    """A counterfactual result holding only the Only-FG predictions (per table row)."""
    n = len(t)
    return {"classes": {}, "seed": 0, "n_boot": 10, "per_image": {
        "index": t["index"].tolist(), "label_idx": t["label_idx"].tolist(),
        "orig_pred": t["pred_idx"].tolist(), "only_bg_pred": [-1] * n,
        "only_fg_pred": list(fg_pred), "mixed_pred_all": [[-1]] * n,
        "bg_source_index_all": [[-1]] * n, "pair_tier_all": [[0]] * n,
        "path": t["path"].tolist()}}


def test_object_view_is_cleared_when_the_object_alone_is_read_as_its_label(make_table):
    # the model reading the object on grey (Only-FG) as its label clears it; reading it as
    # another class keeps it
    t, emb, flipped, true = _object_scan(make_table)
    base = run_detector(Context(table=t, object_embedding=emb), "label_issue").flags
    rows = np.flatnonzero(base)
    assert rows.size >= 5
    fg = true.copy()
    fg[rows[:3]] = t["label_idx"].to_numpy()[rows[:3]]  # these objects alone read as their label
    res = run_detector(Context(table=t, object_embedding=emb, counterfactuals=_only_fg(t, fg)),
                       "label_issue")
    assert not res.flags[rows[:3]].any()
    np.testing.assert_array_equal(res.flags[rows[3:]], base[rows[3:]])


def test_images_without_an_embedding_get_the_model_view(make_table):
    t, emb, flipped, _ = _object_scan(make_table, seed=2)
    emb[::2] = np.nan  # every other image has no mask: no Only-FG embedding
    res = run_detector(Context(table=t, object_embedding=emb), "label_issue")
    model_only = run_detector(Context(table=t), "label_issue")
    odd = np.arange(len(t)) % 2 == 1
    np.testing.assert_array_equal(res.flags[odd], flipped[odd])
    # the even rows are judged as without embeddings (thresholds from those rows only)
    even = np.flatnonzero(~odd)
    sub = run_detector(Context(table=t.iloc[even].reset_index(drop=True)), "label_issue")
    np.testing.assert_array_equal(res.flags[even], sub.flags)
    assert res.flags[even].sum() <= model_only.flags.sum()
    views = {v for f in res.findings for v in f.evidence["views"]}
    assert "object" in views


def test_too_few_embeddings_fall_back_to_the_model_view(make_table):
    t, emb, _, _ = _object_scan(make_table, seed=3)
    rows = np.arange(0, len(t), 7)[:20]  # 20 images of every class; label_knn = 20 needs 21
    few = np.full_like(emb, np.nan)
    few[rows] = emb[rows]
    a = run_detector(Context(table=t, object_embedding=few), "label_issue")
    b = run_detector(Context(table=t), "label_issue")
    np.testing.assert_array_equal(a.flags, b.flags)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert all(f.evidence["views"] == ["model"] for f in a.findings)
    # with a smaller k the same 20 are enough: their scores are shares of 5 neighbours
    c = run_detector(Context(table=t, object_embedding=few, options={"label_knn": 5}), "label_issue")
    np.testing.assert_allclose(c.scores[rows] * 5, np.round(c.scores[rows] * 5), atol=1e-9)
    assert not np.allclose(c.scores[rows], b.scores[rows])


def test_knn_probabilities_leave_each_image_out_and_cap_k():
    from biasscope.findings.label_issue import knn_probabilities

    X = np.array([[0.0], [0.0], [1.0], [1.1], [5.0]])  # rows 0 and 1 are exact duplicates
    labels = np.array([0, 1, 1, 1, 0])
    P, nb = knn_probabilities(X, labels, 2, k=1)
    assert nb[:, 0].tolist() == [1, 0, 3, 2, 3]
    np.testing.assert_array_equal(P.argmax(axis=1), labels[nb[:, 0]])
    P, nb = knn_probabilities(X, labels, 2, k=50)  # a class smaller than k: capped at n - 1
    assert nb.shape == (5, 4) and all(i not in row for i, row in enumerate(nb))
    np.testing.assert_allclose(P.sum(axis=1), 1.0)


def test_knn_look_alikes_come_from_a_sample_above_the_reference_cap():
    from biasscope.findings.label_issue import knn_probabilities

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 150)
    X = rng.normal(size=(300, 4)) + 6.0 * labels[:, None]
    full_P, _ = knn_probabilities(X, labels, 2, k=10)
    P, nb = knn_probabilities(X, labels, 2, k=10, max_reference=100)
    ref = np.unique(nb)
    assert len(ref) <= 100 and nb.shape == (300, 10)
    assert all(i not in row for i, row in enumerate(nb))  # leave-one-out for sampled rows too
    # the same sample for every row, and the same answer as the full search on separated classes
    np.testing.assert_array_equal(P.argmax(axis=1), labels)
    np.testing.assert_array_equal(full_P.argmax(axis=1), labels)
    P2, nb2 = knn_probabilities(X, labels, 2, k=10, max_reference=100)
    np.testing.assert_array_equal(nb, nb2)


def test_embedding_is_power_normalised_and_reduced_when_wide():
    from biasscope.findings.label_issue import embed_for_knn

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 512)).astype(np.float32)
    Y = embed_for_knn(X)
    assert Y.shape == (300, 128)
    np.testing.assert_allclose(np.linalg.norm(Y, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(Y, embed_for_knn(X))  # deterministic
    small = embed_for_knn(np.array([[4.0, -9.0], [0.0, 0.0]]))
    np.testing.assert_allclose(small[0], np.array([2.0, -3.0]) / np.sqrt(13.0))
    np.testing.assert_array_equal(small[1], [0.0, 0.0])  # an all-zero embedding stays zero


def test_embedding_of_the_wrong_shape_is_refused(make_table):
    import pytest

    from biasscope.errors import BiasscopeError

    t = make_table(["a", "b"], np.array([0, 1, 0]))
    with pytest.raises(BiasscopeError, match="object_embedding"):
        Context(table=t, object_embedding=np.zeros((2, 4)))


def test_rules_agree_with_cleanlab():
    import pytest

    filt = pytest.importorskip("cleanlab.filter")
    from biasscope.findings.label_issue import prune_by_class

    rng = np.random.default_rng(0)
    for K, n in ((3, 300), (5, 600), (10, 2000)):
        true = rng.integers(0, K, n)
        P = rng.dirichlet(np.full(K, 0.5), n) * 0.5
        P[np.arange(n), true] += 0.5 * rng.random(n)
        P /= P.sum(axis=1, keepdims=True)
        labels = true.copy()
        flip = rng.random(n) < 0.08
        labels[flip] = (true[flip] + rng.integers(1, K, flip.sum())) % K
        ours = prune_by_class(P, labels)[0]
        theirs = filt.find_label_issues(labels, P, filter_by="prune_by_class")
        np.testing.assert_array_equal(ours, theirs)
        assert ours.sum() > 0
        # the plain rule, before cleanlab's "the model agrees" reduction, is the confident
        # joint's off-diagonal
        issue, _, _ = confident_learning(P, labels)
        cl = filt.find_label_issues(labels, P, filter_by="confident_learning")
        np.testing.assert_array_equal(issue & (P.argmax(axis=1) != labels), cl)
