"""The Ray engine (``--engine ray``, the ``[ray]`` extra): the CAM pass and the counterfactual
pass on Ray Data actors.

The driver (the ``scan`` process) makes one work item per store chunk still to do (chunk k is
rows ``[k * chunk_size, (k + 1) * chunk_size)``) and maps them with
``ray.data.from_items(items).map_batches(ChunkActor, batch_size=1, compute=ActorPoolStrategy(
size=workers))``. Each :class:`ChunkActor` loads the model once from its file, rebuilds the
same CAM engine and traces it once; per item it runs the local engine's batch loop
(:func:`biasscope.engines.local.run_batches`: the same pipeline, batch size and padding, the
same per-batch kernel) over its chunk's rows and returns the chunk's rows and heatmaps. The
driver buffers chunks that arrive out of order and feeds the scan's
:class:`~biasscope.store.ChunkWriter` in index order, so the store has the same layout and
resumes the same way as a local scan's: a killed driver resumes from its last whole chunk, on
either engine.

A killed worker: Ray Data creates its actors with ``max_restarts=-1`` and
``max_task_retries=-1`` unless told otherwise (``ActorPoolMapOperator.
_apply_default_remote_args`` in Ray 2.60; passing them to ``map_batches`` is deprecated there,
so they are left to that default, and ``tests/test_ray.py`` kills an actor to hold Ray to it).
Ray restarts the actor (its ``__init__`` runs again: the model is reloaded) and resubmits the
chunk it was working on; a chunk is a pure function of its rows, so a retried chunk is the same
chunk.

The counterfactual pass (:class:`RayCounterfactuals`, a ``runner`` of
:func:`biasscope.counterfactuals.run_counterfactuals`) works the same way: the driver plans
the rows (:func:`~biasscope.counterfactuals.plan_counterfactuals`, shipped to every actor) and
makes one work item per counterfactual chunk; each :class:`CounterfactualActor` loads the model
once, finds the target layer again by its path and compiles the three steps once; per item it
runs :func:`~biasscope.counterfactuals.run_chunk` (the local engine's code: the same padded
batches and the chunk's own pairing RNG) and returns the chunk's per-row arrays. The driver
keeps them by chunk index and aggregates them in chunk order, as the local engine does. A
killed actor is restarted and its chunk retried as above.

Files are read by path: the model file, the images and the masks must be readable at the same
paths on every node (a local Ray, or a shared file system). A model given as an object is saved
once to a temporary ``.keras`` file for the actors and removed afterwards.

Ray is imported here only, and this module only when the Ray engine is asked for.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from . import PassJob, PassStats
from ..errors import BiasscopeError

RAY_HINT = "--engine ray needs Ray: pip install 'biasscope[ray]'"
_CONNECT_TIMEOUT_S = 5.0


def require_ray():
    """The ``ray`` module with Ray Data, or the one-line install hint."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BiasscopeError(RAY_HINT) from None
    return ray


def _quiet_ray_logs() -> None:
    """Ray's notes about itself (a local Ray's auto-enabled token authentication, Ray Data's
    disabled progress bars: the scan shows its own) are not for the user of a scan; Ray's
    warnings and errors about the work still show."""
    for name in ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _check_reachable(address: str) -> None:
    """A HOST:PORT nobody listens on makes ``ray.init`` retry for minutes; one TCP connect
    (a few seconds at most) says so first. Other address forms (``auto``, ``ray://``) are left to
    Ray."""
    if "://" in address or address in ("auto", "local"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise BiasscopeError(f"--ray-address {address}: expected HOST:PORT of the Ray head "
                             "(its GCS port, 6379 by default)")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)),
                                      timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc) or type(exc).__name__)
        raise BiasscopeError(f"--ray-address {address}: no Ray answers there ({why.lower()}); "
                             "start one with `ray start --head` or leave out --ray-address for a "
                             "local Ray") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


class RayEngine:
    """The CAM pass on a Ray cluster (``--engine ray``)."""

    name = "ray"

    def __init__(self, ray, *, address, started: bool, workers: int, gpus_per_worker: float,
                 cpus_per_worker: float):
        self.ray, self.address, self.started = ray, address, started
        self.workers, self.gpus_per_worker, self.cpus_per_worker = workers, gpus_per_worker, cpus_per_worker

    @classmethod
    @contextlib.contextmanager
    def connect(cls, address: str | None, *, workers: int | None, gpus_per_worker: float = 0.0,
                progress=None):
        """Use the Ray this process is connected to, else connect to ``address`` (or
        ``RAY_ADDRESS``), else start a local Ray on this machine's CPUs, shut down on exit."""
        ray = require_ray()
        _quiet_ray_logs()
        started = False
        if ray.is_initialized() and address:
            _check_reachable(address)
            current = ray.get_runtime_context().gcs_address
            if address != "auto" and address.rpartition(":")[2] != str(current).rpartition(":")[2]:
                raise BiasscopeError(f"--ray-address {address}: this process is already connected to the "
                                     f"Ray at {current}; leave out --ray-address to use it, or scan "
                                     "from a new process")
        if not ray.is_initialized():
            addr = address or os.environ.get("RAY_ADDRESS") or None
            opts = dict(logging_level=logging.WARNING, log_to_driver=False, ignore_reinit_error=True)
            if addr:
                _check_reachable(addr)
                try:
                    ray.init(address=addr, **opts)
                except Exception as exc:  # ConnectionError, RuntimeError, ...: one line
                    raise BiasscopeError(f"--ray-address {addr}: cannot connect to Ray "
                                         f"({_first_line(exc)})") from None
            else:
                try:
                    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **opts)
                except Exception as exc:
                    raise BiasscopeError(f"cannot start a local Ray ({_first_line(exc)}); "
                                         "start one with `ray start --head` and pass --ray-address") from None
                started = True
        try:
            res = ray.cluster_resources()
            cpus, gpus = float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))
            gpw = float(gpus_per_worker or 0.0)
            if gpw > gpus:
                raise BiasscopeError(f"--gpus-per-worker {gpw:g}: the Ray cluster has {gpus:g} GPU(s)")
            n = int(workers) if workers else max(1, int(cpus))
            if not workers and gpw > 0:
                n = max(1, min(n, int(gpus // gpw)))
            # the actors share the cluster's CPUs; the work items need none (from_items)
            cpw = max(0.01, math.floor(100 * cpus / n) / 100) if cpus > 0 else 0.0
            eng = cls(ray, address=address, started=started, workers=n, gpus_per_worker=gpw,
                      cpus_per_worker=cpw)
            if progress is not None:
                where = address or ("a local Ray" if started else "the Ray this process is connected to")
                gpu = f", {gpw:g} GPU" if gpw else ""
                from rich.markup import escape

                progress.note(escape(f"ray: {n} worker(s) ({cpw:g} CPU{gpu} each) on {where}"))
            yield eng
        finally:
            if started:
                ray.shutdown()

    @property
    def info(self) -> dict:
        return {"name": "ray", "workers": self.workers, "address": self.address,
                "gpus_per_worker": self.gpus_per_worker, "cpus_per_worker": self.cpus_per_worker,
                "local_ray": self.started, "ray": getattr(self.ray, "__version__", None)}

    def label(self, method_label: str) -> str:
        return f"{method_label} (ray, {self.workers} worker{'s' if self.workers != 1 else ''})"

    def run(self, job: PassJob, cam, writer, task, reasons) -> PassStats:
        """The chunks from ``writer.next_chunk`` on, computed by the actors and stored in index
        order; ``task`` advances as chunks arrive."""
        n, cs = len(job.ds), int(job.chunk_size)
        first = writer.next_chunk
        items = [{"chunk": k, "lo": k * cs, "hi": min((k + 1) * cs, n)} for k in range(first, writer.n_chunks)]
        stats = PassStats()
        why: dict = {}

        def skip_reasons(indices):
            known = [why.get(int(i)) for i in indices]
            rest = [i for i, r in zip(indices, known) if r is None]
            more = iter(reasons(rest) if rest else [])
            return [r if r is not None else next(more) for r in known]

        t0 = time.perf_counter()
        if items:
            with _model_file(job.model_path, cam.model) as model_file:
                spec = {**self._model_spec(model_file, job.model_path, job.model_sha, job.unsafe_model),
                        "method": job.method, "cam_options": job.cam_options, "layer": job.layer,
                        "geometry": tuple(job.geometry), "batch_size": job.batch_size,
                        "preprocess": job.preprocess, "ds": job.ds}
                pending: dict = {}
                nxt, pids = first, set()
                wait = store = 0.0
                t = time.perf_counter()
                with self._mapped(items, ChunkActor, spec) as rows:
                    for row in rows:
                        wait += time.perf_counter() - t
                        k = int(row["chunk"])
                        pending[k] = row
                        task.advance(items[k - first]["hi"] - items[k - first]["lo"])
                        t = time.perf_counter()
                        while nxt in pending:
                            got = pending.pop(nxt)
                            cols, cam_p, cam_t, chunk_stats, chunk_why = unpack_chunk(got["data"])
                            why.update(chunk_why)
                            pids.add(int(got["pid"]))
                            if len(cols["index"]):
                                writer.add(cols, cam_p, cam_t, reasons=skip_reasons)
                            stats.merge(chunk_stats)
                            stats.chunks_run += 1
                            nxt += 1
                        store += time.perf_counter() - t
                        t = time.perf_counter()
                stats.extra = {"driver_wait_s": wait, "driver_store_s": store}
                stats.engine["actor_pids"] = sorted(pids)
        writer.close(skip_reasons)
        stats.extra["ray_pass_s"] = time.perf_counter() - t0
        return stats

    def _model_spec(self, model_file, model_path, model_sha, unsafe_model) -> dict:
        """What every actor needs to load the model (the sha is checked for a model file the
        scan read; a temporary file of an in-memory model has none) and its TensorFlow threads."""
        return {"model_file": str(model_file), "unsafe_model": unsafe_model,
                "model_sha": model_sha if model_path is not None else None,
                "threads": max(1, int(self.cpus_per_worker))}

    @contextlib.contextmanager
    def _mapped(self, items: list, actor_cls, spec: dict):
        """The rows ``actor_cls`` returns for ``items`` (one work item each, in whatever order
        they finish), on an actor pool of ``self.workers``; Ray Data's own progress bars and
        plan are off meanwhile (the scan shows its own) and an actor's BiasscopeError reaches
        the caller as itself."""
        ray = self.ray
        remote_args = {"num_gpus": self.gpus_per_worker} if self.gpus_per_worker else {}
        mapped = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            actor_cls, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=self.cpus_per_worker, fn_constructor_kwargs={"spec": spec}, **remote_args)
        ctx = ray.data.DataContext.get_current()
        saved = ctx.enable_progress_bars, ctx.print_on_execution_start
        ctx.enable_progress_bars = ctx.print_on_execution_start = False
        try:
            yield mapped.iter_rows()
        except Exception as exc:
            err = _biasscope_error(exc)
            if err is not None:
                raise BiasscopeError(err) from None
            raise
        finally:
            ctx.enable_progress_bars, ctx.print_on_execution_start = saved

    def counterfactuals(self, *, model, model_path, model_sha: str, unsafe_model: bool,
                        target_path: str | None) -> "RayCounterfactuals":
        """A ``runner`` for :func:`biasscope.counterfactuals.run_counterfactuals`: its chunks
        on this engine's actors."""
        return RayCounterfactuals(self, model=model, model_path=model_path, model_sha=model_sha,
                                  unsafe_model=unsafe_model, target_path=target_path)


class RayCounterfactuals:
    """The counterfactual pass's chunks on Ray Data actors (:class:`CounterfactualActor`, one
    model and one set of compiled steps each, one chunk per work item); the results are
    collected by chunk index, so the order they finish in does not matter."""

    def __init__(self, engine: RayEngine, *, model, model_path, model_sha: str, unsafe_model: bool,
                 target_path: str | None):
        self.engine, self.model, self.model_path = engine, model, model_path
        self.model_sha, self.unsafe_model, self.target_path = model_sha, unsafe_model, target_path
        self.chunks_run = 0
        self.actor_pids: list[int] = []
        self.elapsed_s: float | None = None

    @property
    def info(self) -> dict:
        e = self.engine
        return {"name": "ray", "workers": e.workers, "address": e.address,
                "gpus_per_worker": e.gpus_per_worker, "cpus_per_worker": e.cpus_per_worker,
                "local_ray": e.started, "chunks_run": self.chunks_run, "actor_pids": self.actor_pids,
                "ray_pass_s": self.elapsed_s}

    def __call__(self, plan, specs: list, task) -> dict:
        t0 = time.perf_counter()
        got: dict = {}
        pids: set = set()
        if specs:
            with _model_file(self.model_path, self.model) as model_file:
                spec = {**self.engine._model_spec(model_file, self.model_path, self.model_sha,
                                                  self.unsafe_model),
                        # pickled here, loaded in the actor once TensorFlow's threads are set
                        # (the plan's module imports TensorFlow)
                        "target": self.target_path, "plan": self.engine.ray.cloudpickle.dumps(plan)}
                with self.engine._mapped(specs, CounterfactualActor, spec) as rows:
                    for row in rows:
                        k = int(row["chunk"])
                        got[k] = unpack_arrays(row["data"])
                        pids.add(int(row["pid"]))
                        task.advance(specs[k]["hi"] - specs[k]["lo"])
        self.chunks_run, self.actor_pids = len(got), sorted(pids)
        self.elapsed_s = round(time.perf_counter() - t0, 3)
        return got


def _biasscope_error(exc: BaseException) -> str | None:
    """The message of a BiasscopeError raised inside an actor, or None. Ray keeps a task's
    exception as the cause of the error it raises, but an actor that died in ``__init__`` only
    as text (``ActorDiedError``: the remote traceback, ending in the exception's line)."""
    seen = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, BiasscopeError):
            return str(e)
        found = re.findall(r"biasscope\.errors\.BiasscopeError: (.+)", str(e))
        if found:
            return found[-1].strip()
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return None


@contextlib.contextmanager
def _model_file(model_path, model):
    """The model file the actors load: the scan's own, or a temporary ``.keras`` of an
    in-memory model (removed afterwards)."""
    if model_path is not None:
        yield Path(model_path).resolve()
        return
    tmp = Path(tempfile.mkdtemp(prefix="biasscope-ray-model-"))
    try:
        path = tmp / "model.keras"
        try:
            model.save(path)
        except Exception as exc:
            raise BiasscopeError(f"--engine ray: the in-memory model could not be saved for the "
                                 f"workers ({_first_line(exc)}); save it as .keras and scan the file") from None
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pack_chunk(cols: dict, cam_p: np.ndarray, cam_t: np.ndarray, stats: PassStats, why: dict) -> bytes:
    """One chunk's result as an .npz (no pickle): the columns, both heatmap stacks, the stats
    and the reasons of the rows the pipeline dropped."""
    buf = io.BytesIO()
    meta = json.dumps({"stats": stats.to_dict(), "why": {str(k): v for k, v in why.items()},
                       "cols": list(cols)})
    np.savez(buf, **{f"col_{i}": v for i, v in enumerate(cols.values())}, cam_p=cam_p, cam_t=cam_t,
             meta=np.frombuffer(meta.encode(), np.uint8))
    return buf.getvalue()


def unpack_chunk(blob) -> tuple[dict, np.ndarray, np.ndarray, PassStats, dict]:
    with np.load(io.BytesIO(bytes(blob)), allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        cols = {name: z[f"col_{i}"] for i, name in enumerate(meta["cols"])}
        cam_p, cam_t = z["cam_p"], z["cam_t"]
    why = {int(k): v for k, v in meta["why"].items()}
    return cols, cam_p, cam_t, PassStats.from_dict(meta["stats"]), why


def _start_tf(threads: int):
    """TensorFlow in an actor: ``threads`` intra- and inter-op threads (the actors share the
    machine's cores; set before TensorFlow starts where it has not yet), GPU memory grown on
    demand (actors sharing a GPU must not each take all of it)."""
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(threads))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from .._tf import import_tf

    tf = import_tf()
    with contextlib.suppress(RuntimeError):  # already initialised in this process
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    for gpu in tf.config.list_physical_devices("GPU"):
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)
    return tf


def _load_model_checked(spec: dict):
    """The model of ``spec["model_file"]``, refused if the file changed since the scan read it."""
    from ..model import load_model, model_fingerprint

    path = Path(spec["model_file"])
    if spec["model_sha"] is not None and model_fingerprint(None, path) != spec["model_sha"]:
        raise BiasscopeError(f"{path} changed since the scan began; run the scan again")
    return load_model(path, unsafe=spec["unsafe_model"])


def pack_arrays(arrays: dict | None) -> bytes:
    """Named numpy arrays as an .npz (no pickle); None as an empty one."""
    buf = io.BytesIO()
    np.savez(buf, **(arrays or {}))
    return buf.getvalue()


def unpack_arrays(blob) -> dict | None:
    with np.load(io.BytesIO(bytes(blob)), allow_pickle=False) as z:
        got = {k: z[k] for k in z.files}
    return got or None


class ChunkActor:
    """A Ray Data actor: one model and one traced CAM engine; one store chunk per call."""

    def __init__(self, spec: dict):
        _start_tf(int(spec["threads"]))
        from ..cams import make_cam
        from ..model import find_layer, output_head, target_layers

        model = _load_model_checked(spec)
        geometry = tuple(spec["geometry"])
        target = find_layer(model, spec["layer"], target_layers(model, geometry), input_shape=geometry)
        self.cam = make_cam(spec["method"], model, target, output_head(model), batch_size=spec["batch_size"],
                            input_shape=geometry, preprocess=spec["preprocess"], **spec["cam_options"])
        self.cam.trace()
        self.ds, self.geometry, self.batch_size = spec["ds"], geometry, int(spec["batch_size"])
        self.pid = os.getpid()

    def __call__(self, batch: dict) -> dict:
        from ..pipeline import make_pipeline, why_unreadable
        from .local import run_batches

        k, lo, hi = (int(batch[name][0]) for name in ("chunk", "lo", "hi"))
        H, W, C = self.geometry
        parts: list = []
        pipe = make_pipeline(self.ds, image_size=(H, W), channels=C, batch_size=self.batch_size,
                             start=lo, stop=hi)
        stats = run_batches(self.cam, pipe, self.ds, lambda *got: parts.append(got))
        if parts:
            cols = {name: np.concatenate([p[0][name] for p in parts]) for name in parts[0][0]}
            cam_p = np.concatenate([p[1] for p in parts])
            cam_t = np.concatenate([p[2] for p in parts])
        else:  # every image of the chunk undecodable: no rows (the writer records the gap)
            cols = {"index": np.zeros(0, np.int64)}
            cam_p = cam_t = np.zeros((0, *(int(s) for s in self.cam.target.shape[:2])), np.float32)
        files, masks = self.ds.table["file"].to_numpy(), self.ds.table["mask_file"].to_numpy()
        dropped = np.setdiff1d(np.arange(lo, hi), cols["index"])
        why = {int(i): why_unreadable(files[i], masks[i]) for i in dropped}
        blob = pack_chunk(cols, cam_p, cam_t, stats, why)
        return {"chunk": np.array([k]), "pid": np.array([self.pid]),
                "data": np.array([blob], dtype=object)}


class CounterfactualActor:
    """A Ray Data actor of the counterfactual pass: the model (loaded once, by path), its target
    layer (for the object embedding, found again by path) and the three compiled steps
    (:class:`biasscope.counterfactuals.CounterfactualSteps`); one chunk of the plan per call
    (:func:`biasscope.counterfactuals.run_chunk`)."""

    def __init__(self, spec: dict):
        _start_tf(int(spec["threads"]))
        from ..counterfactuals import CounterfactualSteps
        from ..model import find_layer, target_layers

        import pickle

        model = _load_model_checked(spec)
        self.plan = plan = pickle.loads(spec["plan"])
        geometry = (*plan.image_size, plan.channels)
        target = None
        if spec["target"] is not None:
            target = find_layer(model, spec["target"], target_layers(model, geometry), input_shape=geometry)
        self.steps = CounterfactualSteps(model, plan, target=target)
        self.pid = os.getpid()

    def __call__(self, batch: dict) -> dict:
        from ..counterfactuals import run_chunk

        k, lo, hi = (int(batch[name][0]) for name in ("chunk", "lo", "hi"))
        got = run_chunk(self.steps, self.plan, k, lo, hi)
        return {"chunk": np.array([k]), "pid": np.array([self.pid]),
                "data": np.array([pack_arrays(got)], dtype=object)}
