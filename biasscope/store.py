"""The stored scan: chunked writing as the scan goes, resume, final assembly, loading.

Layout (DESIGN section 4)::

    OUT/meta.json  scan.parquet  heatmaps.npy  heatmaps_true.npy  [analysis.json findings.json
    summary.json report.html]

While a scan runs, ``OUT/chunks/`` holds one file set per chunk of ``chunk_size`` consecutive
rows: ``heat-K.npy``, ``heat_true-K.npy``, ``skip-K.json`` and, written last as the commit
marker, ``rows-K.parquet``. A chunk without its parquet file never happened. No pickle anywhere.
No TensorFlow here: analysis and reports load scans without it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import BiasscopeError

SCHEMA_VERSION = 1
META = "meta.json"


def _atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary name and rename: a failed write (a full disk) never leaves a
    half file under the real name, and its temporary file is removed to give the space back."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_file(path, data: bytes | str, *, what: str | None = None) -> Path:
    """Write a user-facing output file (a report, a summary) atomically, creating its folder;
    an OSError becomes a one-line BiasscopeError ("cannot write [WHAT to] PATH: reason")."""
    out = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(out, lambda p: Path(p).write_bytes(raw))
    except OSError as exc:
        target = f"{what} to {out}" if what else str(out)
        raise BiasscopeError(f"cannot write {target}: {exc.strerror or exc}") from None
    return out


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(p):
        with open(p, "wb") as fh:  # a file object: np.save would append .npy to a bare name
            np.save(fh, arr, allow_pickle=False)

    _atomic_write_bytes(path, write)


def write_json(path: Path, obj, *, indent: int | None = 2) -> None:
    """``obj`` as JSON, atomically. ``indent=None``: compact, for the large per-image files
    (with an indent the json module takes its pure-Python encoder: a 10,000-image analysis.json
    is 4.4 MB and 0.17 s indented, 1.8 MB and 0.03 s compact)."""
    _atomic_write_bytes(Path(path), lambda p: Path(p).write_text(json.dumps(obj, indent=indent,
                                                                            default=_json_default)))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if np.isnan(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_table(out_dir, table: pd.DataFrame) -> None:
    _atomic_write_bytes(Path(out_dir) / "scan.parquet", lambda p: table.to_parquet(p, index=False))


def read_meta(out_dir) -> dict | None:
    p = Path(out_dir) / META
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class ChunkWriter:
    """Receives scan rows in index order and persists them a chunk at a time."""

    def __init__(self, out_dir: Path, *, n_total: int, chunk_size: int, heat_shape: tuple):
        self.dir = Path(out_dir) / "chunks"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n_total, self.chunk_size = int(n_total), int(chunk_size)
        self.heat_shape = tuple(heat_shape)
        self.n_chunks = -(-self.n_total // self.chunk_size)
        self.next_chunk = self.completed_chunks()
        self._cols: list[dict] = []
        self._heat: list[np.ndarray] = []
        self._heat_true: list[np.ndarray] = []

    def completed_chunks(self) -> int:
        k = 0
        while (self.dir / f"rows-{k:05d}.parquet").is_file():
            k += 1
        return k

    @property
    def start_index(self) -> int:
        return min(self.next_chunk * self.chunk_size, self.n_total)

    def add(self, cols: dict, heat: np.ndarray, heat_true: np.ndarray, *, reasons) -> None:
        """Buffer one batch and flush full chunks.

        ``cols`` maps column names to numpy arrays of equal length (2-D arrays become list
        columns); ``cols["index"]`` is ascending. ``reasons(indices) -> list[str]`` explains rows
        the pipeline dropped. Tables are only built per chunk: no pandas work per batch.
        """
        self._cols.append(cols)
        self._heat.append(heat.astype(np.float16))
        self._heat_true.append(heat_true.astype(np.float16))
        last = int(cols["index"][-1]) if len(cols["index"]) else -1
        while self.next_chunk < self.n_chunks and last >= (self.next_chunk + 1) * self.chunk_size - 1:
            self._flush(reasons)

    def close(self, reasons) -> None:
        while self.next_chunk < self.n_chunks:
            self._flush(reasons)

    def _flush(self, reasons) -> None:
        k = self.next_chunk
        hi = min((k + 1) * self.chunk_size, self.n_total)
        if self._cols:
            cols = {name: np.concatenate([c[name] for c in self._cols]) for name in self._cols[0]}
        else:
            cols = {"index": np.zeros(0, np.int64)}
        heat = np.concatenate(self._heat) if self._heat else np.zeros((0, *self.heat_shape), np.float16)
        heat_t = np.concatenate(self._heat_true) if self._heat_true else heat
        take = cols["index"] < hi
        lo = k * self.chunk_size
        skipped = np.setdiff1d(np.arange(lo, hi), cols["index"][take]).tolist()
        skip = [{"index": i, "reason": r} for i, r in zip(skipped, reasons(skipped))] if skipped else []
        _save_npy(self.dir / f"heat-{k:05d}.npy", heat[take])
        _save_npy(self.dir / f"heat_true-{k:05d}.npy", heat_t[take])
        write_json(self.dir / f"skip-{k:05d}.json", skip)
        frame = pd.DataFrame({name: list(v[take]) if v.ndim > 1 else v[take] for name, v in cols.items()})
        _atomic_write_bytes(self.dir / f"rows-{k:05d}.parquet", lambda p: frame.to_parquet(p, index=False))
        self._cols = [{name: v[~take] for name, v in cols.items()}]
        self._heat, self._heat_true = [heat[~take]], [heat_t[~take]]
        self.next_chunk += 1

    def assemble(self, out_dir: Path, base: pd.DataFrame) -> tuple[pd.DataFrame, list]:
        """Join the chunks into heatmaps*.npy and one table; returns (table, skipped).

        The caller writes the table (``write_table``) and then calls :meth:`cleanup`.
        """
        out_dir = Path(out_dir)
        parts = [pd.read_parquet(self.dir / f"rows-{k:05d}.parquet") for k in range(self.n_chunks)]
        rows = pd.concat(parts, ignore_index=True)
        skipped = []
        for k in range(self.n_chunks):
            skipped += json.loads((self.dir / f"skip-{k:05d}.json").read_text())
        for name, prefix in (("heatmaps.npy", "heat"), ("heatmaps_true.npy", "heat_true")):
            tmp = out_dir / (name + ".tmp.npy")
            try:
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                               shape=(len(rows), *self.heat_shape))
                at = 0
                for k in range(self.n_chunks):
                    h = np.load(self.dir / f"{prefix}-{k:05d}.npy")
                    mm[at:at + len(h)] = h
                    at += len(h)
                mm.flush()
                del mm
                os.replace(tmp, out_dir / name)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        idx = rows["index"].to_numpy()
        table = base.iloc[idx].reset_index(drop=True)
        table = pd.concat([table[["path", "label", "label_idx"]], rows.drop(columns=["index"]),
                           table.drop(columns=["path", "label", "label_idx"])], axis=1)
        table.insert(0, "index", idx)
        return table, skipped

    def cleanup(self) -> None:
        """Remove the chunks once the assembled table is safely written."""
        shutil.rmtree(self.dir)


def stored_rows(out_dir, *, chunk_size: int, n_total: int) -> int:
    """How many of the scan's ``n_total`` rows are safely stored in ``out_dir`` (all of them
    once the scan is assembled, else those of the committed chunks)."""
    out_dir = Path(out_dir)
    if (read_meta(out_dir) or {}).get("status") == "complete":
        return int(n_total)
    k = 0
    while (out_dir / "chunks" / f"rows-{k:05d}.parquet").is_file():
        k += 1
    return min(k * int(chunk_size), int(n_total))


LOCK = "scan.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class ScanLock:
    """``OUT/scan.lock`` holding the pid of the scan writing ``OUT``; a second scan into the
    same folder refuses while that process lives. A lock whose process is gone (killed,
    crashed machine) is stale and taken over; ``note`` says so.

    ``with ScanLock(out, note=print): ...`` releases it on every exit, errors and Ctrl-C
    included.
    """

    def __init__(self, out_dir, *, note=None):
        self.path = Path(out_dir) / LOCK
        self.note = note or (lambda msg: None)
        self.held = False

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = self._holder()
                if pid is not None and _pid_alive(pid):
                    raise BiasscopeError(f"another scan is running in {self.path.parent} (pid {pid}); "
                                         "wait for it or choose another --out") from None
                self.note(f"taking over the stale lock of a scan that is gone "
                          f"({'pid ' + str(pid) if pid is not None else 'unreadable'}): {self.path}")
                self.path.unlink(missing_ok=True)
                continue
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            except BaseException:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            os.close(fd)
            self.held = True
            return
        raise BiasscopeError(f"could not take the lock {self.path}; remove it if no scan is running")

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def release(self) -> None:
        if self.held and self._holder() == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "ScanLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class Scan:
    """A stored scan. ``table``: one row per image; ``heatmaps``: (N, h, w) float16 CAMs of the
    predicted class; ``heatmaps_true``: of the labelled class."""

    path: Path
    meta: dict
    table: pd.DataFrame
    heatmaps: np.ndarray
    heatmaps_true: np.ndarray
    findings: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    analysis: dict = field(default_factory=dict)

    @property
    def classes(self) -> list:
        return list(self.meta.get("classes", []))

    @property
    def accuracy(self) -> float:
        return float(self.table["correct"].mean()) if len(self.table) else float("nan")

    def write_report(self, path=None) -> Path:
        """Render the interactive HTML report (default ``SCAN_DIR/report.html``); returns its path."""
        from .report import write_report

        return write_report(self, path)

    def __repr__(self) -> str:
        return (f"Scan({str(self.path)!r}, n={len(self.table)}, layer={self.meta.get('layer')!r}, "
                f"accuracy={self.accuracy:.3f})")


def load(scan_dir) -> Scan:
    """Load a finished scan directory (no TensorFlow)."""
    d = Path(scan_dir)
    meta = read_meta(d)
    if meta is None:
        raise BiasscopeError(f"{d}: not a biasscope scan (no readable meta.json)")
    if meta.get("status") != "complete" or not (d / "scan.parquet").is_file():
        raise BiasscopeError(f"{d}: the scan is not finished; run `biasscope scan` again to resume it")
    if int(meta.get("schema_version", 0)) > SCHEMA_VERSION:
        raise BiasscopeError(f"{d}: written by a newer biasscope (schema {meta['schema_version']})")
    table = pd.read_parquet(d / "scan.parquet")
    heat = np.load(d / "heatmaps.npy", mmap_mode="r", allow_pickle=False)
    heat_t = np.load(d / "heatmaps_true.npy", mmap_mode="r", allow_pickle=False)

    def opt(name, default):
        p = d / name
        return json.loads(p.read_text()) if p.is_file() else default

    return Scan(path=d, meta=meta, table=table, heatmaps=heat, heatmaps_true=heat_t,
                findings=opt("findings.json", []), summary=opt("summary.json", {}),
                analysis=opt("analysis.json", {}))
