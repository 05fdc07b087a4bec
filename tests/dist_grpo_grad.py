"""Run under ``torchrun --nproc_per_node N`` (CPU, gloo) by tests/test_grpo_distributed.py.

Each process takes its slice of one fixed global batch of 8 completions, computes trl_kl's GRPO loss and its
gradient; gradients are averaged over processes as DDP does. Rank 0 saves the averaged gradient and the is/* and
kl* metrics of that loss call (reduced over processes by the trainer). Then every
process trains 2 real steps (generation, rewards gathered across processes, KL in the reward), ends with
``trl_kl.distributed.end_distributed``, and rank 0 saves the losses and whether the process group and the DDP wrapper
were freed.
"""

import gc
import os
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from grpo_batch import fixed_batch, make_config, make_trainer  # noqa: E402

from trl_kl.distributed import end_distributed  # noqa: E402
from trl_kl.toy import toy_model_path  # noqa: E402

GLOBAL_ROWS = 8


def flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def local_gradient(trainer, world, rank, **batch_kwargs):
    batch, _ = fixed_batch(trainer, rows=GLOBAL_ROWS)
    local = GLOBAL_ROWS // world
    part = {k: (v[rank * local : (rank + 1) * local] if k != "num_items_in_batch" else v) for k, v in batch.items()}
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    trainer._compute_loss(trainer.model, part).backward()
    # trl_kl's metrics of this call, reduced over processes: must equal one process's on the whole batch
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith(("is/", "kl")) and v}
    return flat_grad(trainer.model), metrics


def main(out_dir: str, placement: str, loss_type: str):
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    tmp = Path(out_dir)
    estimator = "k1" if placement == "reward" else "k2"
    args = make_config(
        tmp, per_device_train_batch_size=GLOBAL_ROWS // world, num_iterations=2, kl_placement=placement,
        kl_estimator=estimator, loss_type=loss_type, max_steps=2, logging_steps=1, save_strategy="no",
    )
    trainer = make_trainer(toy_model_path(), args)
    grad, metrics = local_gradient(trainer, world, rank)
    if world > 1:
        dist.all_reduce(grad)
        grad /= world
    trainer.model.zero_grad()
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    processes, wrapper = trainer.accelerator.num_processes, weakref.ref(trainer.model_wrapped)
    end_distributed(trainer)
    gc.collect()
    ended = {"group_destroyed": not dist.is_initialized(), "wrapper_freed": wrapper() is None}
    if rank == 0:
        torch.save({"grad": grad, "losses": losses, "world": processes, "metrics": metrics, **ended},
                   tmp / f"result_{world}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
