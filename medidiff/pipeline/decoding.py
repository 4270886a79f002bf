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
    """

    def __init__(self, timeout_s: float = 300.0) -> None:
        self.timeout_s = timeout_s
        self._proc: Any = None

    def _start(self) -> Any:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-c",
                 "from medidiff.pipeline.decoding import _decoder_child_main as m; m()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        return self._proc

    def _read_exactly(self, size: int, deadline: float) -> bytes:
        fd = self._proc.stdout.fileno()
        chunks, got = [], 0
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while got < size:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(timeout=remaining):
                    raise FutureTimeout()
                chunk = os.read(fd, min(size - got, 1 << 22))
                if not chunk:
                    raise BrokenPipeError()
                chunks.append(chunk)
                got += len(chunk)
        return b"".join(chunks)

    def load(self, source: Any, **options: Any) -> Any:
        """Return ``source.load(**options)`` computed in the child (e.g. ``allow_nonfinite=True``); raise
        ``DecodeError`` on failure, crash or timeout."""
        proc = self._start()
        payload = pickle.dumps((source, options), protocol=pickle.HIGHEST_PROTOCOL)
        deadline = time.monotonic() + self.timeout_s
        try:
            proc.stdin.write(struct.pack("<Q", len(payload)) + payload)
            proc.stdin.flush()
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
        if status != "ok":
            raise DecodeError(value)
        return value

    def _kill(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        return proc.wait()

    def close(self) -> None:
        """Stop the child process: it exits when its stdin closes (at once when idle); a busy one is
        terminated after a moment (a stopped batch must not wait for a decode nobody needs)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout=2)
            except Exception:  # noqa: BLE001
                proc.kill()
                proc.wait()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
