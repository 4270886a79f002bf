"""Running the ``medidiff`` command from a notebook, as a user would in a terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence

_MLFLOW_LOG = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO (mlflow|alembic)")


class CommandError(RuntimeError):
    """A ``medidiff`` command run from a notebook failed.

    The message holds the command and its last output.
    """


def run_medidiff(
    args: Sequence[str], *, cwd: str | os.PathLike[str] | None = None, ok_codes: Iterable[int] = (0,),
    env: dict[str, str] | None = None, echo: bool = True, tail_lines: int = 40,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m medidiff ARGS`` as a user would and echo its output.

    Raises :class:`CommandError` on failure.
    """
    command = [sys.executable, "-m", "medidiff", *map(str, args)]
    # Plain text: no colours or animated progress bars (ipykernel sets FORCE_COLOR for its children), so an
    # executed notebook keeps the final tables, not thousands of redraws.
    full_env = {key: value for key, value in os.environ.items()
                if key not in ("FORCE_COLOR", "CLICOLOR_FORCE", "CLICOLOR")}
    full_env.update(
        {"COLUMNS": "120", "NO_COLOR": "1", "TTY_INTERACTIVE": "0", "TERM": "dumb", **(env or {})}
    )
    if echo:
        print("$ medidiff " + " ".join(map(str, args)), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if echo and not _MLFLOW_LOG.match(line):
            print(line, end="", flush=True)
    code = proc.wait()
    if echo:
        print(f"[{time.perf_counter() - start:.0f} s, exit status {code}]", flush=True)
    result = subprocess.CompletedProcess(command, code, "".join(lines), "")
    if code not in tuple(ok_codes):
        tail = "".join(lines[-tail_lines:])
        raise CommandError(f"`medidiff {' '.join(map(str, args))}` exited with status {code}:\n{tail}")
    return result
