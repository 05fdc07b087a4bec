"""Run under ``torchrun --nproc_per_node 2`` (CPU, gloo) by tests/test_faults.py: a non-finite loss on one rank.

GRPO on 2 CPU processes, 3 optimizer steps; at the second, rank 1's loss is NaN (rank 0's stays finite), as a
bad batch on one process would make it. Run once stopping (the default) and once with ``skip_nonfinite_steps``.
Each rank writes ``OUT/<mode>_rank<r>.json``: the error it raised (if any), the optimizer step it reached, whether
step 2 changed its weights, a fingerprint of its final weights (the ranks must agree) and the skip metric.
"""

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))
import fault_injection as fi  # noqa: E402

from trl_kl import guards  # noqa: E402
from trl_kl.distributed import end_distributed  # noqa: E402


class Snapshots(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.store = trainer, [fi.weights(trainer)]

    def on_step_end(self, args, state, control, **kwargs):
        self.store.append(fi.weights(self.trainer))


def run(out: Path, skip: bool) -> None:
    mode = "skip" if skip else "stop"
    trainer = fi.build("grpo", out / mode, max_steps=3, save_strategy="no", skip_nonfinite_steps=skip,
                       num_iterations=1, steps_per_generation=1)
    rank = dist.get_rank()
    compute_loss = trainer.compute_loss

    def one_rank_nan(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        return loss * math.nan if rank == 1 and trainer.state.global_step == 1 else loss

    trainer.compute_loss = one_rank_nan
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    error = None
    try:
        trainer.train()
    except guards.NonFiniteError as caught:
        error = str(caught)
    final = fi.weights(trainer)
    result = {
        "world": dist.get_world_size(),
        "error": error,
        "global_step": trainer.state.global_step,
        "step2_change": fi.weight_difference(snapshots.store[2], snapshots.store[1]) if len(snapshots.store) > 2 else None,
        "finite": fi.all_finite(final),
        "fingerprint": sum(float(v.double().abs().sum()) for v in final.values() if v.is_floating_point()),
        "skipped": fi.logged(trainer, guards.SKIPPED_METRIC),
    }
    (out / f"{mode}_rank{rank}.json").write_text(json.dumps(result))
    return trainer


def main(out: Path):
    torch.manual_seed(0)
    run(out, skip=False)
    dist.barrier()
    end_distributed(run(out, skip=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
