"""Multi-process runs: a clean end for them (``end_distributed``)."""

from __future__ import annotations


def end_distributed(trainer) -> None:
    """End a run's process group while Python is fully alive. Call it last: the trainer can still save, not train.

    Accelerate's ``end_training()`` destroys the group, but the ``DistributedDataParallel`` wrappers the trainer
    keeps (``model_wrapped``, PPO's critic) still reference it, so torch frees it only while Python shuts down,
    where gloo (CPU) in torch 2.13 can abort ("terminate called without an active exception") or hang, after the
    work is saved (docs/launching.md has the measured failure rates). Unwrapping them first lets the group go at
    once. Elsewhere (GPU, one process) it does what ``end_training()`` does, after the unwrapping."""
    from torch.nn.parallel import DistributedDataParallel

    for name, value in list(vars(trainer).items()):
        if isinstance(value, DistributedDataParallel):
            setattr(trainer, name, value.module)
    trainer.accelerator.free_memory()  # the accelerator's own references to the wrappers
    trainer.accelerator.end_training()
