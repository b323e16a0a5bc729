"""Engines of the CAM pass and the counterfactual pass: who runs the per-batch kernel over the
images still to do.

``local`` (the default) runs it in this process; ``ray`` (:mod:`biasscope.engines.ray`, the
``[ray]`` extra) on Ray Data actors, one model each, one store chunk per work item. Both feed
the same :class:`~biasscope.store.ChunkWriter` in index order, so the stored scan, its resume
and its result do not depend on the engine (DESIGN section 11). The counterfactual pass is cut
into chunks of whole batches, each with its own pairing RNG
(:func:`biasscope.counterfactuals.run_chunk`): the local engine runs them one after another,
the Ray engine on its actors, with the same result. Ray is imported only by
``biasscope.engines.ray``, and that module only when ``engine="ray"`` is asked for.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from ..data import Dataset
from ..errors import BiasscopeError

ENGINES = ("local", "ray")


@dataclass
class PassJob:
    """What a CAM pass needs besides the live model: enough for a worker to rebuild the same
    CAM engine from the model file and run it over any rows of the dataset."""

    ds: Dataset
    geometry: tuple              # (H, W, C) of the model input
    batch_size: int
    chunk_size: int
    method: str
    cam_options: dict
    preprocess: object           # a name or a callable (shipped to workers by pickling)
    layer: str                   # the resolved target layer's path
    model_path: Path | None      # None: an in-memory model
    model_sha: str
    unsafe_model: bool


@dataclass
class PassStats:
    """Where a pass's time went and what the mask geometry check counted; summed over the
    workers of the Ray engine."""

    input_wait_s: float = 0.0
    gradcam_wait_s: float = 0.0
    postprocess_s: float = 0.0
    mask_resized: int = 0
    mask_aspect: int = 0
    aspect_examples: list = field(default_factory=list)
    traces: int = 0
    chunks_run: int = 0
    extra: dict = field(default_factory=dict)   # engine-specific timings (seconds)
    engine: dict = field(default_factory=dict)  # engine-specific facts for meta.json "engine"

    def merge(self, other: "PassStats") -> None:
        self.input_wait_s += other.input_wait_s
        self.gradcam_wait_s += other.gradcam_wait_s
        self.postprocess_s += other.postprocess_s
        self.mask_resized += other.mask_resized
        self.mask_aspect += other.mask_aspect
        self.aspect_examples.extend(other.aspect_examples[: max(0, 10 - len(self.aspect_examples))])
        self.traces = max(self.traces, other.traces)

    def to_dict(self) -> dict:
        return {"input_wait_s": self.input_wait_s, "gradcam_wait_s": self.gradcam_wait_s,
                "postprocess_s": self.postprocess_s, "mask_resized": self.mask_resized,
                "mask_aspect": self.mask_aspect, "aspect_examples": list(self.aspect_examples),
                "traces": self.traces, "chunks_run": self.chunks_run, "extra": dict(self.extra),
                "engine": dict(self.engine)}

    @classmethod
    def from_dict(cls, d: dict) -> "PassStats":
        return cls(**d)


def check_engine_options(engine: str, *, ray_address: str | None, workers: int | None,
                         gpus_per_worker: float | None) -> None:
    """One-line errors for engine options that cannot work, before anything is loaded; for
    ``ray``, also that Ray is installed."""
    if engine not in ENGINES:
        raise BiasscopeError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine != "ray":
        given = [name for name, v in (("--ray-address", ray_address), ("--workers", workers),
                                      ("--gpus-per-worker", gpus_per_worker or None)) if v is not None]
        if given:
            raise BiasscopeError(f"{', '.join(given)}: only for --engine ray (got --engine {engine})")
        return
    if workers is not None and int(workers) < 1:
        raise BiasscopeError(f"--workers must be >= 1, got {workers}")
    if gpus_per_worker is not None and float(gpus_per_worker) < 0:
        raise BiasscopeError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
    if ray_address is not None and not str(ray_address).strip():
        raise BiasscopeError("--ray-address is empty; give HOST:PORT of the Ray head, or leave it out "
                             "for a local Ray")
    from .ray import require_ray

    require_ray()


@contextlib.contextmanager
def open_engine(engine: str, *, ray_address: str | None = None, workers: int | None = None,
                gpus_per_worker: float | None = None, progress=None):
    """The engine, ready to run (``.info`` for meta.json, ``.run(job, ...)``): for ``ray``
    connected to the cluster (or a local Ray it started and shuts down on exit). Errors that
    make it unusable (no Ray answering, too few GPUs) are one-line BiasscopeErrors raised on
    entry, before the caller writes anything."""
    if engine == "ray":
        from .ray import RayEngine

        with RayEngine.connect(ray_address, workers=workers, gpus_per_worker=gpus_per_worker or 0.0,
                               progress=progress) as eng:
            yield eng
        return
    from .local import LocalEngine

    yield LocalEngine()
