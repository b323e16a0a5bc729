"""Analysis of a stored scan: heatmap clusters (SpRAy), a 2-D map of all CAMs, class and group
statistics. Reads the scan table and heatmaps only (no model, no TensorFlow).

Spectral Relevance Analysis (SpRAy; Lapuschkin et al. 2019, "Unmasking Clever Hans predictors
and assessing what machines really learn", Nat. Commun. 10, 1096):

1. every CAM is resampled to a common grid and normalised to unit mass, so that a map says only
   *where* the model looked, not how strongly (Grad-CAM magnitudes differ between classes and
   images and would otherwise dominate the distances);
2. per predicted class, a symmetric k-nearest-neighbour graph over the flattened maps is built
   and its normalised Laplacian ``L = I - D^-1/2 A D^-1/2`` is decomposed; the number of
   clusters ``k`` is where the gap between consecutive eigenvalues is largest (a graph with k
   well separated groups has k eigenvalues near 0, then a jump);
3. the images are clustered by k-means on the row-normalised first ``k`` eigenvectors
   (Ng, Jordan and Weiss 2002), i.e. what ``SpectralClustering(affinity="precomputed")`` does,
   but re-using the eigenvectors already computed for the eigengap.

Clusters that attend off the object or at a fixed spot are what the ``clever_hans_cluster``
detector (``biasscope.findings``) looks for; this module only describes them.

The outputs are :func:`analyse`'s ``columns`` (``cluster``, ``embed_x``, ``embed_y``, one value
per table row; write them with :func:`fill_columns`) and a JSON-serialisable ``analysis`` dict
(``analysis.json``); see :func:`analyse` for its keys.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from biasscope.errors import BiasscopeError
from biasscope.metrics import upsample_bilinear

__all__ = ["analyse", "cluster_class", "fill_columns", "heatmap_geometry", "infer_attributes",
           "normalise_cams", "project", "to_jsonable"]

ANALYSIS_VERSION = 1

#: Above ``_TSNE_PCA_ABOVE`` images t-SNE runs on PCA-reduced (30-D) vectors; above
#: ``_TSNE_FIT_MAX`` it is fitted on a random subsample of that many images and the rest are
#: placed among their nearest fitted neighbours. Single-threaded Barnes-Hut t-SNE (500
#: iterations) takes about 2 s for 1,000 points, 3 s for 1,500, 9 s for 5,000 and 22 s for
#: 10,000 on the 2-core development machine: the map is a picture of the clusters for the
#: report (the clusters themselves are computed apart, on each class's maps), and 1,000 fitted
#: points draw every cluster of 1% of the images with 10 of them, so the fit is capped there: a
#: fixed cost of about 2 s at any N, spent alongside the counterfactual pass, which it slows
#: about as much (both want the two cores; the whole job at scale is budgeted at a few times
#: the CAM pass, DESIGN section 11). The placed points land inside the structure the fit found.
_TSNE_PCA_ABOVE = 3000
_TSNE_FIT_MAX = 1000
_TSNE_ANGLE = 0.8
_PCA_DIMS = 30

#: Classes up to this size get a dense eigendecomposition (exact, a fraction of a second);
#: larger ones use ARPACK on the sparse graph.
_DENSE_EIG_MAX = 1500

#: Labels that mark rows with no cluster in the ``cluster`` column returned by :func:`analyse`.
NO_CLUSTER = -1

_REQUIRED = ("label", "pred", "correct")

#: Columns a scan table has besides its manifest attributes (DESIGN section 4).
CORE_COLUMNS = frozenset({
    "index", "path", "label", "label_idx", "pred", "pred_idx", "correct", "confidence",
    "label_prob", "top5", "top5_prob", "inside_frac", "mask_frac", "lift", "pointing_hit",
    "energy_inside", "cam_entropy", "cluster", "embed_x", "embed_y", "flags", "mask", "x0", "y0",
    "x1", "y1",
})


def infer_attributes(table: pd.DataFrame) -> list[str]:
    """The manifest attribute columns of a scan table: every column that is not a core one."""
    return [str(c) for c in table.columns if c not in CORE_COLUMNS]


# ----------------------------------------------------------------------------------------------
# JSON helpers
# ----------------------------------------------------------------------------------------------


def to_jsonable(obj):
    """A deep copy of ``obj`` with numpy scalars/arrays turned into Python values, NaN/inf and
    pandas NA into None, tuples into lists and dict keys into strings (what ``json.dumps``
    accepts without a ``default``)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable_item(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is None or obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, str):
        return obj
    return str(obj)


def _jsonable_item(v):
    """:func:`to_jsonable` of one list item, plain Python scalars without the recursive call
    (per-image lists of a large scan hold hundreds of thousands of them)."""
    t = type(v)
    if t is int or t is str or t is bool or v is None:
        return v
    if t is float:
        return v if math.isfinite(v) else None
    return to_jsonable(v)


def _r(x, nd: int = 6):
    """A rounded float, None for NaN (analysis.json holds figures for people, not bits)."""
    if x is None:
        return None
    x = float(x)
    return round(x, nd) if math.isfinite(x) else None


# ----------------------------------------------------------------------------------------------
# Heatmap preparation and geometry
# ----------------------------------------------------------------------------------------------


def normalise_cams(heatmaps, grid=(16, 16)) -> tuple[np.ndarray, np.ndarray]:
    """Resample CAMs bilinearly to ``grid`` and scale each to unit mass.

    Parameters
    ----------
    heatmaps : array-like of shape (n, h, w)
        Non-negative CAMs (any float dtype; float16 from a stored scan is fine).
    grid : pair of int
        The common grid (H, W).

    Returns
    -------
    maps : ndarray of float32, shape (n, H, W)
        Each map sums to 1, except all-zero maps, which stay all zero.
    zero : ndarray of bool, shape (n,)
        Which maps are all zero (no attention anywhere: nothing to normalise).

    Raises
    ------
    BiasscopeError
        If ``heatmaps`` is not 3-d, is non-finite or negative, or ``grid`` is not two ints >= 1.
    """
    a = np.asarray(heatmaps)
    if a.ndim != 3:
        raise BiasscopeError(f"heatmaps must have shape (n, h, w): shape is {a.shape}")
    if len(grid) != 2 or min(int(g) for g in grid) < 1:
        raise BiasscopeError(f"grid must be two positive ints (H, W), got {grid!r}")
    a = a.astype(np.float32)
    if a.size and not np.isfinite(a).all():
        raise BiasscopeError("heatmaps must be finite: found NaN or inf")
    if a.size and a.min() < 0:
        raise BiasscopeError(f"heatmaps must be non-negative (CAMs after ReLU): minimum {a.min()}")
    H, W = int(grid[0]), int(grid[1])
    if a.shape[0] == 0:
        return np.zeros((0, H, W), np.float32), np.zeros(0, bool)
    # Bilinear resampling (half-pixel centres, as for the metrics); interpolation of
    # non-negative values stays non-negative. Mass is fixed afterwards, so the resampling's
    # change of total mass does not matter.
    maps = upsample_bilinear(a, (H, W))
    mass = maps.reshape(len(maps), -1).sum(axis=1, dtype=np.float64)
    zero = ~(mass > 0)
    scale = np.divide(1.0, mass, out=np.zeros_like(mass), where=~zero).astype(np.float32)
    maps *= scale[:, None, None]
    return maps, zero


def heatmap_geometry(maps) -> dict[str, np.ndarray]:
    """Where the mass of each unit-mass map sits, in normalised image coordinates.

    Returns a dict of float64 arrays of shape (n,):

    - ``cx``, ``cy``: centre of mass, 0 = left/top edge, 1 = right/bottom edge (cell centres at
      ``(i + 0.5) / W``);
    - ``spread``: root-mean-square distance of the mass from that centre, also in image units
      (0 for a single cell; about 0.41 for uniform attention);
    - ``hot_area``: the smallest fraction of the image's cells that holds half of the mass
      (small = concentrated; 0.5 for uniform attention).

    All NaN for an all-zero map. Computed in chunks of 50,000 maps, so that memory stays
    bounded at any n (float64 temporaries of 1,000,000 16x16 maps would take 8 GB).
    """
    n = len(maps)
    if n > _GEOMETRY_CHUNK:
        parts = [_geometry(maps[i:i + _GEOMETRY_CHUNK]) for i in range(0, n, _GEOMETRY_CHUNK)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return _geometry(maps)


_GEOMETRY_CHUNK = 50_000


def _geometry(maps) -> dict[str, np.ndarray]:
    m = np.asarray(maps, dtype=np.float64)
    n, H, W = m.shape
    flat = m.reshape(n, -1)
    mass = flat.sum(axis=1)
    ok = mass > 0
    p = np.divide(flat, mass[:, None], out=np.zeros_like(flat), where=ok[:, None])
    ys = np.repeat((np.arange(H) + 0.5) / H, W)
    xs = np.tile((np.arange(W) + 0.5) / W, H)
    cy, cx = p @ ys, p @ xs
    var = p @ (ys ** 2) + p @ (xs ** 2) - cy ** 2 - cx ** 2
    spread = np.sqrt(np.clip(var, 0.0, None))
    srt = -np.sort(-p, axis=1)
    cells_for_half = (np.cumsum(srt, axis=1) < 0.5 - 1e-9).sum(axis=1) + 1
    hot_area = cells_for_half / float(H * W)
    out = {"cx": cx, "cy": cy, "spread": spread, "hot_area": hot_area}
    for v in out.values():
        v[~ok] = np.nan
    return out


# ----------------------------------------------------------------------------------------------
# Spectral clustering (SpRAy)
# ----------------------------------------------------------------------------------------------


def _knn_size(n: int, n_neighbors: int) -> int:
    # A kNN graph with k close to n is (nearly) complete and cannot show groups: a small class
    # gets at most (n - 1) // 2 neighbours, so two groups of n/2 can still be told apart.
    return int(min(n_neighbors, max(1, (n - 1) // 2)))


def _laplacian_spectrum(A, m: int, seed: int):
    """The ``m`` smallest eigenvalues/eigenvectors of the normalised Laplacian of ``A``, the
    number of connected components and each node's component."""
    from scipy.sparse import diags, identity
    from scipy.sparse.csgraph import connected_components

    n = A.shape[0]
    deg = np.asarray(A.sum(axis=1)).ravel()
    dinv = diags(1.0 / np.sqrt(deg))
    S = (dinv @ A @ dinv).tocsr()  # normalised adjacency: eigenvalues of L are 1 - those of S
    n_comp, comp = connected_components(A, directed=False)
    if n <= _DENSE_EIG_MAX:
        from scipy.linalg import eigh

        L = (identity(n) - S).toarray()
        vals, vecs = eigh(L, subset_by_index=[0, m - 1])
    else:
        from scipy.sparse.linalg import eigsh

        # The largest eigenvalues of S are the smallest of L; a seeded start vector keeps
        # ARPACK deterministic.
        v0 = np.random.default_rng(seed).uniform(0.5, 1.5, n)
        mu, vecs = eigsh(S, k=m, which="LA", v0=v0, tol=1e-8, maxiter=50 * n)
        order = np.argsort(-mu)
        vals, vecs = 1.0 - mu[order], vecs[:, order]
    return np.clip(vals, 0.0, 2.0), vecs, int(n_comp), comp.astype(np.int64)


def _kmeans(X, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    if k <= 1:
        return np.zeros(len(X), np.int64)
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(X)


def _fallback_kmeans(X, max_clusters: int, seed: int) -> tuple[np.ndarray, int]:
    """k-means on the maps themselves when the graph is unusable; k by silhouette (>= 0.25, the
    usual "weak structure" bar, else one cluster)."""
    from sklearn.metrics import silhouette_score

    n_distinct = len(np.unique(np.round(X, 7), axis=0))
    best_k, best_s, best = 1, 0.25, np.zeros(len(X), np.int64)
    for k in range(2, min(max_clusters, n_distinct, len(X) - 1) + 1):
        lab = _kmeans(X, k, seed)
        if len(np.unique(lab)) < 2:
            continue
        s = silhouette_score(X, lab, sample_size=min(len(X), 2000), random_state=seed)
        if s > best_s:
            best_k, best_s, best = k, s, lab
    return best, best_k


#: A class with more images than this is clustered on a seeded sample of this many, and the
#: rest join the cluster of most of their nearest sampled neighbours: the kNN graph costs
#: O(n^2 D), 29 s for 4 classes of 25,000 images on 2 cores, and would grow 100-fold at 1M.
#: 2,000 fitted maps still give a strategy used by 2% of a class 40 members in the fit.
CLUSTER_FIT_MAX = 2000


def cluster_class(X, *, n_neighbors: int = 10, max_clusters: int = 8, seed: int = 0,
                  max_fit: int = CLUSTER_FIT_MAX) -> dict:
    """SpRAy clustering of one class's flattened unit-mass maps ``X`` (n, D), fitted on at most
    ``max_fit`` of them (``n_fit`` in the result); the others take the majority cluster of
    their nearest fitted neighbours (as many as the graph's k)."""
    n = len(X)
    if n <= max_fit:
        out = _cluster_distinct(X, n_neighbors=n_neighbors, max_clusters=max_clusters, seed=seed)
        out["n_fit"] = n
        return out
    from sklearn.neighbors import NearestNeighbors

    fit = np.sort(np.random.default_rng([int(seed), 7]).choice(n, int(max_fit), replace=False))
    out = _cluster_distinct(X[fit], n_neighbors=n_neighbors, max_clusters=max_clusters, seed=seed)
    labels = np.empty(n, np.int64)
    labels[fit] = out["labels"]
    rest = np.setdiff1d(np.arange(n), fit)
    nn = NearestNeighbors(n_neighbors=max(1, out["n_neighbors"])).fit(np.asarray(X[fit], np.float64))
    k = int(out["labels"].max()) + 1 if len(out["labels"]) else 1
    for start in range(0, len(rest), 20_000):  # bounded memory: 20,000 x max_fit distances
        part = rest[start:start + 20_000]
        _, nb = nn.kneighbors(np.asarray(X[part], np.float64))
        votes = np.zeros((len(part), k), np.int64)
        np.add.at(votes, (np.repeat(np.arange(len(part)), nb.shape[1]), out["labels"][nb].ravel()), 1)
        labels[part] = votes.argmax(axis=1)
    out.update(labels=labels, n_fit=int(max_fit))
    return out


def _first_copies(X) -> np.ndarray:
    """For each row of ``X`` (n, D), the index of the first row equal to it (the grouping of
    ``np.unique(X, axis=0)``, which sorts the rows themselves: 35-45 ms for 2,500 maps of 256
    values, against a few here). Rows are grouped by a hash of their bits (zeros of either
    sign made alike) and each group is checked equal; on a collision, or NaNs, ``np.unique``
    decides."""
    X = np.ascontiguousarray(X, dtype=np.float64)
    n = len(X)
    if n == 0:
        return np.zeros(0, np.int64)
    if np.isfinite(X).all():
        bits = (X.reshape(n, -1) + 0.0).view(np.uint64)  # -0.0 + 0.0 is +0.0
        mult = np.random.default_rng(0x5EED).integers(1, 2**63, bits.shape[1], dtype=np.uint64) | np.uint64(1)
        with np.errstate(over="ignore"):
            h = (bits * mult).sum(axis=1, dtype=np.uint64)
        _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
        first_of = first[np.ravel(inverse)]
        if np.array_equal(X, X[first_of]):
            return first_of.astype(np.int64)
    _, first, inverse = np.unique(X.reshape(n, -1), axis=0, return_index=True, return_inverse=True)
    return first[np.ravel(inverse)].astype(np.int64)


def _cluster_distinct(X, **kw) -> dict:
    """:func:`_cluster_fit` on the distinct maps of ``X``; copies of one map (the same image
    listed twice, or images the model sees alike) join their original's cluster. Exact copies
    would otherwise form cliques of their own in the kNN graph -- as many connected components
    as there are repeated images -- and leave no eigengap to read."""
    X = np.asarray(X, dtype=np.float64)
    if len(X) < 4:
        return _cluster_fit(X, **kw)
    first_of = _first_copies(X)
    keep = np.flatnonzero(first_of == np.arange(len(X)))  # the distinct maps in their order
    if len(keep) == len(X):
        return _cluster_fit(X, **kw)
    out = _cluster_fit(X[keep], **kw)
    out["labels"] = np.asarray(out["labels"])[np.searchsorted(keep, first_of)]
    out["n_distinct"] = int(len(keep))
    return out


def _cluster_fit(X, *, n_neighbors: int = 10, max_clusters: int = 8, seed: int = 0) -> dict:
    """SpRAy clustering of one class's flattened unit-mass maps ``X`` (n, D).

    ``k`` is the argmax of the eigengap over 1..max_clusters (``k_eigengap``), except when the
    kNN graph is disconnected into 2..max_clusters components: then the components are the
    clusters (their eigenvalues are exactly 0; see the comment in the code for why a later,
    larger gap is not used).

    Returns ``{"labels": int array (n,), "k", "k_eigengap", "method": "spectral" | "kmeans" |
    "single", "n_neighbors", "eigenvalues", "eigengaps", "components", "reason"}``. ``method``
    is ``"single"`` when the class is too small to split (n < 4), ``"kmeans"`` when the graph is
    degenerate (more connected components than ``max_clusters``, which leaves no eigengap to
    read, or the eigensolver failed).
    """
    from sklearn.neighbors import kneighbors_graph

    X = np.asarray(X, dtype=np.float64)
    n = len(X)
    out = {"labels": np.zeros(n, np.int64), "k": 1 if n else 0, "method": "single",
           "n_neighbors": 0, "eigenvalues": [], "eigengaps": [], "components": None,
           "k_eigengap": None, "reason": None}
    if n < 4:
        out["reason"] = f"{n} image(s): too few to split"
        return out
    knn = _knn_size(n, n_neighbors)
    A = kneighbors_graph(X, knn, mode="connectivity", include_self=False)
    A = A.maximum(A.T).tocsr()  # symmetric: i ~ j if either is among the other's neighbours
    out["n_neighbors"] = knn
    m = min(max_clusters + 1, n - 1)
    try:
        vals, vecs, n_comp, components = _laplacian_spectrum(A, m, seed)
    except Exception as exc:  # ARPACK non-convergence and the like: fall back, and say so
        labels, k = _fallback_kmeans(X, max_clusters, seed)
        out.update(labels=labels, k=k, method="kmeans",
                   reason=f"eigensolver failed ({type(exc).__name__})")
        return out
    out["components"] = n_comp
    gaps = np.diff(vals)
    out["eigenvalues"] = [_r(v) for v in vals]
    out["eigengaps"] = [_r(g) for g in gaps]
    if n_comp > max_clusters:
        labels, k = _fallback_kmeans(X, max_clusters, seed)
        out.update(labels=labels, k=k, method="kmeans",
                   reason=f"{n_comp} disconnected groups > max_clusters={max_clusters}")
        return out
    # gaps[i] = lambda_{i+2} - lambda_{i+1}: a gap after the k-th eigenvalue means k clusters.
    k_gap = int(np.argmax(gaps)) + 1 if len(gaps) else 1
    out["k_eigengap"] = min(k_gap, max_clusters)
    if n_comp >= 2:
        # The graph falls apart into n_comp pieces: lambda_1..lambda_n_comp are exactly 0 and
        # the pieces are the clusters. A larger gap further up the spectrum only reflects the
        # geometry *inside* a piece -- kNN graphs of heatmaps that vary continuously (objects
        # at different positions) have slowly rising eigenvalues whose largest gap lands at an
        # arbitrary k -- and would split a coherent strategy into several clusters.
        labels = components
    elif k_gap > 1:
        U = vecs[:, :k_gap]
        U = U / np.maximum(np.linalg.norm(U, axis=1, keepdims=True), 1e-12)
        labels = _kmeans(U, min(k_gap, max_clusters), seed)
    else:
        labels = np.zeros(n, np.int64)
    out.update(labels=labels, k=int(len(np.unique(labels))), method="spectral")
    return out


# ----------------------------------------------------------------------------------------------
# 2-D projection
# ----------------------------------------------------------------------------------------------


def _umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except Exception:
        return False
    return True


def project(X, *, seed: int = 0, method: str = "auto") -> tuple[np.ndarray, dict]:
    """A 2-D map of the flattened CAMs ``X`` (n, D) for the report; returns ``(xy, info)``.

    ``method``: ``"auto"`` (UMAP when the ``umap`` package is importable, else t-SNE),
    ``"umap"``, ``"tsne"``, ``"pca"`` or ``"none"`` (all NaN).
    """
    X = np.asarray(X, dtype=np.float32)
    n = len(X)
    if method not in ("auto", "umap", "tsne", "pca", "none"):
        raise BiasscopeError(f"projection must be auto, umap, tsne, pca or none, got {method!r}")
    if method == "auto":
        method = "umap" if _umap_available() else "tsne"
    info = {"method": method, "n_fit": n, "pca_dims": None}
    if method == "none":
        return np.full((n, 2), np.nan), info
    if method == "pca" or n < 4 or np.count_nonzero(_first_copies(X) == np.arange(n)) < 4:
        # Too few (distinct) points for a neighbour embedding -- t-SNE's PCA initialisation
        # divides by a zero variance when all maps are equal -- while PCA is still defined.
        info["method"] = "pca"
        return _pca2(X), info
    if method == "umap":
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed)
        return np.asarray(reducer.fit_transform(X), dtype=np.float64), info
    return _tsne(X, seed, info)


def _pca2(X) -> np.ndarray:
    out = np.zeros((len(X), 2))
    if len(X) < 2:
        return out
    Xc = X.astype(np.float64) - X.mean(axis=0)
    # SVD with a sign convention (largest loading positive) so that the result is deterministic.
    U, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    signs = np.sign(Vt[np.arange(len(Vt)), np.abs(Vt).argmax(axis=1)])
    signs[signs == 0] = 1
    Y = U * s * signs
    out[:, : min(2, Y.shape[1])] = Y[:, :2]
    return out


def _tsne(X, seed: int, info: dict):
    from sklearn.manifold import TSNE

    n = len(X)
    fit = np.arange(n)
    if n > _TSNE_FIT_MAX:
        fit = np.sort(np.random.default_rng(seed).choice(n, _TSNE_FIT_MAX, replace=False))
    Z = X
    if n > _TSNE_PCA_ABOVE:
        from sklearn.decomposition import PCA

        dims = min(_PCA_DIMS, X.shape[1], n)
        # fitted on the images t-SNE sees (all of them up to _TSNE_FIT_MAX), the rest
        # transformed in chunks: a PCA of all 1,000,000 maps would need several GB
        pca = PCA(n_components=dims, svd_solver="randomized", random_state=seed)
        if len(fit) == n:
            Z = pca.fit_transform(X)
        else:
            pca.fit(X[fit])
            Z = np.concatenate([pca.transform(X[i:i + 100_000]).astype(np.float32)
                                for i in range(0, n, 100_000)])
        info["pca_dims"] = dims
    info["n_fit"] = int(len(fit))
    perplexity = float(min(30.0, max(1.0, (len(fit) - 1) / 3.0)))
    # 500 iterations (sklearn's default is 1000): the map has settled by then for the report's
    # purpose, and it halves the cost. The keyword was n_iter before scikit-learn 1.5.
    # Barnes-Hut angle 0.8 (sklearn's default 0.5): 30% less time for the same map quality
    # (trustworthiness at k=10 on the benchmark's CAMs: 0.966-0.971 with either, two seeds,
    # 800 and 1,000 images).
    import inspect

    iters = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                angle=_TSNE_ANGLE, **{iters: 500})
    xy_fit = tsne.fit_transform(Z[fit]).astype(np.float64)
    if len(fit) == n:
        return xy_fit, info
    # Place the images t-SNE did not see at the distance-weighted mean of their nearest fitted
    # neighbours (in the same PCA space): they land inside the structure the fit found.
    from sklearn.neighbors import NearestNeighbors

    rest = np.setdiff1d(np.arange(n), fit)
    nn = NearestNeighbors(n_neighbors=min(10, len(fit))).fit(Z[fit])
    dist, idx = nn.kneighbors(Z[rest])
    w = 1.0 / np.maximum(dist, 1e-9)
    w /= w.sum(axis=1, keepdims=True)
    xy = np.empty((n, 2))
    xy[fit] = xy_fit
    xy[rest] = np.einsum("ij,ijk->ik", w, xy_fit[idx])
    return xy, info


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def _nanmean(x) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else None


def _nanmedian(x) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if len(x) else None


def _col(table: pd.DataFrame, name: str) -> np.ndarray:
    if name in table.columns:
        return pd.to_numeric(table[name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return np.full(len(table), np.nan)


def _attention_stats(table: pd.DataFrame, rows) -> dict:
    inside = _col(table, "inside_frac")[rows]
    return {
        "n_with_mask": int(np.isfinite(inside).sum()),
        "mean_inside_frac": _r(_nanmean(inside)),
        "median_inside_frac": _r(_nanmedian(inside)),
        "mean_lift": _r(_nanmean(_col(table, "lift")[rows])),
        "pointing_rate": _r(_nanmean(_col(table, "pointing_hit")[rows])),
    }


def class_order(table: pd.DataFrame, classes=None) -> list[str]:
    """The dataset's classes first (in the given order), then any other predicted outputs."""
    seen = list(classes or [])
    extra = set(map(str, table["label"].astype(str))) | set(map(str, table["pred"].astype(str)))
    return [str(c) for c in seen] + sorted(extra - set(map(str, seen)))


def class_stats(table: pd.DataFrame, classes=None) -> dict:
    """Per labelled class: n, n_correct, accuracy (recall), n_pred (images predicted as it),
    and attention statistics over the images labelled with it."""
    label = table["label"].astype(str).to_numpy()
    pred = table["pred"].astype(str).to_numpy()
    correct = table["correct"].to_numpy(dtype=bool)
    out = {}
    for c in class_order(table, classes):
        rows = label == c
        n = int(rows.sum())
        out[c] = {"n": n, "n_correct": int(correct[rows].sum()),
                  "accuracy": _r(correct[rows].mean()) if n else None,
                  "n_pred": int((pred == c).sum()), **_attention_stats(table, rows)}
    return out


def group_stats(table: pd.DataFrame, attributes) -> dict:
    """Per attribute, per (labelled class, attribute value): n, n_correct, accuracy. Rows with
    a missing value are left out (they form no group)."""
    out = {}
    label = table["label"].astype(str)
    for a in attributes or []:
        if a not in table.columns:
            raise BiasscopeError(f"attribute {a!r} is not a column of the scan table")
        df = pd.DataFrame({"class": label, "value": table[a], "correct": table["correct"].astype(bool)})
        df = df[df["value"].notna()]
        df["value"] = df["value"].astype(str)
        g = df.groupby(["class", "value"], sort=True)["correct"].agg(["size", "sum"])
        out[a] = [{"class": c, "value": v, "n": int(row["size"]), "n_correct": int(row["sum"]),
                   "accuracy": _r(row["sum"] / row["size"])} for (c, v), row in g.iterrows()]
    return out


# ----------------------------------------------------------------------------------------------
# analyse
# ----------------------------------------------------------------------------------------------


def _check_table(table, heatmaps) -> None:
    if not isinstance(table, pd.DataFrame):
        raise BiasscopeError(f"table must be a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise BiasscopeError(f"the scan table lacks column(s) {missing}")
    if np.shape(heatmaps)[0] != len(table):
        raise BiasscopeError(f"heatmaps hold {np.shape(heatmaps)[0]} maps for a table of "
                             f"{len(table)} rows")


def import_dependencies() -> None:
    """Import the libraries :func:`analyse` and the detectors use (scikit-learn's clustering,
    neighbours, PCA and t-SNE; SciPy's eigensolvers and statistics; threadpoolctl): ``analyse``
    does at its start, a helper process (:mod:`biasscope.helper`) ahead of time, and the scan
    alongside its counterfactual pass."""
    import scipy.linalg  # noqa: F401
    import scipy.sparse.linalg  # noqa: F401
    import scipy.stats  # noqa: F401
    import sklearn.cluster  # noqa: F401
    import sklearn.decomposition  # noqa: F401
    import sklearn.manifold  # noqa: F401
    import sklearn.neighbors  # noqa: F401
    import threadpoolctl  # noqa: F401


#: Columns of the scan table :func:`analyse` does not read (per-image lists, slow to pickle):
#: left out of what is sent to a helper process.
UNREAD_COLUMNS = ("top5", "top5_prob", "flags")


def analyse(table, heatmaps, *, seed: int = 0, n_neighbors: int = 10, grid=(16, 16),
            max_clusters: int = 8, projection: str = "auto", classes=None,
            attributes=None) -> tuple[dict, dict]:
    """Cluster the CAMs per predicted class, project them to 2-D, and gather statistics.

    Parameters
    ----------
    table : DataFrame with one row per image
        At least ``label``, ``pred``, ``correct``; the attention metrics (``inside_frac``,
        ``lift``, ``pointing_hit``) and the attribute columns are used where present.
    heatmaps : array-like of shape (n, h, w)
        Non-negative CAMs of the predicted class (``Scan.heatmaps``).
    seed : int
        Seeds k-means, ARPACK, the t-SNE / UMAP fit and its subsample: same seed, same output.
    n_neighbors : int
        k of the kNN graph (fewer for small classes, see ``_knn_size``).
    grid : pair of int
        Common grid the CAMs are resampled to before comparing them.
    max_clusters : int
        Largest number of clusters per class the eigengap may choose.
    projection : {"auto", "tsne", "umap", "pca", "none"}
        The 2-D map's method; ``auto`` is UMAP when importable, else t-SNE.
    classes : list of str, optional
        The dataset's class names in order (``scan.meta["classes"]``); fixes the order of
        classes and cluster ids. Default: sorted names from the table.
    attributes : list of str, optional
        Attribute columns for the group statistics. Default: ``table.attrs["attributes"]`` if
        set, else every non-core column (:func:`infer_attributes`).

    Returns
    -------
    columns : dict of str to ndarray, each of shape (n,)
        ``cluster`` (int64; globally unique ids, ``NO_CLUSTER`` (-1) for an all-zero CAM, which
        has no shape to cluster), ``embed_x``, ``embed_y`` (float64), ``cam_zero`` (bool).
    analysis : dict (JSON-serialisable)
        ``version``, ``params``, ``n``, ``grid``, ``n_zero_cams``, ``zero_cam_rows``,
        ``attributes``, ``classes`` (per labelled class: :func:`class_stats` plus, for the
        images *predicted* as the class, ``clustering``: method, k, n_neighbors, eigenvalues,
        eigengaps, cluster_ids, n_clustered), ``class_clusters`` (class -> cluster ids),
        ``clusters`` (a list indexed by cluster id: id, class, size, n_correct, accuracy,
        share_of_class, n_with_mask, mean_inside_frac, rest_mean_inside_frac,
        class_mean_inside_frac, mean_lift, centroid {x, y}, spread, hot_area, centroid_jitter,
        rest_mass_in_hot, mean_heatmap, examples: paths of the 10 members nearest the mean
        heatmap), ``groups`` (:func:`group_stats`),
        ``projection`` (method, n_fit, pca_dims).
    """
    _check_table(table, heatmaps)
    # One thread for OpenMP (t-SNE's gradient, k-means) and BLAS: their per-iteration barriers
    # make two threads on two cores several times *slower* as soon as anything else runs
    # (measured: 12-36 s instead of a steady 11 s for the 10,000-image analysis), and the
    # result no longer depends on the number of cores.
    # threadpoolctl only limits libraries already loaded: load scikit-learn's OpenMP runtime
    # and SciPy's BLAS first.
    import_dependencies()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _analyse(table, heatmaps, seed=seed, n_neighbors=n_neighbors, grid=grid,
                        max_clusters=max_clusters, projection=projection, classes=classes,
                        attributes=attributes)


def _analyse(table, heatmaps, *, seed, n_neighbors, grid, max_clusters, projection, classes,
             attributes):
    if n_neighbors < 1 or max_clusters < 1:
        raise BiasscopeError(f"n_neighbors and max_clusters must be >= 1, got {n_neighbors}, "
                             f"{max_clusters}")
    if attributes is None:
        attributes = list(table.attrs.get("attributes", infer_attributes(table)))
    maps, zero = normalise_cams(heatmaps, grid)
    n = len(table)
    H, W = maps.shape[1:]
    X = maps.reshape(n, -1)
    pred = table["pred"].astype(str).to_numpy()
    correct = table["correct"].to_numpy(dtype=bool)
    inside, lift = _col(table, "inside_frac"), _col(table, "lift")
    geo_all = heatmap_geometry(maps)  # per-image centre of mass, for the clusters' jitter
    paths = (table["path"].astype(str).to_numpy() if "path" in table.columns
             else np.array([f"#{i}" for i in range(n)], dtype=object))

    order = class_order(table, classes)
    stats = class_stats(table, classes)
    cluster = np.full(n, NO_CLUSTER, np.int64)
    clusters, class_clusters = [], {}
    for c in order:
        rows_all = np.flatnonzero(pred == c)
        rows = rows_all[~zero[rows_all]]
        res = cluster_class(X[rows], n_neighbors=n_neighbors, max_clusters=max_clusters, seed=seed)
        # Number clusters by size (largest first, ties by first row) so ids do not depend on
        # k-means' arbitrary label order.
        labs = res["labels"]
        uniq = np.unique(labs) if len(rows) else np.array([], np.int64)
        uniq = sorted(uniq, key=lambda u: (-int((labs == u).sum()), int(rows[labs == u][0])))
        ids = []
        class_if = _nanmean(inside[rows_all])
        for u in uniq:
            cid = len(clusters)
            members = rows[labs == u]
            cluster[members] = cid
            ids.append(cid)
            clusters.append(_describe_cluster(cid, c, members, rows, X, H, W, correct, inside,
                                              lift, class_if, paths, geo_all))
        class_clusters[c] = ids
        stats[c]["clustering"] = {
            "n_clustered": int(len(rows)), "n_fit": int(res.get("n_fit", len(rows))),
            "n_zero_cams": int(zero[rows_all].sum()),
            "method": res["method"], "k": int(len(ids)), "n_neighbors": res["n_neighbors"],
            "components": res["components"], "k_eigengap": res["k_eigengap"],
            "eigenvalues": res["eigenvalues"],
            "eigengaps": res["eigengaps"], "cluster_ids": ids, "reason": res["reason"],
        }

    xy, proj_info = project(X, seed=seed, method=projection)
    columns = {"cluster": cluster, "embed_x": xy[:, 0].astype(np.float64),
               "embed_y": xy[:, 1].astype(np.float64), "cam_zero": zero.copy()}
    analysis = {
        "version": ANALYSIS_VERSION,
        "params": {"seed": seed, "n_neighbors": n_neighbors, "grid": [H, W],
                   "max_clusters": max_clusters, "projection": projection},
        "n": n, "grid": [H, W], "n_zero_cams": int(zero.sum()),
        "zero_cam_rows": np.flatnonzero(zero).tolist(),
        "attributes": list(attributes),
        "classes": stats, "class_clusters": class_clusters, "clusters": clusters,
        "groups": group_stats(table, attributes), "projection": proj_info,
    }
    return columns, to_jsonable(analysis)


def _describe_cluster(cid, c, members, class_rows, X, H, W, correct, inside, lift, class_if,
                      paths, geo_all) -> dict:
    mean_map = X[members].mean(axis=0)
    geo = {k: float(v[0]) for k, v in heatmap_geometry(mean_map.reshape(1, H, W)).items()}
    # How much of the *rest* of the class's attention falls on this cluster's hot spot: near
    # 0.5 means the others look at the same place (e.g. objects that are always centred), near
    # 0 means the spot is this cluster's own.
    rest = np.setdiff1d(class_rows, members, assume_unique=True)
    rest_mass = None
    if len(rest):
        srt = np.argsort(-mean_map, kind="stable")
        n_hot = max(1, int(round(geo["hot_area"] * H * W))) if math.isfinite(geo["hot_area"]) else 0
        hot = srt[:n_hot]
        rest_mass = float(X[rest].mean(axis=0)[hot].sum())
    m_if = inside[members]
    # How far the members' own centres of mass scatter around the cluster's: near 0 when every
    # member looks at the same spot (a watermark), larger when the cluster merely gathers
    # objects that happen to lie in one region.
    dx = geo_all["cx"][members] - geo_all["cx"][members].mean()
    dy = geo_all["cy"][members] - geo_all["cy"][members].mean()
    jitter = float(np.sqrt(np.mean(dx ** 2 + dy ** 2)))
    return {
        "id": cid, "class": c, "size": int(len(members)),
        "share_of_class": _r(len(members) / max(1, len(class_rows))),
        "n_correct": int(correct[members].sum()), "accuracy": _r(correct[members].mean()),
        "n_with_mask": int(np.isfinite(m_if).sum()),
        "mean_inside_frac": _r(_nanmean(m_if)),
        "rest_mean_inside_frac": _r(_nanmean(inside[rest])) if len(rest) else None,
        "class_mean_inside_frac": _r(class_if),
        "mean_lift": _r(_nanmean(lift[members])),
        "centroid": {"x": _r(geo["cx"], 4), "y": _r(geo["cy"], 4)},
        "spread": _r(geo["spread"], 4), "hot_area": _r(geo["hot_area"], 4),
        "centroid_jitter": _r(jitter, 4),
        "rest_mass_in_hot": _r(rest_mass, 4),
        "mean_heatmap": [[_r(v, 5) for v in row] for row in mean_map.reshape(H, W)],
        # The members closest to the cluster's mean heatmap: its most typical images.
        "examples": [str(p) for p in paths[members[np.argsort(
            ((X[members] - mean_map) ** 2).sum(axis=1), kind="stable")[:10]]]],
    }


def fill_columns(table: pd.DataFrame, columns: dict) -> pd.DataFrame:
    """A copy of ``table`` with ``cluster`` (nullable Int32, NA for :data:`NO_CLUSTER`),
    ``embed_x`` and ``embed_y`` set from :func:`analyse`'s ``columns``."""
    out = table.copy()
    c = np.asarray(columns["cluster"])
    out["cluster"] = pd.array(np.where(c == NO_CLUSTER, None, c).tolist(), dtype="Int32")
    out["embed_x"] = np.asarray(columns["embed_x"], dtype=np.float64)
    out["embed_y"] = np.asarray(columns["embed_y"], dtype=np.float64)
    return out
