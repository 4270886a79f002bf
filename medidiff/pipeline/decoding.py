"""Isolated decoding: scans are decoded in a child Python process with a timeout.

A native codec that segfaults or hangs then fails that one scan instead of the whole batch. The child is a
plain ``python -c`` process speaking length-prefixed pickles on stdin/stdout (not multiprocessing), so it
works the same from the CLI, from pytest and inside a Ray actor.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import selectors
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any


class DecodeError(RuntimeError):
    """The scan could not be decoded (bad file, codec crash or timeout)."""


def _decode_in_child(source: Any, options: dict[str, Any] | None = None) -> tuple[str, Any]:
    """Runs in the decoding child: load the scan; errors come back as text (exceptions may not pickle)."""
    try:
        return "ok", source.load(**(options or {}))
    except Exception as exc:  # noqa: BLE001 - reported to the driver as the scan's error
        return "error", f"{type(exc).__name__}: {exc}" if not hasattr(exc, "problem") else str(exc)


def _decoder_child_main() -> None:
    """The decoding child: read length-prefixed pickled sources on stdin, answer pickled results on stdout.

    The protocol uses a private copy of stdout; anything a library prints goes to stderr instead.
    It exits when its parent closes stdin (including when the parent is killed). Ctrl-C reaches the whole
    process group: the child ignores SIGINT and leaves the stop to its parent, which closes or kills it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _serve()
    except (BrokenPipeError, KeyboardInterrupt):  # the parent went away mid-answer: nothing to report
        pass


def _serve() -> None:
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    while True:
        header = requests.read(8)
        if len(header) < 8:
            return
        (size,) = struct.unpack("<Q", header)
        source, options = pickle.loads(requests.read(size))
        result = _decode_in_child(source, options)
        try:
            payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001
            payload = pickle.dumps(("error", f"decoded scan could not be transferred ({type(exc).__name__})"))
        answers.write(struct.pack("<Q", len(payload)) + payload)
        answers.flush()


class IsolatedDecoder:
    """Decodes scans in a child Python process with a timeout; a codec crash or hang fails one scan only.

    The child is a plain ``python -c`` process (not multiprocessing), so it works the same from the CLI,
    from pytest and inside a Ray actor; it is reused across scans and restarted after a crash.

    :meth:`prefetch` sends a request without waiting, so the child decodes the next scan while the caller
    enhances the current one; :meth:`load` then reads that answer. Requests are answered in the order they
    were sent (a FIFO of pending requests); see :meth:`load` for what happens to answers nobody asks for.
    """

    def __init__(self, timeout_s: float = 300.0) -> None:
        self.timeout_s = timeout_s
        self._proc: Any = None
        # requests sent (or queued in _outbox) and not yet answered, oldest first: (source, options, sent at)
        self._pending: deque[tuple[Any, dict[str, Any], float]] = deque()
        self._outbox = bytearray()  # request bytes the child's stdin pipe has not taken yet
        self._answered_at = float("-inf")  # when the last answer was read: the child was free from then

    def _start(self) -> Any:
        if self._proc is None or self._proc.poll() is not None:
            self._kill()  # a child that died while idle: nothing was pending, nothing is lost
            self._proc = subprocess.Popen(
                [sys.executable, "-c",
                 "from medidiff.pipeline.decoding import _decoder_child_main as m; m()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            # requests are written without blocking: a request larger than the pipe must not stall the
            # caller (or deadlock it against a child that is writing a large answer nobody reads yet)
            os.set_blocking(self._proc.stdin.fileno(), False)
        return self._proc

    def _send(self, source: Any, options: dict[str, Any]) -> None:
        """Queue a request; the child gets it as soon as its stdin pipe takes the bytes."""
        payload = pickle.dumps((source, options), protocol=pickle.HIGHEST_PROTOCOL)
        if not self._pending:
            self._start()  # with requests pending, a dead child is found (and reported) when read from
        self._outbox += struct.pack("<Q", len(payload)) + payload
        self._pending.append((source, options, time.monotonic()))
        self._flush()

    def _flush(self) -> None:
        """Write what the child's stdin pipe takes now, without blocking."""
        fd = self._proc.stdin.fileno()
        while self._outbox:
            try:
                written = os.write(fd, self._outbox[: 1 << 20])
            except BlockingIOError:
                return
            except OSError:  # the child died: reading its answers finds out and reports which request
                self._outbox.clear()
                return
            del self._outbox[:written]

    def _find_pending(self, source: Any, options: dict[str, Any]) -> int | None:
        for index, (pending, pending_options, _) in enumerate(self._pending):
            if pending is source and pending_options == options:
                return index
        return None

    def _read_exactly(self, size: int, deadline: float) -> bytes:
        """Read ``size`` bytes of the answer stream, meanwhile passing queued request bytes to the child.

        An answer that is already there is read even after ``deadline`` (the caller may have been busy)."""
        out_fd, in_fd = self._proc.stdout.fileno(), self._proc.stdin.fileno()
        chunks, got = [], 0
        with selectors.DefaultSelector() as sel:
            sel.register(out_fd, selectors.EVENT_READ)
            writing = False
            while got < size:
                if bool(self._outbox) != writing:
                    writing = not writing
                    if writing:
                        sel.register(in_fd, selectors.EVENT_WRITE)
                    else:
                        sel.unregister(in_fd)
                events = sel.select(timeout=max(deadline - time.monotonic(), 0.0))
                if not events:
                    raise FutureTimeout()
                ready = {key.fd for key, _ in events}
                if in_fd in ready:
                    self._flush()
                if out_fd in ready:
                    chunk = os.read(out_fd, min(size - got, 1 << 22))
                    if not chunk:
                        raise BrokenPipeError()
                    chunks.append(chunk)
                    got += len(chunk)
        return b"".join(chunks)

    def _read_answer(self) -> tuple[str, Any]:
        """The answer to the oldest pending request (which is then no longer pending).

        Its deadline is ``timeout_s`` from when the child could start it: when it was sent, or when the
        answer before it was read, whichever is later. A crash or timeout kills the child, which drops every
        pending request, and raises ``DecodeError``."""
        _, _, sent_at = self._pending[0]
        deadline = max(sent_at, self._answered_at) + self.timeout_s
        try:
            (size,) = struct.unpack("<Q", self._read_exactly(8, deadline))
            status, value = pickle.loads(self._read_exactly(size, deadline))
        except FutureTimeout:
            self._kill()
            raise DecodeError(
                f"decoding did not finish within {self.timeout_s:.0f} s (decoder killed)"
            ) from None
        except (BrokenPipeError, EOFError, struct.error, pickle.UnpicklingError, OSError):
            code = self._kill()
            raise DecodeError(
                f"the decoder process crashed (exit status {code}; native codec failure?)"
            ) from None
        self._pending.popleft()
        self._answered_at = time.monotonic()
        return status, value

    def prefetch(self, source: Any, **options: Any) -> None:
        """Send the request for ``source.load(**options)`` now, without waiting: the child decodes it while
        the caller does other work, and :meth:`load` with the same source object and options reads the
        answer. Nothing happens if that request is already pending. Never raises: a source that cannot be
        sent (not picklable) is simply not prefetched, and its :meth:`load` reports the error."""
        if self._find_pending(source, options) is not None:
            return
        with contextlib.suppress(Exception):
            self._send(source, options)

    def load(self, source: Any, **options: Any) -> Any:
        """Return ``source.load(**options)`` computed in the child (e.g. ``allow_nonfinite=True``); raise
        ``DecodeError`` on failure, crash or timeout.

        If this source object was prefetched with the same options, its answer is used: answers are read in
        the order the requests were sent, and those of older requests (prefetched, never loaded) are
        discarded. If it was not prefetched while other requests are pending, the child is restarted
        first, dropping them (nobody waits for them; a later load of one sends it again). If an older
        request crashes or times out while its answer is being discarded, this source is sent again to a
        fresh child. After a crash or timeout of this source, every pending request is dropped.
        """
        if self._find_pending(source, options) is None:
            if self._pending:
                self._kill()
            self._send(source, options)
        while True:
            oldest, oldest_options, _ = self._pending[0]
            mine = oldest is source and oldest_options == options
            try:
                status, value = self._read_answer()
            except DecodeError:
                if mine:
                    raise
                self._send(source, options)  # killed by an older request: ours was dropped with it
                continue
            if mine:
                break
        if status != "ok":
            raise DecodeError(value)
        return value

    def _kill(self) -> int | None:
        """Kill the child (if any); every pending request is dropped."""
        proc, self._proc = self._proc, None
        self._pending.clear()
        self._outbox.clear()
        self._answered_at = float("-inf")
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(Exception):
                pipe.close()
        return code

    def close(self) -> None:
        """Stop the child process: it exits when its stdin closes (at once when idle); a busy one is
        terminated after a moment (a stopped batch must not wait for a decode nobody needs). With requests
        pending it is killed at once (they are dropped)."""
        if self._pending:
            self._kill()
            return
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout=2)
            except Exception:  # noqa: BLE001
                proc.kill()
                proc.wait()
            with contextlib.suppress(Exception):
                proc.stdout.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
