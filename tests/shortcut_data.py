"""Synthetic counterfactual passes with a planted shortcut, and brute-force references.

Imported by name (``from shortcut_data import ...``; ``tests/`` is on ``sys.path`` as for
``conftest``) by the attractor, spurious_feature, root-cause and label_issue tests.

The planted model: class ``S`` = 0 is an attractor. Half of the images of classes 1 and 2
carry a feature in their background ("grass"): the model reads their empty background
(Only-BG) as 0, and an object of another class pasted onto such a background is predicted 0
with probability ``pull``; on any other background it is predicted 0 with probability
``base`` (a background-independent error rate) and as its own label otherwise. The clean
control (``pull=None``) ignores the background: every background gives the same ``base``.
"""

from __future__ import annotations

import numpy as np

CLASSES = ["zero", "one", "two", "three"]
S = 0


def shortcut_per_image(*, n_per_class: int = 80, pull: float | None = 0.8, base: float = 0.05,
                       draws: int = 4, seed: int = 0, victim_share: float = 0.5,
                       index_offset: int = 1000, permute: bool = True) -> tuple[dict, dict]:
    """``(per_image, truth)``: a counterfactual ``per_image`` dict and what was planted.

    Dataset indices are ``index_offset + 3 * k`` (not row positions) and the rows are shuffled,
    so code that confuses indices with positions fails. ``truth`` holds per row (in the
    returned order) ``label``, ``featured`` (background carries the feature), ``victim``
    (featured image of class 1/2 whose original prediction is 0) and ``background`` (the
    attribute value: ``grass`` where featured, else ``sand``/``snow``).
    """
    rng = np.random.default_rng(seed)
    K = len(CLASSES)
    n = K * n_per_class
    label = np.repeat(np.arange(K), n_per_class)
    within = np.tile(np.arange(n_per_class), K)
    featured = np.isin(label, (1, 2)) & (within % 2 == 0)
    only_bg = np.where(featured, S, label)
    index = index_offset + 3 * np.arange(n)
    src_pos = rng.integers(0, n - 1, (n, draws))
    src_pos = np.where(src_pos >= np.arange(n)[:, None], src_pos + 1, src_pos)  # never itself
    u = rng.random((n, draws))
    if pull is None:
        to_s = u < base
    else:
        to_s = np.where(featured[src_pos], u < pull, u < base)
    mixed = np.where(to_s, S, label[:, None])
    victim = featured & (rng.random(n) < victim_share) if pull is not None else np.zeros(n, bool)
    orig = np.where(victim, S, label)
    background = np.where(featured, "grass", np.where(within % 4 < 2, "sand", "snow"))
    pi = {"index": index, "label_idx": label, "orig_pred": orig, "only_bg_pred": only_bg,
          "only_fg_pred": label.copy(), "mixed_pred_all": mixed, "bg_source_index_all": index[src_pos],
          "pair_tier_all": np.full((n, draws), 2), "path": np.array([f"img/{i:05d}.png" for i in index])}
    truth = {"label": label, "featured": featured, "victim": victim, "background": background}
    if permute:
        perm = rng.permutation(n)
        pi = {k: v[perm] for k, v in pi.items()}
        truth = {k: v[perm] for k, v in truth.items()}
    return as_lists(pi), truth


def as_lists(pi: dict) -> dict:
    """The JSON-like form the counterfactual pass stores (lists, not arrays)."""
    return {k: np.asarray(v).tolist() for k, v in pi.items()}


def cf_of(pi: dict, **extra) -> dict:
    return {"per_image": pi, "seed": 0, "n_boot": 1000, **extra}


def class_index() -> dict:
    return {c: i for i, c in enumerate(CLASSES)}


# --- brute-force references (plain loops, written from the documented definitions) -----------


def reference_attraction(pi: dict, s: int) -> dict:
    """rate_in / rate_out / victims of class ``s`` by looping over every draw."""
    pos = {int(d): k for k, d in enumerate(pi["index"])}
    lab, ob, fg = pi["label_idx"], pi["only_bg_pred"], pi["only_fg_pred"]
    hits_in = tot_in = hits_out = tot_out = 0
    featured_bgs, bgs = set(), set()
    victims: dict = {}
    for i in range(len(lab)):
        for m, d in zip(pi["mixed_pred_all"][i], pi["bg_source_index_all"][i]):
            j = pos.get(int(d))
            if m < 0 or j is None:
                continue
            if lab[i] == s or lab[j] == s or lab[i] == lab[j] or fg[i] == s:
                continue
            bgs.add(j)
            if ob[j] == s:
                featured_bgs.add(j)
                tot_in += 1
                hits_in += m == s
                v = victims.setdefault(lab[i], [0, 0])
                v[0] += m == s
                v[1] += 1
            else:
                tot_out += 1
                hits_out += m == s
    return {"rate_in": hits_in / tot_in if tot_in else None,
            "rate_out": hits_out / tot_out if tot_out else None,
            "n_draws": tot_in + tot_out, "n_draws_featured": tot_in,
            "n_featured_backgrounds": len(featured_bgs), "n_backgrounds": len(bgs),
            "victim_draws": victims}


def reference_flips(pi: dict, attractors) -> dict:
    """Per object class: Mixed-Rand flips of correct originals, and those that went to an
    attractor on a background whose Only-BG image is read as that attractor."""
    pos = {int(d): k for k, d in enumerate(pi["index"])}
    lab, ob, orig = pi["label_idx"], pi["only_bg_pred"], pi["orig_pred"]
    out = {int(c): {"n_flips": 0, "n_explained": 0} for c in sorted(set(lab))}
    for i in range(len(lab)):
        if orig[i] != lab[i]:
            continue
        for m, d in zip(pi["mixed_pred_all"][i], pi["bg_source_index_all"][i]):
            j = pos.get(int(d))
            if m < 0 or j is None or m == lab[i]:
                continue
            out[lab[i]]["n_flips"] += 1
            out[lab[i]]["n_explained"] += int(m in attractors and ob[j] == m)
    return out
