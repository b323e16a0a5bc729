"""``clever_hans_cluster``: a coherent group of heatmaps that uses a shortcut (SpRAy).

Reads the clusters of :func:`biasscope.analysis.analyse` (per predicted class). A cluster large
enough to be a strategy rather than noise (``size >= max(cluster_min_size, cluster_min_share *
class size)``) is flagged when its attention is

* **off the object**: with masks, its mean ``inside_frac`` is below ``off_object_inside`` and at
  least ``cluster_inside_gap`` below the rest of its class; or
* **at a fixed location**: half of its mean heatmap lies in at most ``cluster_hot_area`` of the
  image and its members' own centres of mass agree to within ``cluster_jitter`` (RMS, image
  units) -- one spot, not a region where objects happen to lie -- and that spot is not on the
  object: with masks, the cluster's mean ``inside_frac`` is below ``off_object_inside`` (then the
  whole class may share the spot, e.g. a watermark every image of the class carries); without
  masks, the rest of its class puts at most ``cluster_rest_mass`` of its attention there, so the
  spot is not simply where this class's objects usually are.

Without masks, a class that is a single cluster is left to ``spurious_background``: with no rest
of the class to compare with, a concentrated cluster is just as likely a dataset of centred
objects.

Severity = evidence strength x size weight: strength ``min(1, gap / 0.4)`` (off object) or
``min(1, (0.5 - rest_mass) / 0.5)`` (fixed spot; 0.5 is the mass the cluster itself has there)
or, with masks, ``(off_object_inside - inside_frac) / off_object_inside``,
the larger of the two; the weight ``0.5 + 0.5 * min(1, share / 0.25)`` grows with the share of
the class the cluster holds (full weight from a quarter).
"""

from __future__ import annotations

import numpy as np

from biasscope.causal import is_causal

from .base import Context, Detector, DetectorResult, register


def _line(c: str, cen: dict, occ: dict, size: int) -> str:
    from .spurious_feature import _place

    moved = ", ".join(f"'{k}' {v}" for k, v in list(occ.get("moved_to", {}).items())[:3])
    line = (f"'{c}' is predicted from something at {_place(cen.get('x', 0.5), cen.get('y', 0.5))} "
            f"of the image: hiding it changes {occ['changed_rate']:.0%} of {size} such "
            f"predictions")
    if occ.get("n_wrong"):
        line += f", and {occ['n_repaired']} of {occ['n_wrong']} mistakes among them come back to their label"
    return line + (f" (new predictions: {moved})" if moved else "")


@register
class CleverHansCluster(Detector):
    name = kind = "clever_hans_cluster"
    needs_heatmaps = True
    scope = "cluster"
    description = "Heatmap clusters whose attention sits off the object or at one fixed spot."

    def run(self, ctx: Context) -> DetectorResult:
        clusters = ctx.analysis.get("clusters")
        if clusters is None:
            return DetectorResult.skip("no cluster analysis in the context (run biasscope.analysis.analyse)")
        o = ctx.options
        class_n: dict = {}
        for cl in clusters:
            class_n[cl["class"]] = class_n.get(cl["class"], 0) + int(cl["size"])
        n_clusters = {c: sum(1 for cl in clusters if cl["class"] == c) for c in class_n}
        member = self._cluster_column(ctx)
        occlusion = (ctx.occlusion or {}).get("clusters") or {}
        flags = np.zeros(ctx.n, bool)
        findings = []
        for cl in clusters:
            c, size = cl["class"], int(cl["size"])
            share = size / class_n[c]
            min_size = max(int(o["cluster_min_size"]), o["cluster_min_share"] * class_n[c])
            m_if, rest_if = cl.get("mean_inside_frac"), cl.get("rest_mean_inside_frac")
            has_masks = (cl.get("n_with_mask") or 0) >= 3 and m_if is not None
            occ = occlusion.get(str(cl["id"]))
            causal, occ_strength = is_causal(
                occ, o, off_object=has_masks and m_if < o["off_object_inside"])
            if (n_clusters[c] < 2 and not has_masks and not causal) or size < min_size:
                continue
            strength, reasons = 0.0, []
            if causal:
                strength = max(strength, occ_strength)
                reasons.append("occlusion")
            if has_masks and rest_if is not None and m_if < o["off_object_inside"] \
                    and rest_if - m_if >= o["cluster_inside_gap"]:
                strength = max(strength, min(1.0, (rest_if - m_if) / 0.4))
                reasons.append("off_object")
            hot, rest_mass = cl.get("hot_area"), cl.get("rest_mass_in_hot")
            jitter = cl.get("centroid_jitter")
            on_object = has_masks and m_if >= o["off_object_inside"]
            # (a cluster that is all of the class's predictions has no rest: rest_mass None)
            one_spot = None not in (hot, jitter) and hot <= o["cluster_hot_area"] \
                and jitter <= o["cluster_jitter"] and not on_object
            if one_spot and causal:
                reasons.append("fixed_location")
            elif one_spot and rest_mass is not None and rest_mass <= o["cluster_rest_mass"]:
                strength = max(strength, min(1.0, (0.5 - rest_mass) / 0.5))
                reasons.append("fixed_location")
            elif one_spot and has_masks:
                # the masks show the spot is off the object, so it does not matter that the
                # rest of the class looks there too: the whole class may use the shortcut
                strength = max(strength, (o["off_object_inside"] - m_if) / o["off_object_inside"])
                reasons.append("fixed_location")
            if not reasons:
                continue
            if member is not None:
                flags |= member == int(cl["id"])
            cen = cl.get("centroid") or {}
            where = " and ".join(
                ["off the object"] * ("off_object" in reasons)
                + [f"at one spot (x={cen['x']:.2f}, y={cen['y']:.2f})"] * ("fixed_location" in reasons))
            # causal evidence stands on its own; attention alone is weighted by the share
            weight = 1.0 if causal else 0.5 + 0.5 * min(1.0, share / 0.25)
            title = f"{size} predictions of '{c}' ({share:.0%}) attend {where}"
            ev_occ = None
            if occ is not None:
                ev_occ = {k: v for k, v in occ.items() if k not in ("index", "changed")}
            if causal:
                title += (f"; hiding that spot changes {occ['changed_rate']:.0%} of them "
                          f"(vs {occ.get('control_changed_rate') or 0:.0%} of other images)")
            findings.append(self.finding(
                severity=strength * weight,
                title=title,
                class_=c, cluster=int(cl["id"]),
                evidence={"reasons": reasons, "size": size, "share_of_class": share,
                          "accuracy": cl.get("accuracy"), "mean_inside_frac": m_if,
                          "rest_mean_inside_frac": rest_if, "mean_lift": cl.get("mean_lift"),
                          "centroid": cen, "spread": cl.get("spread"), "hot_area": hot,
                          "centroid_jitter": jitter,
                          "rest_mass_in_hot": rest_mass, "mean_heatmap": cl.get("mean_heatmap"),
                          "occlusion": ev_occ,
                          **({"verdict_line": _line(c, cen, occ, size)} if causal else {})},
                examples=list(cl.get("examples", []))[: int(o["max_examples"])],
            ))
        return DetectorResult(flags=flags if member is not None else None, findings=findings)

    @staticmethod
    def _cluster_column(ctx: Context):
        """Cluster id per image (-1 = none), or None when the table's column is not filled."""
        if "cluster" not in ctx.table.columns:
            return None
        c = ctx.col("cluster")
        if not np.isfinite(c).any():
            return None
        return np.where(np.isfinite(c), c, -1).astype(np.int64)
