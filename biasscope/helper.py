"""A second process, forked by the console script before TensorFlow, for the work that would
otherwise compete for the GIL or run while a core idles.

Two kinds of request:

* ``"analyse"``: :func:`biasscope.analysis.analyse` (the clusters and the 2-D map), which the
  scan runs alongside its counterfactual pass. In a thread of the scan's process its Python
  holds the GIL that the counterfactual pass's dispatch loop needs; in this process it does
  not (five interleaved pairs of 10,000-image jobs: counterfactuals 1.15-1.19x the CAM pass,
  against 1.12-1.37x in a thread). The helper imports what the analysis needs (scikit-learn,
  SciPy) as soon as it is forked, while the parent imports TensorFlow on the other core.
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

__all__ = ["Helper", "current", "heatmaps_ref", "resolve_heatmaps", "start"]

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
        cam_true, mask)`` tuples, drawn at ``size``) or ``"analyse"`` with ``((table,
        heatmaps), kwargs)`` of :func:`biasscope.analysis.analyse` (``heatmaps`` as
        :func:`heatmaps_ref` gives them). False when the helper cannot take it (another
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
        """The submitted request's result (thumbnails: ``[(row, uris), ...]``; analyse: what
        :func:`~biasscope.analysis.analyse` returns), or None when the helper failed."""
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


_HANDLERS = {"thumbnails": _thumbnails, "analyse": _analyse}


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
