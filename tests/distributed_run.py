"""Run a script under ``torchrun`` (CPU processes, gloo) from a test, and tell a failed run from a failed exit.

Why not plain ``subprocess.run(..., timeout=...)``: on a timeout it kills torchrun only, and torchrun starts each
rank in a session of its own, so hung ranks outlived the test; and a failure's output went to the middle of a
long pytest log. Here a hung run's ranks first get SIGABRT, on which Python's faulthandler prints
where every thread of every process was, then everything is killed, and the error carries the end of the output.

gloo's teardown on CPU is not reliable in torch 2.13 (docs/launching.md has the numbers); the scripts and recipes
end with ``trl_kl.distributed.end_distributed``. Should a run whose work is verifiably done (``finished``) still fail or
hang on its way out past ``exit_grace`` seconds, the test reports a warning, with the stacks, and goes on to check
its results: what it checks is the work, and a hung exit costs ``exit_grace``, not ``timeout``.
"""

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

NOISE = ("FutureWarning", "warnings.warn(", "it/s]")


def torchrun(
    args: list[str],
    log: Path,
    *,
    finished: Callable[[], bool],
    nproc: int = 2,
    timeout: float = 300,
    exit_grace: float = 30,
    cwd=None,
) -> str:
    """``python -m torch.distributed.run --standalone --nproc_per_node nproc *args``; returns its output (also
    written to ``log``). Raises AssertionError, with the stacks and the end of the output, when it fails or runs
    past ``timeout`` seconds before ``finished()`` is true. Once ``finished()`` is true the processes have
    ``exit_grace`` seconds to exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    with open(log, "w+") as out:
        launcher = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        hung = _wait(launcher, finished, timeout, exit_grace)
        if hung:
            _stop(launcher)
        out.seek(0)
        output = out.read()
    if launcher.returncode == 0 and not hung:
        return output
    failure = f"torchrun {'hung' if hung else f'exited with {launcher.returncode}'}"
    report = _report(output)
    if finished():
        warnings.warn(f"{failure} after the work was done (gloo teardown):\n{report}", stacklevel=2)
        return output
    raise AssertionError(f"{failure}: {' '.join(cmd)}\n(full output: {log})\n{report}")


def _report(output: str, tail: int = 30) -> str:
    """The Python stacks faulthandler printed (where each thread of each process was), then the last lines."""
    lines = [line for line in output.splitlines() if line.strip() and not any(n in line for n in NOISE)]
    stacks, inside = [], False
    for line in lines:
        inside = (inside or line.startswith("Fatal Python error")) and not line.startswith("Extension modules")
        if inside:
            stacks.append(line)
    return "\n".join([*stacks, "--- output ends:", *lines[-tail:]])


def _wait(launcher: subprocess.Popen, finished: Callable[[], bool], timeout: float, exit_grace: float) -> bool:
    """Whether the run hung: still running after ``timeout`` s, or ``exit_grace`` s after its work was done."""
    start, done_at = time.monotonic(), None
    while launcher.poll() is None:
        now = time.monotonic()
        if done_at is None and finished():
            done_at = now
        if now - start > timeout or (done_at is not None and now - done_at > exit_grace):
            return True
        time.sleep(0.2)
    return False


def _stop(launcher: subprocess.Popen) -> None:
    """Stacks of the ranks, one at a time so they don't interleave (SIGABRT: faulthandler prints them; torchrun
    is paused meanwhile, or it would kill the other ranks first), then kill them all."""
    os.kill(launcher.pid, signal.SIGSTOP)
    ranks = _children(launcher.pid)
    for pid in ranks:
        _signal(pid, signal.SIGABRT)
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    for pid in ranks:
        _signal(pid, signal.SIGKILL)
    launcher.kill()
    launcher.wait()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (paused) parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # fields after "(comm)": state, ppid, ...
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            children.append(int(stat.parent.name))
    return children

