"""The Ray engine (``--engine ray``, biasscope/engines/ray.py) on a local 2-CPU Ray: the same
stored result as the local engine, a killed actor restarted and its chunk retried, a killed
driver resumed (on either engine), and one-line errors before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import biasscope
from biasscope import store
from biasscope.cli import app
from biasscope.errors import ScanInterrupted
from conftest import kill_once_stored, make_cnn, make_image_set
from test_cli import _one_line_error

ray = pytest.importorskip("ray")

runner = CliRunner()
BATCH, CHUNK = 8, 16
N_CHUNKS = 12                 # 192 images (one of them undecodable), 16 a chunk
SCAN = dict(batch_size=BATCH, chunk_size=CHUNK, progress=False, analysis=False)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray with 2 CPUs for the module (the scans reuse it); its GCS address."""
    if ray.is_initialized():
        pytest.skip("a Ray is already running in this process")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """192 images with masks, one of them (index 50, in chunk 3) undecodable; the model file;
    the local engine's result."""
    root = tmp_path_factory.mktemp("ray")
    ds = make_image_set(root / "data", n_per_class=64)
    (ds / "images" / "circle" / "circle_050.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    model = root / "m.keras"
    make_cnn().save(model)
    local = biasscope.scan(model, ds, out=root / "local", **SCAN)
    assert len(local.meta["skipped"]) == 1 and local.meta["engine"]["name"] == "local"
    return ds, model, local


def _same_result(got, want):
    pd.testing.assert_frame_equal(got.table, want.table, check_exact=False, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got.heatmaps, np.float32), np.asarray(want.heatmaps, np.float32),
                               atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.asarray(got.heatmaps_true, np.float32),
                               np.asarray(want.heatmaps_true, np.float32), atol=1e-3, rtol=0)
    assert got.meta["skipped"] == want.meta["skipped"]
    assert got.meta["warnings"] == want.meta["warnings"]
    assert got.meta["fingerprint"] == want.meta["fingerprint"] or got.meta["model"]["path"] is None


def _actors(name: str) -> dict:
    """The actors of class ``name`` Ray knows of, alive or dead: {actor id: record}."""
    from ray._private import state

    return {aid: a for aid, a in state.actors().items() if name in str(a.get("ActorClassName"))}


def _chunk_actors() -> dict:
    """The ChunkActors Ray knows of, alive or dead: {actor id: record}."""
    return _actors("ChunkActor")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return "\nState:\tZ" not in fh.read()
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_ray_equals_local_with_an_in_memory_model(cluster, data, tmp_path, monkeypatch):
    """Two actors on 2 CPUs, chunks arriving out of order, an in-memory model (saved once to a
    temporary .keras file the actors load, removed afterwards): the local engine's result."""
    ds, model, local = data
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    import keras

    got = biasscope.scan(keras.models.load_model(model), ds, out=tmp_path / "r", engine="ray", **SCAN)
    _same_result(got, local)
    eng = got.meta["engine"]
    assert eng["name"] == "ray" and eng["workers"] == 2 and eng["cpus_per_worker"] == 1.0
    assert eng["chunks_run"] == N_CHUNKS and len(eng["actor_pids"]) == 2 and not eng["local_ray"]
    assert got.meta["timings"]["gradcam_pass_s"] > 0 and got.meta["timings"]["traces"] == 1
    assert list(scratch.iterdir()) == []  # the temporary model file is gone
    assert ray.is_initialized()  # a Ray the scan did not start stays up


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_its_chunk_retried(cluster, data, tmp_path):
    ds, model, local = data
    out = tmp_path / "k"
    before = set(_chunk_actors())
    killed: dict = {}

    def kill_one_actor():
        """Once the first chunk is stored, SIGKILL the actor (11 chunks to go)."""
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "chunks" / "rows-00000.parquet").exists():
            time.sleep(0.005)
        alive = {aid: a for aid, a in _chunk_actors().items() if aid not in before and a["State"] == "ALIVE"}
        if alive and not (out / "scan.parquet").exists():
            aid, actor = sorted(alive.items())[0]
            killed.update(id=aid, pid=int(actor["Pid"]), was_alive=_alive(int(actor["Pid"])),
                          stored=len(list((out / "chunks").glob("rows-*.parquet"))))
            os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_one_actor)
    killer.start()
    try:
        got = biasscope.scan(model, ds, out=out, engine="ray", workers=1, **SCAN)
    finally:
        killer.join()
    assert killed.get("was_alive"), f"no actor was killed during the scan: {killed}"
    assert killed["stored"] < N_CHUNKS  # the kill came before the last chunk
    assert not _alive(killed["pid"])
    assert _chunk_actors()[killed["id"]]["NumRestarts"] >= 1  # Ray restarted the actor
    _same_result(got, local)
    assert got.meta["engine"]["chunks_run"] == N_CHUNKS


CF_CHUNK_BATCHES = 2  # the counterfactual pass in chunks of 2 batches: 192 rows, 12 chunks


@pytest.mark.slow
def test_the_counterfactual_pass_on_ray_equals_local_with_a_killed_actor(cluster, data, tmp_path,
                                                                         monkeypatch):
    """A complete scan's analysis redone on each engine (the CAM pass is not redone): the Ray
    engine runs the counterfactual chunks on two actors, one of them SIGKILLed once the first
    chunk is in (restarted, its chunk retried, chunks arriving out of order); the result equals
    the local engine's: the per-image arrays and class figures exactly, the object embeddings
    to float32 tolerance."""
    import shutil

    from biasscope import api, counterfactuals
    from biasscope.engines import ray as ray_engine

    ds, model, local = data
    monkeypatch.setattr(counterfactuals, "CHUNK_BATCHES", CF_CHUNK_BATCHES)
    embeddings: list = []
    real_embedding = api._object_embedding

    def keep_embedding(cf, table):
        embeddings.append(dict(cf["object_embedding"]))
        return real_embedding(cf, table)

    monkeypatch.setattr(api, "_object_embedding", keep_embedding)
    before = set(_actors("CounterfactualActor"))
    killed: dict = {}
    real_call = ray_engine.RayCounterfactuals.__call__

    def call_killing_one_actor(self, plan, specs, task):
        class Task:
            def advance(self, n):
                task.advance(n)
                alive = {aid: a for aid, a in _actors("CounterfactualActor").items()
                         if aid not in before and a["State"] == "ALIVE"}
                if alive and not killed:
                    aid, actor = sorted(alive.items())[0]
                    killed.update(id=aid, pid=int(actor["Pid"]), was_alive=_alive(int(actor["Pid"])))
                    os.kill(killed["pid"], signal.SIGKILL)
        return real_call(self, plan, specs, Task())

    monkeypatch.setattr(ray_engine.RayCounterfactuals, "__call__", call_killing_one_actor)
    opts = {**SCAN, "analysis": True, "report": False}
    results = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        shutil.copytree(local.path, out)
        t = time.perf_counter()
        biasscope.scan(model, ds, out=out, engine=engine, **opts)
        results[engine] = json.loads((out / "analysis.json").read_text())
        print(f"\nanalysis on the {engine} engine: {time.perf_counter() - t:.1f} s")
    want, got = (results[e]["counterfactuals"] for e in ("local", "ray"))
    assert want["method"]["chunks"]["n"] == N_CHUNKS and want["method"]["engine"] == {"name": "local"}
    eng = got["method"]["engine"]
    assert eng["name"] == "ray" and eng["workers"] == 2 and eng["chunks_run"] == N_CHUNKS
    assert results["ray"]["timings"]["counterfactuals_engine"] == "ray"
    assert killed.get("was_alive"), f"no actor was killed during the counterfactual pass: {killed}"
    assert not _alive(killed["pid"]) and _actors("CounterfactualActor")[killed["id"]]["NumRestarts"] >= 1
    assert got["n_with_mask"] == want["n_with_mask"] == 191  # one image undecodable
    for key in want["per_image"]:
        np.testing.assert_array_equal(got["per_image"][key], want["per_image"][key], err_msg=key)
    assert got["classes"] == want["classes"]
    (emb_local, emb_ray) = embeddings
    np.testing.assert_array_equal(emb_ray["index"], emb_local["index"])
    assert emb_ray["layer"] == emb_local["layer"]
    np.testing.assert_allclose(emb_ray["features"], emb_local["features"], rtol=1e-5, atol=1e-6)


RUNNER = textwrap.dedent("""
    import sys, biasscope
    biasscope.scan(sys.argv[1], sys.argv[2], out=sys.argv[3], engine="ray", ray_address=sys.argv[4],
                   workers=1, batch_size=%d, chunk_size=%d, progress=False, analysis=False)
""" % (BATCH, CHUNK))


def _flushes(monkeypatch) -> list:
    """Record the chunks a ChunkWriter of this process stores, with the first stored chunk's
    mtime when each is written."""
    seen: list = []
    real = store.ChunkWriter._flush

    def spy(self, reasons):
        first = self.dir / "rows-00000.parquet"
        seen.append((self.next_chunk, first.stat().st_mtime_ns if first.exists() else None))
        real(self, reasons)

    monkeypatch.setattr(store.ChunkWriter, "_flush", spy)
    return seen


@pytest.mark.slow
def test_a_killed_ray_driver_resumes_without_redoing_its_chunks(cluster, data, tmp_path, monkeypatch):
    """A Ray scan (a separate driver process on this Ray) SIGKILLed once two chunks are stored;
    the same scan again, here on the local engine (the engine is not part of the fingerprint),
    stores only the missing chunks and gives the local result."""
    ds, model, local = data
    out = tmp_path / "d"
    kill_once_stored(RUNNER, [model, ds, out, cluster], out / "chunks" / "rows-00001.parquet")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "running" and meta["engine"]["name"] == "ray"
    stored = len(list((out / "chunks").glob("rows-*.parquet")))
    assert 2 <= stored < N_CHUNKS
    mtime = (out / "chunks" / "rows-00000.parquet").stat().st_mtime_ns
    seen = _flushes(monkeypatch)
    got = biasscope.scan(model, ds, out=out, **SCAN)
    assert [k for k, _ in seen] == list(range(stored, N_CHUNKS))  # the stored chunks are not redone
    assert {m for _, m in seen} == {mtime}
    assert got.meta["timings"]["resumed_at"] == stored * CHUNK
    assert got.meta["engine"] == {**local.meta["engine"], "chunks_run": N_CHUNKS - stored}
    _same_result(got, local)


@pytest.mark.slow
def test_a_local_scan_resumes_on_ray(cluster, data, tmp_path, monkeypatch):
    """Interrupted on the local engine after 3 chunks, finished by one Ray actor."""
    ds, model, local = data
    out = tmp_path / "l"
    seen = _flushes(monkeypatch)
    real = store.ChunkWriter.add

    def add_until_three(self, *args, **kw):
        if len(seen) >= 3:
            raise KeyboardInterrupt
        real(self, *args, **kw)

    monkeypatch.setattr(store.ChunkWriter, "add", add_until_three)
    with pytest.raises(ScanInterrupted):
        biasscope.scan(model, ds, out=out, **SCAN)
    monkeypatch.setattr(store.ChunkWriter, "add", real)
    seen.clear()
    got = biasscope.scan(model, ds, out=out, engine="ray", workers=1, **SCAN)
    assert [k for k, _ in seen] == list(range(3, N_CHUNKS))
    assert got.meta["timings"]["resumed_at"] == 3 * CHUNK
    assert got.meta["engine"]["name"] == "ray" and got.meta["engine"]["chunks_run"] == N_CHUNKS - 3
    _same_result(got, local)


def test_bad_engine_options_are_one_line_errors_before_anything_is_written(cluster, tmp_path, monkeypatch):
    ds = make_image_set(tmp_path / "data", n_per_class=2)
    model = tmp_path / "m.keras"
    make_cnn().save(model)
    out = tmp_path / "o"
    base = ["scan", str(model), str(ds), "--out", str(out), "--no-report"]
    for extra, fragments in [
        (["--engine", "ray", "--ray-address", "127.0.0.1:1"], ["--ray-address 127.0.0.1:1", "no Ray answers"]),
        (["--engine", "ray", "--ray-address", "headnode"], ["--ray-address headnode: expected HOST:PORT"]),
        (["--engine", "ray", "--workers", "0"], ["--workers must be >= 1, got 0"]),
        (["--engine", "ray", "--gpus-per-worker", "-1"], ["--gpus-per-worker must be >= 0"]),
        (["--engine", "ray", "--gpus-per-worker", "1"], ["--gpus-per-worker 1: the Ray cluster has 0 GPU(s)"]),
        (["--ray-address", "127.0.0.1:6379"], ["--ray-address: only for --engine ray (got --engine local)"]),
        (["--engine", "local", "--workers", "2"], ["--workers: only for --engine ray"]),
    ]:
        _one_line_error(runner.invoke(app, base + extra), *fragments)
        assert not (out / "meta.json").exists(), extra
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    _one_line_error(runner.invoke(app, base + ["--engine", "ray"]),
                    "--engine ray needs Ray: pip install 'biasscope[ray]'")
    assert not (out / "meta.json").exists()


def test_ray_is_imported_only_by_the_ray_engine():
    code = ("import sys, biasscope, biasscope.cli, biasscope.api, biasscope.engines, biasscope.engines.local; "
            "print('ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_an_actors_biasscope_error_reaches_the_user_as_itself():
    """Ray keeps a task's exception as the cause; an actor that died in __init__ only as the
    remote traceback's text (ActorDiedError)."""
    from biasscope.engines.ray import _biasscope_error
    from biasscope.errors import BiasscopeError

    try:
        try:
            raise BiasscopeError("m.keras changed since the scan began")
        except BiasscopeError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as exc:
        assert _biasscope_error(exc) == "m.keras changed since the scan began"
    died = ray.exceptions.RayActorError(error_msg="The actor died because of an error raised in its creation "
                                        "task ...\n  File x\nbiasscope.errors.BiasscopeError: no layer 'x'\n")
    assert _biasscope_error(died) == "no layer 'x'"
    assert _biasscope_error(ValueError("other")) is None
