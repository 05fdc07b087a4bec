"""What every benchmark shares: the doc-section writer, the machine description, seed statistics and the worker pool.

Each benchmark owns one marked section of a markdown page (``<!-- NAME:start -->`` ... ``<!-- NAME:end -->``) and
rewrites only that (``write_section``); the prose around it is hand-written. Runs of several settings go through
``run_parallel`` (spawned processes of one torch thread each, results in job order); statistics over seeds use
``mean_std`` / ``median`` / ``bootstrap_ci``.
"""

from __future__ import annotations

import fcntl
import math
import os
import platform
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# --------------------------------------------------------------------------------------------------------
# The doc section a benchmark owns
# --------------------------------------------------------------------------------------------------------


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(path: str | os.PathLike, name: str, body: str, new_page: str = "# Performance\n") -> None:
    """Replace the text between ``name``'s markers in the markdown file ``path`` with ``body`` (the markers stay).

    A page without the markers gets the marked block appended; a missing page is created as ``new_page`` plus the
    block. Read-modify-write under an exclusive lock, so benchmarks writing the same page at once each keep the
    other's section."""
    start, end = markers(name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    block = f"{start}\n{body.strip(chr(10))}\n{end}"
    with open(path, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            text = f.read() or new_page
            if start in text and end in text:
                head, rest = text.split(start, 1)
                text = head + block + rest.split(end, 1)[1]
            else:
                text = text.rstrip("\n") + "\n\n" + block + "\n"
            f.seek(0)
            f.truncate()
            f.write(text)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_section(path: str | os.PathLike, name: str) -> str | None:
    """The text between ``name``'s markers (without them), or None when the page or the markers are missing."""
    start, end = markers(name)
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run, for the docs: ``python benchmarks/<script>`` and its arguments."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"benchmarks/{script}", *args])


# --------------------------------------------------------------------------------------------------------
# The machine a number was measured on
# --------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict:
    """CPU model, cores visible to this process, torch threads, library versions and the 1-minute load average."""
    import torch
    import transformers
    import trl

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "threads": torch.get_num_threads(),
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, trl {trl.__version__}",
        "load": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def machine_line() -> str:
    info = machine()
    return f"{info['cpu']}, {info['cores']} cores visible, {info['versions']}"


# --------------------------------------------------------------------------------------------------------
# Statistics over seeds / repeats
# --------------------------------------------------------------------------------------------------------


def finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of the finite values; (nan, nan) when there are none."""
    values = finite(values)
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def mean(values) -> float:
    """Mean of the finite values; nan when there are none."""
    return mean_std(values)[0]


def median(values) -> float | None:
    values = sorted(finite(values))
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def bootstrap_ci(statistic: Callable, samples: Sequence, resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(resampled samples)``, resampling the samples (seeds, repeats,
    or pairs of them) with replacement."""
    import numpy as np

    rng = np.random.default_rng(seed)
    samples = list(samples)
    draws = [statistic([samples[i] for i in rng.integers(0, len(samples), len(samples))]) for _ in range(resamples)]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


# --------------------------------------------------------------------------------------------------------
# Runs in parallel processes
# --------------------------------------------------------------------------------------------------------


def init_worker(threads: int = 1) -> None:
    """A benchmark worker: ``threads`` torch threads (one per run keeps two runs from fighting over 2 cores),
    quiet transformers."""
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_parallel(function: Callable, payloads: Sequence, workers: int, threads: int = 1) -> list:
    """``[function(p) for p in payloads]`` in ``workers`` spawned processes (in this process when ``workers`` <= 1),
    results in payload order. ``function`` must be importable (a module-level function)."""
    import multiprocessing

    if workers <= 1:
        init_worker(threads)
        return [function(p) for p in payloads]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=(threads,)) as pool:
        return list(pool.map(function, payloads))
