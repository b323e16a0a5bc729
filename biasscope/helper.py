"""A second process, forked by the console script before TensorFlow, for the work that would
otherwise compete for the GIL or run while a core idles.

Three kinds of request:

* ``"analyse"``: :func:`biasscope.analysis.analyse` (the clusters and the 2-D map), which the
  scan runs alongside its counterfactual pass. In a thread of the scan's process its Python
  holds the GIL that the counterfactual pass's dispatch loop needs; in this process it does
  not (five interleaved pairs of 10,000-image jobs: counterfactuals 1.15-1.19x the CAM pass,
  against 1.12-1.37x in a thread). The helper imports what the analysis needs (scikit-learn,
  SciPy) as soon as it is forked, while the parent imports TensorFlow on the other core.
* ``"findings"``: the detectors (:func:`biasscope.findings.detect`), after the counterfactual
  pass. With them here, the parent never needs scikit-learn or SciPy's statistics, so the
  command line does not let TensorFlow and Keras import them (``biasscope._tf``): 0.6-0.7 s
  less before the CAM pass begins. The helper has imported them while the parent imported
  TensorFlow.
* ``"thumbnails"``: a share of the report's thumbnails (:mod:`biasscope.report.thumbnails`).
  Drawing them is most of the report's time (1,200 of them: 1.4 s of 2.0-2.3 s at 10,000
  images) and it runs when nothing else does: on 2 cores one of them idles. Threads do not
  help (the overlays are numpy on 96-px arrays, which holds the GIL: 1.75-1.83 s with the rest
  of the report in a second thread against 1.83-1.87 s one after the other).

Forking after TensorFlow has started its thread pools is unsafe and spawning a fresh interpreter
costs about 0.5 s of imports, so :func:`start` forks one at the very start of the command line
(:func:`biasscope.cli.run`), while the process is small and has no threads but numpy's, and the
child waits on a pipe for requests (:meth:`Helper.submit`), one at a time.

The child never outlives the command: it ends when the pipe closes (the parent exits, or gives up on
it: :meth:`Helper.close`) and, on Linux, the kernel kills it when the parent dies
(``PR_SET_PDEATHSIG``). Its standard streams are ``/dev/null`` and it ignores Ctrl-C (the
parent handles it). A library user (``import biasscope``) never gets one: without it, or when
it fails in any way, the work is done in the parent; the result is the same.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys

__all__ = ["Helper", "current", "heatmaps_ref", "pack_frame", "resolve_heatmaps", "start", "unpack_frame"]

_HEADER = struct.Struct("<Q")
_helper: Helper | None = None


class Helper:
    """The parent's end: one request at a time (``submit``, then ``result``)."""

    def __init__(self, pid: int, to_child: int, from_child: int):
        self.pid, self._to, self._from = pid, to_child, from_child
        self._pending = False

    @property
    def alive(self) -> bool:
        if self._to < 0:
            return False
        try:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return done == 0

    def submit(self, kind: str, payload) -> bool:
        """Send a request: ``"thumbnails"`` with ``(jobs, size)`` (``jobs``: ``(row, file, cam,
        cam_true, mask)`` tuples, drawn at ``size``), ``"analyse"`` with ``((table,
        heatmaps), kwargs)`` of :func:`biasscope.analysis.analyse` (``heatmaps`` as
        :func:`heatmaps_ref` gives them) or ``"findings"`` with ``(ctx_args, maps)`` of
        :func:`biasscope.findings.detect` (the table as :func:`pack_frame` gives it, each
        map as :func:`heatmaps_ref` gives it). False when the helper cannot take it (another
        request is under way, or it is gone): the caller then does the work itself."""
        if self._pending or not self.alive:
            return False
        try:
            _send(self._to, (kind, payload))
        except OSError:
            self.close()
            return False
        self._pending = True
        return True

    def result(self):
        """The submitted request's result (thumbnails: ``[(row, uris), ...]``; analyse and
        findings: what :func:`~biasscope.analysis.analyse` and
        :func:`~biasscope.findings.detect` return), or None when the helper failed."""
        if not self._pending:
            return None
        self._pending = False
        try:
            status, payload = _recv(self._from)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError):
            self.close()
            return None
        return payload if status == "ok" else None

    def close(self) -> None:
        for fd in (self._to, self._from):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._to = self._from = -1
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def start(*, analysis: bool = False) -> Helper | None:
    """Fork the helper (once per process; Linux only); returns it, or None where there is none.
    ``analysis``: the child imports what :func:`biasscope.analysis.analyse` needs at once (the
    commands that scan)."""
    global _helper
    if _helper is not None or not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return _helper
    req_r, req_w = os.pipe()
    res_r, res_w = os.pipe()
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        for fd in (req_r, req_w, res_r, res_w):
            os.close(fd)
        return None
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(req_w)
            os.close(res_r)
            _child(parent, req_r, res_w, analysis)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(req_r)
    os.close(res_w)
    _helper = Helper(pid, req_w, res_r)
    return _helper


def current() -> Helper | None:
    """The helper of this process, if it has a live one."""
    return _helper if _helper is not None and _helper.alive else None


def _child(parent: int, req: int, res: int, analysis: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the line above
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if analysis:
        from .analysis import import_dependencies

        import_dependencies()
    while True:
        try:
            kind, payload = _recv(req)
        except EOFError:
            return
        try:
            _send(res, ("ok", _HANDLERS[kind](payload)))
        except Exception as exc:  # the parent does the work itself
            _send(res, ("error", repr(exc)))


def _thumbnails(payload) -> list:
    from .report.thumbnails import render_one

    jobs, size = payload
    return [(r, render_one(file, cam, cam_t, mask, size)) for r, file, cam, cam_t, mask in jobs]


def heatmaps_ref(heatmaps):
    """What to send for ``heatmaps``: the path of the stored ``.npy`` file they are mapped from
    (the helper maps it too: nothing copied, 128 MB at 1,000,000 images), else the array."""
    import numpy as np

    name = getattr(heatmaps, "filename", None) if isinstance(heatmaps, np.memmap) else None
    return ("npy", str(name)) if name else np.asarray(heatmaps)


def resolve_heatmaps(ref):
    """The array :func:`heatmaps_ref` stands for."""
    import numpy as np

    if isinstance(ref, tuple) and len(ref) == 2 and ref[0] == "npy":
        return np.load(ref[1], mmap_mode="r", allow_pickle=False)
    return ref


def _analyse(payload):
    from .analysis import analyse

    (table, heatmaps), kwargs = payload
    return analyse(table, resolve_heatmaps(heatmaps), **kwargs)


def pack_frame(table, drop=()):
    """What to send for a table: without the columns ``drop``, and each column of 1-D arrays of
    one length and dtype (``top5``, ``top5_prob``) as one 2-D array (pickling 10,000 small
    arrays one by one costs 0.05 s a column). :func:`unpack_frame` restores it."""
    import numpy as np

    table = table.drop(columns=[c for c in drop if c in table.columns])
    packed = {}
    for c in table.columns:
        if table[c].dtype != object or not len(table):
            continue
        cells = table[c].to_numpy()
        first = cells[0]
        if not (isinstance(first, np.ndarray) and first.ndim == 1 and all(
                isinstance(v, np.ndarray) and v.shape == first.shape and v.dtype == first.dtype for v in cells)):
            continue
        packed[c] = np.stack(cells)
    return table.drop(columns=list(packed)), packed, list(table.columns)


def unpack_frame(sent):
    """The table :func:`pack_frame` packed: each packed column's cells as rows of its array."""
    import pandas as pd

    table, packed, columns = sent
    if not packed:
        return table
    table = table.copy()
    for c, arr in packed.items():
        table[c] = pd.Series(list(arr), index=table.index, dtype=object)
    return table[columns]


def _findings(payload):
    from .findings import detect

    ctx_args, maps = payload
    ctx_args = {**ctx_args, "table": unpack_frame(ctx_args["table"])}
    return detect(ctx_args, {k: (None if ref is None else resolve_heatmaps(ref), peaks)
                             for k, (ref, peaks) in maps.items()})


_HANDLERS = {"thumbnails": _thumbnails, "analyse": _analyse, "findings": _findings}


def _send(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _recv(fd: int):
    (n,) = _HEADER.unpack(_read(fd, _HEADER.size))
    return pickle.loads(_read(fd, n))


def _read(fd: int, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = os.read(fd, min(n - got, 1 << 20))
        if not b:
            raise EOFError("the other end closed the pipe")
        parts.append(b)
        got += len(b)
    return b"".join(parts)
