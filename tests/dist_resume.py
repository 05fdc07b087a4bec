"""Run under ``torchrun --nproc_per_node 2`` (CPU, gloo) by tests/test_faults.py: 2-process resume is exact.

For each trainer named on the command line (grpo, ppo, dpo): the uninterrupted 8-step run of
``fault_injection.build`` (checkpoints at steps 3 and 6), then a second trainer resumed from checkpoint-3 of a
copy of that run, trained to step 8. Rank 0 writes, per trainer, the largest weight difference between the two
(policy, and PPO's critic) and the steps' losses, to ``OUT/resume_<kind>.json``.
"""

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import fault_injection as fi  # noqa: E402

from trl_kl.distributed import end_distributed  # noqa: E402


def main(out: Path, kinds: list[str]):
    trainer = None
    for kind in kinds:
        full = fi.build(kind, out / kind / "full")
        full.train()
        rank = full.accelerator.process_index
        copy = out / kind / "resumed"
        if rank == 0:
            shutil.copytree(out / kind / "full", copy, dirs_exist_ok=True)
        dist.barrier()
        resumed = fi.build(kind, copy)
        resumed.train(resume_from_checkpoint=str(copy / f"checkpoint-{fi.SAVE_STEPS}"))
        diff = fi.weight_difference(fi.weights(resumed), fi.weights(full))
        result = {
            "world": resumed.accelerator.num_processes,
            "steps": resumed.state.global_step,
            "max_weight_difference": diff,
            "loss_full": fi.logged(full, "loss"),
            "loss_resumed": fi.logged(resumed, "loss"),
        }
        if rank == 0:
            (out / f"resume_{kind}.json").write_text(json.dumps(result))
        trainer = resumed
    end_distributed(trainer)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","))
