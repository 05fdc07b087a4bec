"""``trl-kl dpo``: TRL's DPO script (``trl/scripts/dpo.py``) with ``trl_kl.DPOConfig`` / ``DPOTrainer``: the SFT
term and online resampling, whose completions ``--reward_funcs`` label.

    trl-kl dpo --config dpo_online                            # a shipped recipe: the offline toy model and task
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ScriptArguments

from . import announce_device, eval_split, load_datasets, make_trl_parser, model_name, reward_functions
from . import set_model_init_kwargs, train_and_save


@dataclass
class DPOScriptArguments(ScriptArguments):
    """TRL's script arguments plus the rewards that label resampled completions (``resample_every``)."""

    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A reward model (hub id or local path) labelling resampled completions, before reward_funcs."},
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Rewards labelling resampled completions (with resample_every): TRL's names (accuracy_reward, ...), "
            "a dotted import path (trl_kl.toy.correctness_reward) or a reward model (hub id or local path)."
        },
    )


def toy_split(n: int, seed: int, split: str):
    from trl_kl.toy import offline_preferences

    return offline_preferences(n, seed=seed, split=split)


def make_parser(prog: str | None = None):
    from trl_kl import DPOConfig

    return make_trl_parser(DPOScriptArguments, DPOConfig, prog)


def build_trainer(script_args, training_args, model_args, dataset_args):
    """The trainer ``trl-kl dpo`` trains."""
    import torch
    from trl import get_peft_config, get_quantization_config

    from trl_kl import DPOTrainer

    set_model_init_kwargs(training_args, model_args)
    dataset = load_datasets(script_args, dataset_args, training_args.seed, toy_split)
    trainer = DPOTrainer(
        model=model_name(model_args),
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_split(dataset, script_args, training_args),
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        reward_funcs=reward_functions(script_args) or None,
    )
    if script_args.ignore_bias_buffers:  # TRL's script: DDP must not sync boolean buffers
        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    return trainer


def main(script_args, training_args, model_args, dataset_args):
    announce_device(training_args)
    trainer = build_trainer(script_args, training_args, model_args, dataset_args)
    train_and_save(trainer, training_args, model_args)
    return trainer
