"""Compatibility with the libraries under trl_kl: the TRL versions it is tested with (it overrides TRL 1.16's
private GRPO hooks ``_calculate_rewards``, ``_generate_and_score_completions``,
``_get_per_token_logps_and_entropies`` and ``_compute_loss``, whose signatures and semantics may change in any minor
release), and a clean end for multi-process runs on CPU (``end_distributed``)."""

from __future__ import annotations

import os

from packaging.version import Version

SUPPORTED_TRL = (Version("1.16.0"), Version("1.17.0"))
"""[min, max): the pinned range of pyproject.toml."""


def check_trl_version(version: str | None = None) -> None:
    """Raise ``ImportError`` naming the supported range when the installed TRL is outside it.
    ``TRL_KL_SKIP_VERSION_CHECK=1`` turns the error into nothing (at your own risk)."""
    if version is None:
        import trl

        version = trl.__version__
    low, high = SUPPORTED_TRL
    if not low <= Version(version) < high and os.environ.get("TRL_KL_SKIP_VERSION_CHECK") != "1":
        raise ImportError(
            f"trl_kl supports trl>={low},<{high} (it overrides TRL's private GRPO hooks), but trl {version} is "
            f'installed: pip install "trl>={low},<{high}", or set TRL_KL_SKIP_VERSION_CHECK=1 to try anyway.'
        )


def end_distributed(trainer) -> None:
    """End a run's process group while Python is fully alive. Call it last: the trainer can still save, not train.

    Accelerate's ``end_training()`` destroys the group, but the ``DistributedDataParallel`` wrappers the trainer
    keeps (``model_wrapped``, PPO's critic) still reference it, so torch frees it only while Python shuts down,
    where gloo (CPU) in torch 2.13 can abort ("terminate called without an active exception") or hang, after the
    work is saved. Unwrapping them first lets the group go at once. Measured here, 2 CPU processes:
    ``recipes/grpo.py`` failed its exit in 1 of 20 runs with ``end_training()`` alone, in 0 of 60 with this; a
    plain script without any teardown in 21 of 40; ``tests/dist_grpo_grad.py`` hung in 1 of 6 runs with
    ``end_training()`` alone (faulthandler: freeing the trainer after ``main()`` returned), in 0 of 30 with
    this. Elsewhere (GPU, one process) it does what ``end_training()`` does, after the unwrapping."""
    from torch.nn.parallel import DistributedDataParallel

    for name, value in list(vars(trainer).items()):
        if isinstance(value, DistributedDataParallel):
            setattr(trainer, name, value.module)
    trainer.accelerator.free_memory()  # the accelerator's own references to the wrappers
    trainer.accelerator.end_training()
