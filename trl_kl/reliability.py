"""``ReliabilityMixin``: the glue between transformers' training loop and trl_kl's safety checks
(docs/reliability.md). It is the first base of ``GRPOTrainer`` (so of ``PPOTrainer``) and ``DPOTrainer``.

* ``train``: the checks of ``trl_kl.preflight`` (a run that would train nothing, empty prompts), then the checkpoint
  to resume from: a path must be complete (``trl_kl.checkpoints``) with trl_kl's state and the same batch
  settings; ``True`` falls back to the newest complete checkpoint, saying which.
* ``_save_checkpoint``: transformers' files and the trainer's own state (``_save_trl_kl_state``), then the
  manifest, written last, then rotation that keeps complete checkpoints.
* ``_load_optimizer_and_scheduler``: the trainer's own state too (``_load_trl_kl_state``).
* ``training_step`` / ``_get_grad_norm``: a non-finite loss or gradient norm stops (or skips) the optimizer step
  before it is taken (``trl_kl.guards``).
* ``honour_ddp_timeout``: ``ddp_timeout`` on CPU process groups too.

The transformers, TRL and torch internals used here go through ``trl_kl._trl`` (entries 6, 12, 16, 22, 23, 24):
the checkpoint hooks and folders, ``_get_grad_norm``, TRL's metrics and reward functions, the rotation switched off
during a save, the process group's timeout.
"""

from __future__ import annotations

import os
import warnings

import torch
from transformers.utils import logging

from . import __version__, _trl, checkpoints, guards, preflight

logger = logging.get_logger(__name__)

BATCH_SETTINGS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "steps_per_generation",
    "generation_batch_size",
    "num_generations",
    "num_iterations",
    "resample_every",
    "resample_num_prompts",
    "resample_num_completions",
)
"""Config fields that fix which rows a step trains on (and the shape of saved rollouts): a resume must keep them."""


def honour_ddp_timeout(args) -> None:
    """Give the CPU process group ``args.ddp_timeout``: transformers 5.24 passes it to the process group on GPU but
    not with ``use_cpu=True``, where gloo's default (30 minutes) applied, so the peer of a stalled rank waited 30
    minutes whatever ``ddp_timeout`` said. The group exists already: its timeout is set (``_trl``, entry 24)."""
    import torch.distributed as dist

    if args.use_cpu and dist.is_available() and dist.is_initialized():
        _trl.set_process_group_timeout(args.ddp_timeout)


class ReliabilityMixin:
    """See the module docstring. Trainers implement the three ``*_trl_kl_state*`` hooks for their own state."""

    # ---- hooks of the trainers --------------------------------------------------------------------------

    def _trl_kl_state_files(self) -> list[str]:
        """Relative paths a checkpoint must hold for this trainer to resume (a folder ends in '/')."""
        return []

    def _save_trl_kl_state(self, folder: str) -> None:
        """Write the trainer's own state into ``folder`` (every process calls it; before the manifest)."""

    def _load_trl_kl_state(self, folder: str) -> None:
        """Restore what ``_save_trl_kl_state`` wrote (every process; after transformers' own state)."""

    # ---- before training -----------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        honour_ddp_timeout(self.args)
        self._check_run()
        checkpoint = self._resume_checkpoint(resume_from_checkpoint)
        return super().train(
            resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )

    def _check_run(self) -> None:
        import trl

        processes = self.accelerator.num_processes
        if isinstance(self.args, trl.GRPOConfig):
            preflight.check_grpo_run(self.args, self.train_dataset, processes)
        elif isinstance(self.args, trl.DPOConfig):
            prompts = getattr(self, "_prompt_source", None) if getattr(self, "_resampling", False) else None
            preflight.check_dpo_run(self.args, self.train_dataset, processes, prompts)

    def _batch_settings(self) -> dict:
        settings = {name: getattr(self.args, name) for name in BATCH_SETTINGS if hasattr(self.args, name)}
        return {**settings, "num_processes": self.accelerator.num_processes}

    def _resume_checkpoint(self, resume_from_checkpoint) -> str | None:
        """The checkpoint to resume from, checked; None for a fresh start."""
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        required = self._trl_kl_state_files()
        if resume_from_checkpoint is True:
            path, skipped = checkpoints.newest_complete_checkpoint(self.args.output_dir, required)
            reasons = "".join(f"\n  {p}: {'; '.join(problems)}" for p, problems in skipped)
            if path is None:
                raise checkpoints.CheckpointError(
                    f"resume_from_checkpoint=True, but {self.args.output_dir} holds no complete checkpoint to resume "
                    f"from.{reasons or ' (It holds no checkpoint at all.)'}"
                )
            message = f"resume_from_checkpoint=True: resuming from {path}, the newest complete checkpoint."
            if skipped:
                warnings.warn(f"{message} Skipped newer ones that cannot be resumed from:{reasons}", stacklevel=3)
            else:
                logger.info(message)
        else:
            path = str(resume_from_checkpoint)
            problems = checkpoints.checkpoint_problems(path, required)
            if problems:
                newest, _ = checkpoints.newest_complete_checkpoint(os.path.dirname(os.path.normpath(path)), required)
                hint = f" The newest complete checkpoint there is {newest}" if newest else " There is none there"
                raise checkpoints.CheckpointError(
                    f"Cannot resume from {path}: {'; '.join(problems)}.{hint} (resume_from_checkpoint=True picks it)."
                )
        finished = checkpoints.finished_run(path, self.args.max_steps)
        if finished:
            raise checkpoints.CheckpointError(finished)
        mismatch = checkpoints.settings_mismatch(checkpoints.read_manifest(path).get("settings", {}), self._batch_settings())
        if mismatch:
            raise checkpoints.CheckpointError(
                f"{path} was saved with other batch settings ({'; '.join(mismatch)}), which decide the batches each "
                "step trains on and the shape of the saved rollout: resume with the checkpoint's settings, or start a "
                "new run."
            )
        return path

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        run_dir, folder = _trl.run_folder(self, trial), _trl.checkpoint_folder(self, trial)
        if self.args.should_save and os.path.isdir(folder):
            checkpoints.remove_checkpoint(folder)  # left by a save that did not finish, or by a run that went further
        self.accelerator.wait_for_everyone()
        with _trl.rotation_off(self) as limit:  # rotation waits for the manifest
            super()._save_checkpoint(model, trial)
        os.makedirs(folder, exist_ok=True)
        self._save_trl_kl_state(folder)
        self.accelerator.wait_for_everyone()  # every process's files are written
        if self.args.should_save:
            info = {
                "trainer": type(self).__name__,
                "trl_kl": __version__,
                "step": self.state.global_step,
                "model_only": bool(self.args.save_only_model),
                "settings": self._batch_settings(),
            }
            checkpoints.write_manifest(folder, info)
            checkpoints.rotate_checkpoints(run_dir, limit, keep={folder, self.state.best_model_checkpoint})

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._load_trl_kl_state(checkpoint)

    # ---- non-finite rewards ------------------------------------------------------------------------------------

    def _exclude_nonfinite_rewards(self, rewards: torch.Tensor, local_nonfinite: int) -> torch.Tensor:
        """GRPO/PPO: the gathered rewards ``(B_global, reward functions)`` with every non-finite value made NaN
        (unscorable), logging ``reward/nonfinite_frac``. ``local_nonfinite``: NaN/inf values this process's reward
        functions returned (already None, so NaN here); a reward model's NaN/inf and a float32 overflow are counted
        here. Every process calls it (one gather)."""
        funcs, _ = _trl.reward_functions(self)
        models = torch.tensor([isinstance(f, torch.nn.Module) for f in funcs], device=rewards.device)
        counted = (~torch.isfinite(rewards) & models) | (torch.isinf(rewards) & ~models)
        total = torch.tensor([float(local_nonfinite)], device=rewards.device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.gather(total)
        rewards, _ = guards.nonfinite_to_nan(rewards)
        mode = "train" if self.model.training else "eval"
        fraction = (total.sum().item() + counted.sum().item()) / max(rewards.numel(), 1)
        _trl.metrics(self, mode)[guards.REWARD_METRIC].append(fraction)
        return rewards

    # ---- non-finite loss or gradient norm ---------------------------------------------------------------------

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if getattr(self, "_nonfinite_loss", None) is None and not guards.is_finite(loss):
            self._nonfinite_loss = float(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        loss, self._nonfinite_loss = getattr(self, "_nonfinite_loss", None), None
        bad_loss = loss is not None
        if self.accelerator.num_processes > 1:  # every process must take the same decision
            flag = torch.tensor([float(bad_loss)], device=self.accelerator.device)
            bad_loss = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if bad_loss:
            skip = self._nonfinite_step("loss", loss if loss is not None else "non-finite on another process", False)
        elif not guards.is_finite(grad_norm):
            skip = self._nonfinite_step("gradient norm", float(grad_norm), True)
        else:
            skip = self._nonfinite_step(None)
        if skip:  # parameters without a gradient are left alone by torch's optimizers
            self.optimizer.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
        self._skipping_step = skip  # PPO's critic skips the same step
        return grad_norm

    def _nonfinite_step(
        self, what: str | None, value=None, loss_was_finite: bool = True, metric: str = guards.SKIPPED_METRIC
    ) -> bool:
        """Decide on a non-finite optimizer step (``what`` None: a finite one): raise ``NonFiniteError``, or, with
        ``skip_nonfinite_steps``, return True (skip it) and count it in ``metric``."""
        skip = getattr(self.args, "skip_nonfinite_steps", False)
        if what is None:
            if skip:
                _trl.metrics(self, "train")[metric].append(0.0)
            return False
        if not skip:
            raise guards.NonFiniteError(guards.nonfinite_step_message(self.state.global_step, what, value, loss_was_finite))
        logger.warning(f"skip_nonfinite_steps: skipping optimizer step {self.state.global_step + 1}, whose {what} is {value}.")
        _trl.metrics(self, "train")[metric].append(1.0)
        return True
