"""Crash-safe checkpoints: a checkpoint counts once all of it is on disk (docs/reliability.md#checkpoints).

transformers 5.24 writes a checkpoint's files one after another into ``checkpoint-N`` (weights, optimizer,
scheduler, RNG states, ``trainer_state.json``), then deletes older checkpoints (``save_total_limit``). Nothing
marks a checkpoint as finished: ``get_last_checkpoint`` takes the highest step whatever it holds, and a missing
optimizer or RNG file is skipped on resume without a word. A kill during a save therefore leaves a newest
checkpoint that resumes onto partial state, and, with ``save_total_limit``, no older one to fall back on.

trl_kl marks completeness itself: every process writes its files (transformers' and trl_kl's own state), then,
after a barrier, the main process writes the manifest ``trl_kl_checkpoint.json`` last and atomically (temporary
file, fsync, rename): each file of the checkpoint with its size, the trainer, its batch settings. A checkpoint is
*complete* when its manifest exists and every file it lists is there with that size. Only then does trl_kl rotate
(transformers' rotation is switched off during the save): it keeps the newest ``save_total_limit`` complete
checkpoints and always the one just written, so the last complete checkpoint is never deleted. (Writing into a
temporary folder renamed at the end would do too, but transformers derives the folder from the step in several
places, including the best-model bookkeeping, and several processes write into it; the manifest needs no change
to where anything is written.)

The functions here are pure file-system logic; ``trl_kl.reliability`` calls them from the trainers' hooks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

from ._trl import PREFIX_CHECKPOINT_DIR

MANIFEST = "trl_kl_checkpoint.json"
"""The file whose presence (with every file it lists intact) marks a checkpoint complete. Written last."""
_CHECKPOINT = re.compile(rf"^{re.escape(PREFIX_CHECKPOINT_DIR)}-(\d+)$")
"""transformers' checkpoint folders, ``checkpoint-<step>`` (``trl_kl._trl``, entry 6)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: incomplete, missing trl_kl's state, or other batch settings."""


def checkpoint_step(path: str) -> int | None:
    """The step of a ``checkpoint-N`` folder (None for other names)."""
    match = _CHECKPOINT.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str) -> list[str]:
    """``checkpoint-N`` folders of ``run_dir``, by step (oldest first)."""
    if not os.path.isdir(run_dir):
        return []
    found = [os.path.join(run_dir, name) for name in os.listdir(run_dir) if _CHECKPOINT.match(name)]
    return sorted((p for p in found if os.path.isdir(p)), key=checkpoint_step)


def _files(folder: str) -> dict[str, int]:
    """Every file under ``folder`` (relative path with '/' separators -> size), the manifest and its temp excluded."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if not rel.startswith(MANIFEST):
                out[rel] = os.path.getsize(path)
    return out


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: str, info: dict | None = None, sync: bool = True) -> dict:
    """Mark ``folder`` complete: list its files and sizes (plus ``info``) in ``MANIFEST``, written atomically.
    With ``sync`` the files are flushed to disk first, so the manifest never survives a power loss its files did
    not. Returns the manifest."""
    files = _files(folder)
    if sync:
        for rel in files:
            _fsync(os.path.join(folder, rel))
    manifest = {"format": 1, "written_at": time.time(), **(info or {}), "files": files}
    temp = os.path.join(folder, f"{MANIFEST}.tmp")
    with open(temp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, os.path.join(folder, MANIFEST))
    if sync:
        _fsync(folder)  # the rename itself
    return manifest


def read_manifest(folder: str) -> dict | None:
    """The manifest of ``folder``, or None when there is none (or it is unreadable: never complete)."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def checkpoint_problems(folder: str, required: list[str] = ()) -> list[str]:
    """Why ``folder`` cannot be resumed from (empty: it can). ``required``: relative paths the resuming trainer
    needs (its own state; a path ending in '/' is a folder that must hold at least one listed file)."""
    if not os.path.isdir(folder):
        return [f"{folder} does not exist"]
    manifest = read_manifest(folder)
    if manifest is None:
        return [
            f"it has no {MANIFEST}, which trl_kl writes last: the save did not finish (the process was killed or "
            "failed while writing it), or the checkpoint was not written by trl_kl"
        ]
    problems = []
    for rel, size in manifest["files"].items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            problems.append(f"{rel} is missing")
        elif os.path.getsize(path) != size:
            problems.append(f"{rel} has {os.path.getsize(path)} bytes, {size} when it was saved")
    if manifest.get("model_only"):
        problems.append("it holds only the model (save_only_model=True): no optimizer, scheduler or RNG state to resume")
    listed = manifest["files"]
    for rel in required:
        present = any(f.startswith(rel) for f in listed) if rel.endswith("/") else rel in listed
        if not present:
            problems.append(f"it holds no {rel}, which this trainer's state needs (saved by {manifest.get('trainer')})")
    return problems


def settings_mismatch(saved: dict, current: dict) -> list[str]:
    """``name: saved -> current`` for each batch setting that differs (settings absent from either are ignored)."""
    differ = [k for k in current if k in saved and saved[k] != current[k]]
    return [f"{k}: {saved[k]!r} in the checkpoint, {current[k]!r} now" for k in differ]


def finished_run(folder: str, max_steps: int) -> str | None:
    """Why resuming from ``folder`` would train nothing (None when it would train): it is at ``max_steps`` already
    (``max_steps`` <= 0: the step count it was saved with). transformers 5.24 would train one step past the end."""
    try:
        with open(os.path.join(folder, "trainer_state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    step, limit = state.get("global_step", 0), max_steps if max_steps and max_steps > 0 else state.get("max_steps", 0)
    if limit and step >= limit:
        return (
            f"{folder} is at step {step} and the run ends at step {limit} (max_steps): there is nothing left to train "
            "(transformers would train one step past the end). Raise max_steps to train further."
        )
    return None


def newest_complete_checkpoint(run_dir: str, required: list[str] = ()) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """The checkpoint with the highest step that can be resumed from, and the newer ones skipped with their
    problems (newest first)."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        problems = checkpoint_problems(path, required)
        if not problems:
            return path, skipped
        skipped.append((path, problems))
    return None, skipped


def remove_checkpoint(path: str) -> None:
    """Delete a checkpoint, its manifest first: an interrupted deletion leaves an incomplete checkpoint, never
    one that looks complete."""
    try:
        os.remove(os.path.join(path, MANIFEST))
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def rotate_checkpoints(run_dir: str, limit: int | None, keep: set[str] = frozenset()) -> list[str]:
    """``save_total_limit`` for complete checkpoints: keep the ``limit`` newest complete ones (by step) plus
    ``keep`` (the one just written, the best model's); delete every other checkpoint, incomplete ones included
    (they cannot be resumed from). Nothing happens when ``limit`` is None or <= 0. Returns the deleted paths."""
    if not limit or limit <= 0:
        return []
    keep = {os.path.normpath(p) for p in keep if p}
    complete = [p for p in list_checkpoints(run_dir) if read_manifest(p) is not None]
    kept = set(keep)
    for path in reversed(complete):
        if len(kept) >= max(limit, len(keep)):
            break
        kept.add(os.path.normpath(path))
    deleted = []
    for path in list_checkpoints(run_dir):
        if os.path.normpath(path) not in kept:
            remove_checkpoint(path)
            deleted.append(path)
    return deleted


def mark_complete(folder: str) -> dict:
    """Write the manifest of a checkpoint *you know to be complete* (e.g. written by trl_kl before manifests
    existed), so that it can be resumed from. Returns the manifest."""
    if read_manifest(folder) is not None:
        raise CheckpointError(f"{folder} already has a manifest.")
    return write_manifest(folder, {"trainer": "marked complete by hand"})
