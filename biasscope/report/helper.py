"""A second process for the report's thumbnails, forked by the console script before TensorFlow.

Drawing the thumbnails is most of the report's time (1,200 of them: 1.4 s of 2.0-2.3 s at
10,000 images) and it runs when nothing else does: on 2 cores one of them idles. Threads do not
help (the overlays are numpy on 96-px arrays, which holds the GIL: 1.75-1.83 s with the rest of
the report in a second thread against 1.83-1.87 s one after the other), a second process does.
Forking after TensorFlow has started its thread pools is unsafe and spawning a fresh interpreter
costs about 0.5 s of imports, so :func:`start` forks one at the very start of the command line
(:func:`biasscope.cli.run`), while the process is small and has no threads but numpy's, and the
child waits on a pipe until a report asks it to draw a share of its thumbnails
(:meth:`Helper.submit`).

The child never outlives the command: it ends when the pipe closes (the parent exits, or gives up on
it: :meth:`Helper.close`) and, on Linux, the kernel kills it when the parent dies
(``PR_SET_PDEATHSIG``). Its standard streams are ``/dev/null`` and it ignores Ctrl-C (the
parent handles it). A library user (``import biasscope``) never gets one: without it, or when
it fails in any way, the report draws every thumbnail itself; the result is the same.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys

__all__ = ["Helper", "current", "start"]

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

    def submit(self, jobs: list, size: int) -> bool:
        """Send ``jobs`` (``(row, file, cam, cam_true, mask)`` tuples) to be drawn at ``size``;
        False when the helper cannot take them (the caller draws them itself)."""
        if self._pending or not self.alive:
            return False
        try:
            _send(self._to, (jobs, size))
        except OSError:
            self.close()
            return False
        self._pending = True
        return True

    def result(self) -> dict | None:
        """``{row: uris}`` for the submitted jobs, or None when the helper failed."""
        if not self._pending:
            return None
        self._pending = False
        try:
            status, payload = _recv(self._from)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError):
            self.close()
            return None
        return dict(payload) if status == "ok" else None

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


def start() -> Helper | None:
    """Fork the helper (once per process; Linux only); returns it, or None where there is none."""
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
            _child(parent, req_r, res_w)
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


def _child(parent: int, req: int, res: int) -> None:
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
    from .thumbnails import render_one

    while True:
        try:
            jobs, size = _recv(req)
        except EOFError:
            return
        try:
            out = [(r, render_one(file, cam, cam_t, mask, size)) for r, file, cam, cam_t, mask in jobs]
            _send(res, ("ok", out))
        except Exception as exc:  # the parent draws them itself
            _send(res, ("error", repr(exc)))


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
