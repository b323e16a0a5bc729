"""Root cause first: merge the findings about one (class, cause) and link what a root explains.

Runs after every detector (:func:`biasscope.findings.run_detectors`). Two steps:

1. **Merge.** Findings about one class and one cause become one finding. A class with a
   ``spurious_feature`` finding (it is an attractor) absorbs its own ``spurious_background``,
   ``background_reliance`` and ``clever_hans_cluster`` findings: the attention evidence, the
   background tests and the clusters go into its evidence (``attention``,
   ``background_tests``, ``clusters``) and its severity is the largest of them. Without an attractor finding, ``background_reliance`` merges into the class's
   ``spurious_background`` the same way (``evidence.background_tests``).
2. **Explain.** A victim's finding whose errors the attractor explains links to it
   (``evidence.explained_by``: the root findings' ids; ``evidence.explained_share``) and its
   severity keeps only the unexplained part, ``severity * (1 - share)``, capped just below
   the root's, so that it ranks below it:

   * ``background_reliance`` / ``spurious_background`` of class c: the share of c's Mixed-Rand
     flips (correct originals no longer c on another background) that went to an attractor S
     on a background the model reads as S;
   * ``misclassified``, ``confident_mistake`` of class c, ``group_gap`` of (c, value): the share
     of the errors that are predicted S where the image's own background reads as S (with
     masks), or that sit in a Clever-Hans cluster whose occlusion changed their prediction
     (without masks: ``ctx.occlusion``).

   A link is made when the share is at least ``explained_min_share`` (0.5); an explained
   finding keeps a severity of at least 0.01, so it stays listed under its root.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from biasscope.attractors import explained_by_attractor

from .base import Context, Finding

__all__ = ["consolidate", "explained_images"]

_BACKGROUND_KINDS = ("spurious_background", "background_reliance")
_ERROR_KINDS = ("misclassified", "confident_mistake", "group_gap")


def explained_images(ctx: Context, findings) -> dict:
    """Dataset index -> id of the root finding that explains the image's prediction."""
    return _explanations(ctx, findings)[0]


def _explanations(ctx: Context, findings) -> tuple[dict, dict | None]:
    """(:func:`explained_images`, the attractors' explained Mixed-Rand flips per class output
    index or None), from one pass over the counterfactual predictions."""
    out: dict = {}
    flips = None
    feats = {f.class_: f for f in findings if f.kind == "spurious_feature"}
    if feats and ctx.counterfactuals and not ctx.counterfactuals.get("skipped"):
        own = [c for c, f in feats.items() if "background_tests" in f.evidence or "attention" in f.evidence]
        res = explained_by_attractor(ctx.counterfactuals,
                                     {c: int(ctx.class_index[c]) for c in feats}, own=own)
        for idx, s in (res or {}).get("images", {}).items():
            out[int(idx)] = feats[s].id
        flips = (res or {}).get("flips")
    occ = (ctx.occlusion or {}).get("clusters") or {}
    hans = {f.cluster: f for f in findings if f.kind == "clever_hans_cluster"
            and "occlusion" in (f.evidence.get("reasons") or [])}
    for cid, f in hans.items():
        t = occ.get(str(cid)) or occ.get(cid)
        if not t:
            continue
        for idx, changed in zip(t.get("index", []), t.get("changed", [])):
            if changed:
                out.setdefault(int(idx), f.id)
    return out, flips


def _merge(into: Finding, other: Finding, key: str) -> Finding:
    ev = dict(into.evidence)
    ev[key] = {"title": other.title, "severity": other.severity, **other.evidence}
    ev.setdefault("merged", []).append(other.id)
    return dataclasses.replace(into, severity=max(into.severity, other.severity), evidence=ev,
                               examples=list(into.examples) or list(other.examples))


def _explain(f: Finding, share: float, roots: list, root_sev: float, n: int) -> Finding:
    ev = dict(f.evidence)
    ev["explained_by"] = roots
    ev["explained_share"] = round(float(share), 4)
    ev["explained_n"] = int(n)
    ev["unexplained_severity"] = round(f.severity * (1.0 - share), 4)
    # kept (at 0.01 at least) so that the root's evidence can list it, below the root
    sev = min(f.severity * (1.0 - share), max(root_sev - 0.01, 0.01))
    return dataclasses.replace(f, severity=max(sev, 0.01), evidence=ev)


def consolidate(ctx: Context, findings: list) -> list:
    """The merged and linked findings (see the module docstring), ranked by severity."""
    by_class: dict = {}
    for f in findings:
        by_class.setdefault(f.class_, []).append(f)
    merged = []
    for f in findings:
        if f.kind in _BACKGROUND_KINDS:
            same = by_class.get(f.class_, [])
            if any(g.kind == "spurious_feature" for g in same):
                continue  # absorbed below
            if f.kind == "background_reliance" and any(g.kind == "spurious_background" for g in same):
                continue
        if f.kind == "clever_hans_cluster" and any(g.kind == "spurious_feature"
                                                   for g in by_class.get(f.class_, [])):
            continue  # absorbed below: one finding per (class, cause)
        if f.kind == "spurious_feature":
            for g in by_class.get(f.class_, []):
                if g.kind in _BACKGROUND_KINDS:
                    f = _merge(f, g, "attention" if g.kind == "spurious_background" else "background_tests")
            for g in by_class.get(f.class_, []):
                if g.kind == "clever_hans_cluster":
                    ev = dict(f.evidence)
                    ev.setdefault("clusters", []).append({"id": g.id, "title": g.title,
                                                          "severity": g.severity, **g.evidence})
                    ev.setdefault("merged", []).append(g.id)
                    f = dataclasses.replace(f, severity=max(f.severity, g.severity), evidence=ev)
        elif f.kind == "spurious_background":
            for g in by_class.get(f.class_, []):
                if g.kind == "background_reliance":
                    f = _merge(f, g, "background_tests")
        merged.append(f)

    roots = {f.id: f for f in merged if f.kind in ("spurious_feature", "clever_hans_cluster")}
    images, flips = _explanations(ctx, merged)
    feats = {f.class_: f for f in merged if f.kind == "spurious_feature"}
    min_share = float(ctx.options["explained_min_share"])
    label, correct = ctx.strings("label"), ctx.correct
    idx = ctx.table["index"].to_numpy(np.int64) if "index" in ctx.table.columns else np.arange(ctx.n)
    out = []
    for f in merged:
        share, n_expl, linked = 0.0, 0, []
        if f.kind in _BACKGROUND_KINDS and flips and f.class_ in ctx.class_index:
            fl = flips.get(int(ctx.class_index[f.class_]))
            if fl and fl["n_flips"]:
                share, n_expl = fl["n_explained"] / fl["n_flips"], fl["n_explained"]
                linked = [g.id for g in feats.values() if g.class_ != f.class_]
        elif f.kind in _ERROR_KINDS and images:
            rows = ~correct & (label == f.class_)
            if f.kind == "confident_mistake":
                rows &= ctx.col("confidence") >= float(ctx.options["confident_threshold"])
            if f.kind == "group_gap" and f.group:
                col = ctx.table[f.group["attribute"]]
                rows &= col.notna().to_numpy() & (col.astype(str).to_numpy() == str(f.group["value"]))
            wrong = idx[rows]
            hits = [images[int(i)] for i in wrong if int(i) in images]
            if len(wrong):
                share, n_expl = len(hits) / len(wrong), len(hits)
                linked = sorted(set(hits))
        linked = [r for r in linked if r in roots and r != f.id]
        if linked and share >= min_share:
            f = _explain(f, share, linked, min(roots[r].severity for r in linked), n_expl)
        out.append(f)
    out.sort(key=lambda f: (-f.severity, f.kind, f.id))
    return out
