"""Drop-in ``DPOConfig`` / ``DPOTrainer``: DPO under the Monte-Carlo condition (docs/theory.md#dpo, the paper's section 5).

``from trl_kl import DPOConfig, DPOTrainer`` instead of ``from trl import ...``. DPO fits a distribution from
samples, which is sound only while the samples come from (close to) the current policy. Offline preference
data breaks that twice: it comes from other models, and the policy drifts away from it while training. The
paper's two remedies are both here:

* ``sft_weight``: an SFT loss on the chosen answers. It is TRL's own ``"sft"`` loss type, appended to
  ``loss_type`` with weight ``sft_weight`` in ``loss_weights`` (nothing reimplemented).
* ``resample_every``: iterative (online) DPO. Every ``resample_every`` optimizer steps (and at the start) the
  *current* policy samples ``resample_num_completions`` answers for a slice of the dataset's prompts, the
  ``reward_funcs`` (TRL reward-function signature, as in GRPO) score them, the best and the worst answer of
  each prompt become a pair (ties skipped), TRL's own dataset preparation tokenizes the pairs, and they
  replace the training data for the next ``resample_every`` steps (the *window*).

How the data is swapped. transformers' ``Trainer`` builds one dataloader in ``train()`` and, per optimizer
step, ``_run_epoch`` calls ``get_batch_samples(epoch_iterator, num_batches, device)`` to draw that step's
``gradient_accumulation_steps`` micro-batches. That call is the one hook that runs exactly once per optimizer
step, before the step, and owns the batches; overriding it lets the trainer draw from the current window
instead of the epoch iterator, with no change to the training loop and no dataloader rebuilt mid-epoch (the
alternatives, re-creating the dataloader from a callback or refilling a dataset in place, fight the loop's
local iterator and Accelerate's one-batch prefetch). With resampling on, the Trainer's own dataloader only
counts steps and epochs over the dataset's length (``get_train_dataloader`` returns a loader over indices
that is never iterated), so a prompt-only dataset works too. The window is read as an endless stream of
seeded permutations, cut into global batches of ``per_device_train_batch_size * num_processes``; each process
takes its slice. Its position is a counter, saved with the window in each checkpoint, so a resumed run
continues on the same batches (and, since generation is seeded by the refresh step, refreshes the same way).

Staleness. At a refresh the current policy's log-probability of every fresh chosen answer is stored (one
no-grad forward, the same fused forward DPO uses). At every training micro-batch the policy's log-prob of
the chosen answers is read from DPO's own forward (a forward hook: no extra pass), giving the log importance
weights log pi_theta(y) - log pi_sampler(y): their mean is ``resample/staleness_logratio`` and their effective
sample size fraction ``resample/ess`` (1 right after a refresh, falling as the policy drifts).
"""

from __future__ import annotations

from . import _trl  # first: refuses an untested TRL before its internals are touched

import asyncio
import atexit
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import datasets
import torch
import trl
from accelerate.utils import gather_object, is_peft_model
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig, PreTrainedModel
from trl.data_utils import apply_chat_template, is_conversational

from . import guards
from ._trl import (  # TRL helpers it does not export (entries 25, 26)
    disable_gradient_checkpointing,
    get_callable_name,
    get_config_model_id,
    is_async_callable,
    pad,
    prepare_deepspeed,
    shutdown_event_loop_in_daemon,
    start_event_loop_in_daemon,
    unwrap_model_for_generation,
)
from .advantages import effective_sample_size
from .config import (
    check_bool,
    check_choice,
    check_int,
    check_items,
    check_number,
    check_numbers,
    check_reference_sync_fields,
    check_training_fields,
)
from .reliability import ReliabilityMixin

WINDOW_DIR = "trl_kl_dpo_window"
"""Folder of a checkpoint holding the current window's pairs (``datasets.save_to_disk``)."""
WINDOW_STATE = "trl_kl_dpo_window.json"
"""File of a checkpoint holding the refresh schedule and the position in the window."""
_TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")


@dataclass
class DPOConfig(trl.DPOConfig):
    """``trl.DPOConfig`` plus the paper's remedies for offline preference data (docs/theory.md#dpo).

    ``sft_weight`` adds TRL's ``"sft"`` loss (NLL of the chosen answers); ``resample_every`` turns on the
    sample -> label -> train loop (the trainer then needs ``reward_funcs``). All TRL fields keep their meaning.
    """

    sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an SFT loss (mean NLL of the chosen answers' tokens) added to the DPO loss, the paper's "
            "remedy for the policy drifting away from the data. Mapped onto TRL's own mechanism: 'sft' is appended to "
            "loss_type with this weight in loss_weights. 0 adds nothing."
        },
    )
    resample_every: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps between refreshes of the training data from the current policy (sample -> label "
            "-> train). A refresh also happens at the start. None: plain offline DPO on the dataset's pairs."
        },
    )
    resample_num_prompts: int | None = field(
        default=None,
        metadata={
            "help": "Prompts sampled at each refresh (taken in turn from a seeded shuffle of the dataset's distinct "
            "prompts). None: one window's worth, resample_every x the global batch size, i.e. one pass over the "
            "fresh pairs when no prompt ties."
        },
    )
    resample_num_completions: int = field(
        default=4,
        metadata={"help": "Completions sampled per prompt at a refresh; the best and the worst form the pair (>= 2)."},
    )
    resample_max_new_tokens: int = field(
        default=256, metadata={"help": "Maximum new tokens of each sampled completion."}
    )
    resample_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature at a refresh (no top-k / top-p). 1.0 samples the policy itself, which is what "
            "the Monte-Carlo condition asks for."
        },
    )
    resample_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Prompts per generate call and pairs per no-grad forward at a refresh, per process. None: "
            "per_device_train_batch_size."
        },
    )
    resample_mix: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of the dataset's original (offline) pairs kept in each window next to the fresh pairs: "
            "round(resample_mix x number of offline pairs) of them, redrawn at each refresh. 0: fresh pairs only."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "With resample_every: weights of the reward functions and models, in the order of reward_funcs (GRPO's "
            "field). A completion's label is their weighted sum over the rewards that are not None; None: all weights 1."
        },
    )
    resample_update_reference: bool = field(
        default=False,
        metadata={
            "help": "Move the reference to the current policy at each refresh. False (default, as iterative-DPO "
            "practice does): the reference stays the initial policy. With PEFT the reference becomes a frozen 'ref' "
            "adapter copied from the trained one."
        },
    )

    skip_nonfinite_steps: bool = field(default=False, metadata={"help": guards.SKIP_HELP})

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self._check_fields()
        if self.sft_weight > 0:
            self._add_sft_loss()
        super().__post_init__()
        self._check_combinations()

    def _check_fields(self) -> None:
        """Each field's type and range (transformers', TRL's, trl_kl's), before TRL's checks and the SFT term use
        them: TRL refuses a bad loss type, learning rate or f-divergence only inside ``train()``."""
        check_training_fields(self)
        check_number(
            "beta", self.beta, greater_than=0,
            why="DPO's KL coefficient, TRL's default 0.1: NaN trains NaN weights, and beta <= 0 learns nothing or "
            "prefers the rejected answers",
        )
        check_items("loss_type", self.loss_type, _trl.DPO_LOSS_TYPES)
        check_numbers("loss_weights", self.loss_weights, optional=True, why="one per loss_type")
        check_number("label_smoothing", self.label_smoothing, at_least=0, less_than=1)
        check_number("ld_alpha", self.ld_alpha, at_least=0, at_most=1, optional=True, why="None: no LD-DPO weighting")
        check_choice("f_divergence_type", self.f_divergence_type, _trl.F_DIVERGENCE_TYPES)
        check_number("f_alpha_divergence_coef", self.f_alpha_divergence_coef)
        check_number("discopop_tau", self.discopop_tau, greater_than=0, why="discopop divides by it")
        check_int("max_length", self.max_length, at_least=1, optional=True, why="None: no truncation")
        check_int("precompute_ref_batch_size", self.precompute_ref_batch_size, at_least=1, optional=True)
        for name in ("precompute_ref_log_probs", "use_weighting", "padding_free", "sync_ref_model",
                     "resample_update_reference"):
            check_bool(name, getattr(self, name))
        check_reference_sync_fields(self)
        check_number("sft_weight", self.sft_weight, at_least=0, why="the weight of the SFT loss; 0 adds none")
        check_int("resample_every", self.resample_every, at_least=1, optional=True,
                  why="optimizer steps between refreshes; None: plain offline DPO")
        check_int("resample_num_prompts", self.resample_num_prompts, at_least=1, optional=True)
        check_int("resample_num_completions", self.resample_num_completions, at_least=2,
                  why="a pair needs a best and a worst completion of the same prompt")
        check_int("resample_max_new_tokens", self.resample_max_new_tokens, at_least=1)
        check_number("resample_temperature", self.resample_temperature, greater_than=0,
                     why="1.0 samples the policy itself")
        check_int("resample_batch_size", self.resample_batch_size, at_least=1, optional=True)
        check_number("resample_mix", self.resample_mix, at_least=0, at_most=1,
                     why="the fraction of offline pairs kept in each window")
        check_numbers("reward_weights", self.reward_weights, optional=True, why="one per reward function")

    def _add_sft_loss(self):
        """Append TRL's 'sft' loss type with weight ``sft_weight``; idempotent when the config is rebuilt."""
        weights = list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(self.loss_type)
        if len(weights) != len(self.loss_type):
            return  # TRL's own check names the mismatch
        if "sft" in self.loss_type:
            if weights[self.loss_type.index("sft")] != self.sft_weight:
                raise ValueError(
                    f"sft_weight={self.sft_weight} and loss_type={self.loss_type} (with loss_weights={self.loss_weights}) "
                    "both ask for an SFT term: set sft_weight alone, or put 'sft' in loss_type with its weight in "
                    "loss_weights and leave sft_weight at 0."
                )
            return
        self.loss_type = [*self.loss_type, "sft"]
        self.loss_weights = [*weights, float(self.sft_weight)]

    def _check_combinations(self):
        """The rules between fields: label smoothing where a loss type reads it, resampling fields only with
        resample_every, one way to move the reference."""
        self._check_label_smoothing()
        if self.resample_every is None:
            for name, default in (("resample_mix", 0.0), ("resample_update_reference", False), ("reward_weights", None)):
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} only acts at a refresh: set resample_every (e.g. 8) or leave "
                        f"{name} at {default!r}."
                    )
        if self.resample_update_reference and self.sync_ref_model:
            raise ValueError(
                "resample_update_reference=True and sync_ref_model=True both move the reference: choose one (TR-DPO's "
                "sync_ref_model mixes it every ref_model_sync_steps; resample_update_reference copies the policy at each "
                "refresh)."
            )

    def _check_label_smoothing(self):
        """TRL 1.16 reads ``label_smoothing`` in the robust (a flip probability, < 0.5: it divides by 1 - 2 eps),
        exo_pair (> 0: log eps) and aot losses only; anywhere else it would be ignored."""
        smoothing, losses = self.label_smoothing, set(self.loss_type)
        if smoothing != 0 and not losses & {"robust", "exo_pair", "aot", "aot_unpaired"}:
            raise ValueError(
                f"label_smoothing={smoothing} has no effect with loss_type={self.loss_type}: TRL 1.16 reads it only in "
                "the 'robust', 'exo_pair', 'aot' and 'aot_unpaired' losses (its former sigmoid label smoothing, cDPO, "
                "is gone). Use loss_type='robust' for noisy preference labels, or leave label_smoothing at 0."
            )
        if "robust" in losses and smoothing >= 0.5:
            raise ValueError(
                f"label_smoothing={smoothing} with loss_type 'robust': it is the probability that a label is flipped "
                "and must be < 0.5 (the loss divides by 1 - 2 * label_smoothing). The Robust DPO paper uses 0.1."
            )
        if "exo_pair" in losses and smoothing == 0:
            raise ValueError(
                "loss_type 'exo_pair' needs label_smoothing > 0 (its loss takes log(label_smoothing)); the EXO paper "
                "recommends 1e-3."
            )


def build_preference_pairs(
    prompts: list, completions: list[list], rewards: list[list[float]]
) -> tuple[list[dict], int]:
    """Best-vs-worst preference pairs, one per prompt, from grouped completions and their rewards.

    ``completions[i]`` and ``rewards[i]`` are the sampled completions of ``prompts[i]`` and their (summed) rewards;
    None and non-finite rewards (unscorable) are left out. The chosen answer is the first completion with the
    highest reward, the rejected one the first with the lowest. A prompt is a *tie*, skipped and counted, when its scored
    completions all have the same reward (or fewer than two were scored, or best and worst are the same text):
    there is no preference to learn. Returns ``(pairs, ties)``; each pair is a dict with ``index`` (the
    prompt's position), ``prompt``, ``chosen``, ``rejected``, ``chosen_reward``, ``rejected_reward``.
    """
    if not len(prompts) == len(completions) == len(rewards):
        raise ValueError(
            f"prompts, completions and rewards must have one entry per prompt, got {len(prompts)}, {len(completions)} "
            f"and {len(rewards)}."
        )
    pairs, ties = [], 0
    for index, (prompt, group, scores) in enumerate(zip(prompts, completions, rewards, strict=True)):
        if len(group) != len(scores):
            raise ValueError(f"prompt {index}: {len(group)} completions but {len(scores)} rewards.")
        scored = [(float(s), j) for j, s in enumerate(scores) if s is not None and math.isfinite(float(s))]
        if len(scored) < 2:
            ties += 1
            continue
        best = max(scored, key=lambda item: (item[0], -item[1]))  # highest reward, first on ties
        worst = min(scored, key=lambda item: (item[0], item[1]))  # lowest reward, first on ties
        if group[best[1]] == group[worst[1]]:  # equal rewards make best and worst the same (first) completion
            ties += 1
            continue
        pairs.append(
            {
                "index": index,
                "prompt": prompt,
                "chosen": group[best[1]],
                "rejected": group[worst[1]],
                "chosen_reward": best[0],
                "rejected_reward": worst[0],
            }
        )
    return pairs, ties


@contextmanager
def _quiet_datasets():
    """No ``datasets`` progress bars while a refresh maps and selects its small window."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _seed(*parts) -> int:
    """A 63-bit seed that depends only on ``parts`` (stable across processes and Python runs)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class DPOTrainer(ReliabilityMixin, trl.DPOTrainer):
    """``trl.DPOTrainer`` with the SFT term and the resampling loop of ``trl_kl.DPOConfig`` (module docstring).

    ``reward_funcs``: what ``trl.GRPOTrainer`` takes, labelling the freshly sampled completions (required with
    ``resample_every``): functions with TRL's reward-function signature ``f(prompts=..., completions=...,
    completion_ids=..., trainer_state=..., **dataset_columns) -> list[float | None]`` (sync or async; ``None``
    means unscorable), reward models (``PreTrainedModel`` with a one-label sequence-classification head, or its
    hub id or local path, loaded as GRPO does) and lists of these, weighted by ``args.reward_weights``.
    ``reward_processing_classes``: the reward models' tokenizers, as in GRPO (default: loaded from each model's
    name). Conversational prompts are generated from with the chat template and the completions handed to the
    rewards as ``[{"role": "assistant", "content": ...}]``, as in GRPO.
    """

    def __init__(
        self,
        model,
        ref_model=None,
        args: DPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        reward_funcs: Callable | PreTrainedModel | str | list | None = None,
        reward_processing_classes=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path
            args = DPOConfig(f"{name.split('/')[-1]}-DPO")
        if not isinstance(args, DPOConfig):
            raise TypeError(
                "trl_kl.DPOTrainer needs a trl_kl.DPOConfig (it carries sft_weight and the resampling fields): replace "
                "`from trl import DPOConfig` by `from trl_kl import DPOConfig`."
            )
        self.reward_funcs = self._check_reward_funcs(reward_funcs, args)
        self.reward_processing_classes = self._reward_tokenizers(reward_processing_classes, args)
        self._resampling = args.resample_every is not None
        if self._resampling:
            self._check_resampling_dataset(train_dataset, args)
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self._window: Dataset | None = None  # the current window's pairs, tokenized
        self._window_step = 0  # global step at which the window was sampled (seeds its order)
        self._window_batches = 0  # micro-batches of this process drawn from the window so far
        self._last_refresh: int | None = None  # global step of the last refresh (the schedule)
        self._window_stats: dict[str, float] = {}
        self._window_perms: dict[int, list[int]] = {}
        self.refresh_log: list[dict] = []
        """One dict per refresh of this run: step, pairs, ties, offline_pairs, reward_mean, margin."""
        if self._resampling:
            self._setup_resampling(train_dataset)

    # ---- setup ------------------------------------------------------------------------------------------

    @staticmethod
    def _check_reward_funcs(reward_funcs, args: DPOConfig) -> list:
        """The reward functions and models as a list, models given by name loaded as ``trl.GRPOTrainer`` loads them."""
        funcs = [] if reward_funcs is None else list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if args.resample_every is not None and not funcs:
            raise ValueError(
                f"resample_every={args.resample_every} samples fresh completions that must be labelled: pass "
                "reward_funcs=[...] to the trainer (TRL reward functions or reward models, as for GRPO), or set "
                "resample_every=None for offline DPO."
            )
        if args.resample_every is None and funcs:
            raise ValueError(
                "reward_funcs only label resampled completions, and resample_every is None (offline DPO): set "
                "resample_every, or drop reward_funcs."
            )
        for i, func in enumerate(funcs):
            if isinstance(func, str):
                model_init_kwargs = dict(args.model_init_kwargs or {})
                model_init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
                if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                    model_init_kwargs["device_map"] = None  # as GRPO: "auto" fails under DDP / DeepSpeed
                funcs[i] = AutoModelForSequenceClassification.from_pretrained(func, num_labels=1, **model_init_kwargs)
            elif isinstance(func, torch.nn.Module) and not isinstance(func, PreTrainedModel):
                raise TypeError(
                    f"reward_funcs[{i}] is a torch module but not a transformers PreTrainedModel: a reward model must be "
                    "a sequence-classification model with one label (e.g. AutoModelForSequenceClassification, "
                    "num_labels=1), as for GRPO; wrap anything else in a reward function."
                )
            elif not callable(func):
                raise TypeError(
                    f"reward_funcs[{i}] = {func!r}: expected a reward function f(prompts=..., completions=..., "
                    "**dataset_columns) -> list[float], a reward model, or a reward model's hub id or local path."
                )
        if args.reward_weights is not None and len(args.reward_weights) != len(funcs):
            raise ValueError(
                f"reward_weights has {len(args.reward_weights)} weights for {len(funcs)} reward functions: give one per "
                "reward function, in order."
            )
        return funcs

    def _reward_tokenizers(self, reward_processing_classes, args: DPOConfig) -> list:
        """One entry per reward: the reward model's tokenizer (given, or loaded from its name as GRPO does; pad token
        set, since the model reads the last non-pad token), None for reward functions."""
        given = reward_processing_classes
        given = [None] * len(self.reward_funcs) if given is None else given if isinstance(given, list) else [given]
        if len(given) != len(self.reward_funcs):
            raise ValueError(
                f"reward_processing_classes has {len(given)} entries for {len(self.reward_funcs)} reward functions: "
                "give one per reward function (None for the functions), in order."
            )
        tokenizers = []
        for func, tokenizer in zip(self.reward_funcs, given, strict=True):
            if isinstance(func, PreTrainedModel):
                if tokenizer is None:
                    tokenizer = AutoTokenizer.from_pretrained(
                        get_config_model_id(func.config), trust_remote_code=args.trust_remote_code
                    )
                if tokenizer.pad_token_id is None:
                    tokenizer.pad_token = tokenizer.eos_token
                func.config.get_text_config().pad_token_id = tokenizer.pad_token_id
            tokenizers.append(tokenizer)
        return tokenizers

    @staticmethod
    def _check_resampling_dataset(train_dataset, args: DPOConfig):
        if train_dataset is None:
            return  # TRL names it
        if isinstance(train_dataset, IterableDataset):
            raise NotImplementedError(
                "resample_every needs random access to the dataset's prompts: pass a datasets.Dataset, not an "
                "IterableDataset."
            )
        columns = train_dataset.column_names
        if "image" in columns or "images" in columns:
            raise NotImplementedError("resample_every is not supported for vision datasets yet.")
        if "tools" in columns or "chat_template_kwargs" in columns:
            raise NotImplementedError(
                "resample_every does not support per-example 'tools' / 'chat_template_kwargs' columns yet: the sampled "
                "completions would be generated without them. Drop the columns or use offline DPO."
            )
        if "prompt" not in columns and "chosen" not in columns:
            raise ValueError(f"resample_every needs a 'prompt' column in train_dataset, got columns {columns}.")
        if args.resample_mix > 0 and not {"chosen", "rejected"} <= set(columns):
            raise ValueError(
                f"resample_mix={args.resample_mix} keeps offline pairs, but train_dataset has no 'chosen'/'rejected' "
                "columns (prompt-only): set resample_mix=0."
            )

    def _setup_resampling(self, raw_dataset: Dataset):
        args = self.args
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            warnings.warn(
                "trl_kl.DPOTrainer's resampling is tested with one process and DDP; under DeepSpeed/FSDP generation "
                "and the refresh forward run on every process in step, but this is untested.",
                stacklevel=3,
            )
        # The reference must be computable at a refresh when the window's reference log-probs are precomputed
        if (
            args.precompute_ref_log_probs
            and not args.resample_update_reference
            and self.ref_model is None
            and not is_peft_model(self.model)
        ):
            raise ValueError(
                "precompute_ref_log_probs=True with resample_every keeps no reference model in memory (full "
                "fine-tuning), so the fresh pairs' reference log-probs cannot be computed at a refresh. Pass a ref_model, "
                "train a PEFT adapter, set resample_update_reference=True (the reference is then the policy at the "
                "refresh), or set precompute_ref_log_probs=False."
            )
        if args.resample_update_reference and self.ref_model is None and is_peft_model(self.model):
            peft_model = self.accelerator.unwrap_model(self.model)
            if "ref" not in peft_model.peft_config:  # TRL uses a frozen "ref" adapter as the reference when present
                peft_model.add_adapter("ref", peft_model.peft_config["default"])
                self._copy_adapter_to_reference()
        # The prompts (and the columns reward functions read) come from the dataset as given, one row per prompt
        source = raw_dataset if "prompt" in raw_dataset.column_names else self.train_dataset
        self._conversational = bool(len(source)) and is_conversational({"prompt": source[0]["prompt"]})
        # token columns are TRL's; the names below are the reward functions' own keyword arguments
        reserved = (*_TOKEN_COLUMNS, "prompts", "completions", "completion_ids", "trainer_state")
        drop = [c for c in source.column_names if c in reserved]
        source = source.remove_columns(drop) if drop else source
        first_rows, seen = [], set()
        for row, prompt in enumerate(source["prompt"]):
            key = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)  # messages: a list
            if key not in seen:
                seen.add(key)
                first_rows.append(row)
        self._prompt_source = source.select(first_rows) if len(first_rows) < len(source) else source
        self._offline_pairs = "chosen" in self.train_dataset.column_names
        world = self.accelerator.num_processes
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
        self._num_refresh_prompts = args.resample_num_prompts or args.resample_every * global_batch
        self._generation_config = GenerationConfig(
            do_sample=True,
            temperature=args.resample_temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=args.resample_max_new_tokens,
            num_return_sequences=args.resample_num_completions,
            pad_token_id=_trl.dpo_tokenizer(self).pad_token_id,
            eos_token_id=self.model.generation_config.eos_token_id or _trl.dpo_tokenizer(self).eos_token_id,
            bos_token_id=self.model.generation_config.bos_token_id,
        )
        for i, func in enumerate(self.reward_funcs):  # as GRPO: reward models on the device, in eval mode
            if isinstance(func, PreTrainedModel):
                if self.is_deepspeed_enabled:
                    self.reward_funcs[i] = prepare_deepspeed(func, self.accelerator)
                else:
                    self.reward_funcs[i] = self.accelerator.prepare_model(func, evaluation_mode=True, device_placement=True)
        self._async_loop = None
        self._nonfinite_rewards = 0  # NaN/inf rewards of the current refresh (reward/nonfinite_frac)
        if any(is_async_callable(func) for func in self.reward_funcs):  # as GRPO: one event loop on a daemon thread
            thread, self._async_loop, ready = start_event_loop_in_daemon(name="trl_kl-dpo-rewards")
            ready.wait()
            atexit.register(shutdown_event_loop_in_daemon, thread, self._async_loop)

    # ---- TRL's dataset preparation: prompt-only datasets pass through when resampling --------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if (
            getattr(args, "resample_every", None) is not None
            and dataset_name == "train"
            and isinstance(dataset, Dataset)
            and "chosen" not in dataset.column_names
        ):
            return dataset  # prompt-only: the pairs come from the refreshes
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self._resampling and name == "train":
            return dataset  # each window gets its reference log-probs at its refresh
        return super()._precompute_ref_logps(dataset, name, batch_size)

    # ---- the loop: the Trainer draws each step's batches from the current window -----------------------------

    def get_train_dataloader(self):
        if not self._resampling:
            return super().get_train_dataloader()
        # Only counts steps and epochs (Trainer sizes the run with it); the batches come from get_batch_samples
        indices = DataLoader(range(len(self.train_dataset)), batch_size=_trl.train_batch_size(self))
        return self.accelerator.prepare(indices)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if not self._resampling:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        step, every = self.state.global_step, self.args.resample_every
        if self._window is None or step // every > self._last_refresh // every:  # steps 0, k, 2k, ...
            self._refresh()
        metrics = _trl.metrics(self, "train")
        for key, value in self._window_stats.items():
            metrics[f"resample/{key}"].append(value)
        metrics["resample/age"].append(float(step - self._window_step))
        batches = [self._next_window_batch() for _ in range(num_batches)]
        return batches, _trl.num_items_in_batch(self, batches, device)

    def _next_window_batch(self) -> dict:
        """This process's slice of the next global batch of the window stream (seeded permutations, end to end)."""
        size = self.args.per_device_train_batch_size
        start = (self._window_batches * self.accelerator.num_processes + self.accelerator.process_index) * size
        self._window_batches += 1
        n = len(self._window)
        rows = []
        for position in range(start, start + size):
            epoch, offset = divmod(position, n)
            if epoch not in self._window_perms:
                generator = torch.Generator().manual_seed(_seed("window", self.args.seed, self._window_step, epoch))
                self._window_perms = {epoch: torch.randperm(n, generator=generator).tolist()}
            rows.append(self._window_perms[epoch][offset])
        return self._collate(self._window.select(rows), with_sampler_logps=True)

    def _collate(self, pairs: Dataset, with_sampler_logps: bool = False) -> dict:
        keys = [key for key in _TOKEN_COLUMNS if key in pairs.column_names]
        columns = {key: pairs[key] for key in keys}
        batch = self.data_collator([{key: columns[key][i] for key in keys} for i in range(len(pairs))])
        if with_sampler_logps:
            batch["sampler_chosen_logps"] = torch.tensor(pairs["sampler_chosen_logps"], dtype=torch.float32)
        return batch

    # ---- a refresh: sample -> label -> pair -> tokenize -> replace the window ------------------------------

    def _refresh_prompt_rows(self, refresh_index: int) -> list[int]:
        """Rows of the prompt table sampled at refresh number ``refresh_index``: consecutive slices of an endless
        stream of seeded shuffles of the distinct prompts, so every prompt comes up once per pass."""
        n_prompts, count = len(self._prompt_source), self._num_refresh_prompts
        rows, perms = [], {}
        for position in range(refresh_index * count, (refresh_index + 1) * count):
            epoch, offset = divmod(position, n_prompts)
            if epoch not in perms:
                generator = torch.Generator().manual_seed(_seed("prompts", self.args.seed, epoch))
                perms[epoch] = torch.randperm(n_prompts, generator=generator).tolist()
            rows.append(perms[epoch][offset])
        return rows

    def _local_share(self, n: int) -> tuple[list[int], int]:
        """Indices 0..n-1 of this process (contiguous, in process order) and the per-process count every process
        pads to, so all processes make the same number of generate / forward calls."""
        share = -(-n // self.accelerator.num_processes)
        start = self.accelerator.process_index * share
        return list(range(start, min(n, start + share))), share

    @torch.no_grad()
    def _refresh(self):
        args, step = self.args, self.state.global_step
        rows = self._refresh_prompt_rows(step // args.resample_every)
        local, share = self._local_share(len(rows))
        local_rows = [rows[i] for i in local]
        padded_rows = local_rows + [rows[0]] * (share - len(local_rows))
        seed = _seed("generate", args.seed, step, self.accelerator.process_index)
        completions, completion_ids = self._generate([self._prompt_source[row]["prompt"] for row in padded_rows], seed)
        completions, completion_ids = completions[: len(local_rows)], completion_ids[: len(local_rows)]
        self._nonfinite_rewards = 0
        rewards = self._score(local_rows, completions, completion_ids)
        groups = gather_object(list(zip(local_rows, completions, rewards, strict=True)))  # all processes, in order
        scored_values = sum(len(scores) for _, _, scores in groups) * len(self.reward_funcs)
        nonfinite = sum(gather_object([self._nonfinite_rewards]))
        _trl.metrics(self, "train")[guards.REWARD_METRIC].append(nonfinite / max(scored_values, 1))
        prompts = [self._prompt_source[row]["prompt"] for row, _, _ in groups]
        pairs, ties = build_preference_pairs(prompts, [g for _, g, _ in groups], [s for _, _, s in groups])
        all_rewards = [r for _, _, scores in groups for r in scores if r is not None and not math.isnan(r)]

        if args.resample_update_reference:
            self._sync_reference()
        with _quiet_datasets():
            window = self._build_window(pairs, step)
        stats = {
            "reward_mean": sum(all_rewards) / len(all_rewards) if all_rewards else float("nan"),
            "pairs": float(len(pairs)),
            "ties": float(ties),
            "offline_pairs": float(0 if window is None else len(window) - sum(window["resampled"])),
            "margin": sum(p["chosen_reward"] - p["rejected_reward"] for p in pairs) / len(pairs) if pairs else 0.0,
        }
        self.refresh_log.append({"step": step, **stats})
        self._last_refresh = step
        if window is None or len(window) == 0:
            if self._window is None:
                raise RuntimeError(
                    f"The refresh at step {step} produced no preference pair ({ties} of {len(groups)} prompts tied: all "
                    "their completions got the same reward) and there is no earlier window to keep training on. Use a "
                    "graded reward, more resample_num_completions, a higher resample_temperature, or resample_mix > 0."
                )
            warnings.warn(
                f"The refresh at step {step} produced no preference pair ({ties} ties): training goes on with the "
                f"window sampled at step {self._window_step}.",
                stacklevel=2,
            )
            self._window_stats.update({k: stats[k] for k in ("reward_mean", "pairs", "ties", "margin")})
            return
        self._window, self._window_step, self._window_batches, self._window_perms = window, step, 0, {}
        self._window_stats = stats

    def _generate(self, prompts: list, seed: int) -> tuple[list[list], list[list[list[int]]]]:
        """``resample_num_completions`` sampled completions (token ids, and text: a string, or for conversational
        prompts GRPO's ``[{"role": "assistant", "content": text}]``) per prompt, from the current policy, in
        left-padded batches. The prompt is tokenized as TRL's DPO tokenizes it for training (chat template with the
        generation prompt). Seeded, so a refresh depends only on the weights and the step."""
        args, tokenizer = self.args, _trl.dpo_tokenizer(self)
        n, batch_size = args.resample_num_completions, args.resample_batch_size or args.per_device_train_batch_size
        eos = self._generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        device = self.accelerator.device
        texts, ids = [], []
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs
            ) as unwrapped,
            _trl.full_params(self, self.model_wrapped),
        ):
            torch.manual_seed(seed)
            training = unwrapped.training
            unwrapped.eval()
            try:
                for start in range(0, len(prompts), batch_size):
                    chunk = prompts[start : start + batch_size]
                    template = {"add_generation_prompt": True} if self._conversational else {}
                    prompt_ids = [torch.tensor(_trl.tokenize_prompt(self.processing_class, p, **template)) for p in chunk]
                    input_ids = pad(prompt_ids, padding_value=tokenizer.pad_token_id, padding_side="left").to(device)
                    attention_mask = pad(
                        [torch.ones_like(p) for p in prompt_ids], padding_value=0, padding_side="left"
                    ).to(device)
                    output = unwrapped.generate(
                        input_ids=input_ids, attention_mask=attention_mask, generation_config=self._generation_config
                    )
                    for row in output[:, input_ids.size(1) :].tolist():
                        cut = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
                        ids.append(row[:cut])
            finally:
                unwrapped.train(training)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True) if ids else []
        if self._conversational:
            texts = [[{"role": "assistant", "content": text}] for text in texts]
        group = lambda items: [items[i : i + n] for i in range(0, len(items), n)]  # noqa: E731
        return group(texts), group(ids)

    def _score(self, rows: list[int], completions: list[list], completion_ids) -> list[list[float]]:
        """The label of each completion: the ``reward_weights``-weighted sum of its rewards, the rewards that are None
        left out (NaN where all are), with GRPO's keyword arguments (``prompts``, ``completions``,
        ``completion_ids``, ``trainer_state`` and the dataset's columns); async functions run concurrently."""
        n = self.args.resample_num_completions
        flat = [c for group in completions for c in group]
        if not flat:
            return []
        table = self._prompt_source.select(rows)
        columns = {key: [v for v in table[key] for _ in range(n)] for key in table.column_names if key != "prompt"}
        prompts = [p for p in table["prompt"] for _ in range(n)]
        kwargs = dict(
            prompts=prompts,
            completions=flat,
            completion_ids=[i for group in completion_ids for i in group],
            trainer_state=self.state,
            **columns,
        )
        rewards = torch.full((len(flat), len(self.reward_funcs)), math.nan, dtype=torch.float64)
        pending = []  # (column, coroutine) of the async reward functions
        for i, (func, tokenizer) in enumerate(zip(self.reward_funcs, self.reward_processing_classes, strict=True)):
            if isinstance(func, torch.nn.Module):  # a reward model (prepared: possibly wrapped)
                rewards[:, i], infinite = guards.nonfinite_to_nan(self._model_rewards(func, tokenizer, prompts, flat))
                self._nonfinite_rewards += infinite
            elif is_async_callable(func):
                pending.append((i, func(**kwargs)))
            else:
                rewards[:, i] = self._as_rewards(func, func(**kwargs), len(flat))
        if pending:

            async def gather():
                return await asyncio.gather(*(coroutine for _, coroutine in pending))

            outputs = asyncio.run_coroutine_threadsafe(gather(), self._async_loop).result()
            for (i, _), values in zip(pending, outputs, strict=True):
                rewards[:, i] = self._as_rewards(self.reward_funcs[i], values, len(flat))
        weights = torch.tensor(self.args.reward_weights or [1.0] * len(self.reward_funcs), dtype=torch.float64)
        total, overflowed = guards.nonfinite_to_nan((rewards * weights).nansum(dim=1))  # finite rewards, inf sum
        self._nonfinite_rewards += overflowed
        total[rewards.isnan().all(dim=1)] = math.nan
        return [total[i : i + n].tolist() for i in range(0, len(flat), n)]

    def _as_rewards(self, func, values, expected: int) -> torch.Tensor:
        """A reward function's output checked by ``guards.checked_rewards`` as float64: None and NaN/inf are
        unscorable (NaN; the non-finite ones counted for ``reward/nonfinite_frac``), one per completion or a clear
        error."""
        values, nonfinite = guards.checked_rewards(values, expected, get_callable_name(func))
        self._nonfinite_rewards += nonfinite
        return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)

    @torch.no_grad()
    def _model_rewards(self, model, tokenizer, prompts: list, completions: list) -> torch.Tensor:
        """A reward model's score of each prompt + completion, as GRPO computes it: the chat template applied to the
        whole conversation (conversational prompts) or the texts joined, right-padded, the head's one logit."""
        if is_conversational({"prompt": prompts[0]}):
            texts = [
                apply_chat_template({"messages": p + c}, tokenizer)["text"] for p, c in zip(prompts, completions, strict=True)
            ]
        else:
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        batch_size = (self.args.resample_batch_size or self.args.per_device_train_batch_size) * self.args.resample_num_completions
        scores = []
        for start in range(0, len(texts), batch_size):
            inputs = tokenizer(
                text=texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="right",
                add_special_tokens=False,
            ).to(self.accelerator.device)
            scores.append(model(**inputs).logits[:, 0].double().cpu())
        return torch.cat(scores)

    def _build_window(self, pairs: list[dict], step: int) -> Dataset | None:
        """The fresh pairs (tokenized by TRL's DPO preparation) plus the kept offline pairs, with the sampler's
        log-probs of the fresh chosen answers and, with precompute_ref_log_probs, the reference log-probs."""
        args = self.args
        parts = []
        if pairs:
            keys = ("prompt", "chosen", "rejected", "chosen_reward", "rejected_reward")
            fresh = Dataset.from_dict({key: [p[key] for p in pairs] for key in keys})
            fresh = _trl.prepare_dpo_dataset(self, fresh, "resampled")
            parts.append(fresh.add_column("resampled", [True] * len(fresh)))
        if args.resample_mix > 0 and self._offline_pairs:
            n_offline = round(args.resample_mix * len(self.train_dataset))
            generator = torch.Generator().manual_seed(_seed("mix", args.seed, step))
            keep = sorted(torch.randperm(len(self.train_dataset), generator=generator)[:n_offline].tolist())
            if keep:
                offline = self.train_dataset.select(keep)
                offline = offline.add_column("chosen_reward", [math.nan] * len(offline))
                offline = offline.add_column("rejected_reward", [math.nan] * len(offline))
                parts.append(offline.add_column("resampled", [False] * len(offline)))
        if not parts:
            return None
        columns = [
            "prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids",
            "chosen_reward", "rejected_reward", "resampled",
        ]
        window = Dataset.from_dict({key: [v for part in parts for v in part[key]] for key in columns})
        if len(window) == 0:
            return window
        resampled = window["resampled"]
        fresh_rows = [i for i, r in enumerate(resampled) if r]
        sampler = [math.nan] * len(window)
        for row, value in zip(fresh_rows, self._sharded_logps(window.select(fresh_rows), reference=False), strict=True):
            sampler[row] = value[0]
        window = window.add_column("sampler_chosen_logps", sampler)
        if args.precompute_ref_log_probs:
            ref = self._sharded_logps(window, reference=True)
            window = window.add_column("ref_chosen_logps", [c for c, _ in ref])
            window = window.add_column("ref_rejected_logps", [r for _, r in ref])
        return window

    def _sharded_logps(self, pairs: Dataset, reference: bool) -> list[tuple[float, float]]:
        """(chosen, rejected) sequence log-probs of ``pairs`` under the current policy (``reference=False``, the same
        fused forward as DPO's loss) or the reference (TRL's ``compute_ref_log_probs``), split over processes."""
        local, share = self._local_share(len(pairs))
        if not len(pairs):
            return []
        batch_size = self.args.resample_batch_size or self.args.per_device_train_batch_size
        padded = local + [0] * (share - len(local))
        out = []
        training = self.model.training
        self.model.train()  # the mode of the training forward (dropout is off unless disable_dropout=False)
        try:
            for start in range(0, len(padded), batch_size):
                batch = self._collate(pairs.select(padded[start : start + batch_size]))
                batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
                if reference:
                    reference_model = self.model if self.ref_model is None else self.ref_model
                    chosen, rejected = self.compute_ref_log_probs(reference_model, batch)
                else:
                    chosen, rejected = self._policy_logps(batch)
                out += list(zip(chosen.float().tolist(), rejected.float().tolist(), strict=True))
        finally:
            self.model.train(training)
        return gather_object(out[: len(local)])

    def _policy_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            outputs = self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=labels,
                fused_lm_head=True,
                use_cache=False,
            )
        logps = outputs.log_probs[:, -(batch["completion_mask"].size(1) - 1) :].sum(dim=1)
        return logps.chunk(2, dim=0)

    def _sync_reference(self):
        """resample_update_reference: the reference becomes the current policy."""
        if self.ref_model is not None:
            _trl.mix_into_reference(
                self.accelerator.unwrap_model(self.model), self.accelerator.unwrap_model(self.ref_model), 1.0
            )
        elif is_peft_model(self.accelerator.unwrap_model(self.model)):
            self._copy_adapter_to_reference()
        # else: full fine-tuning with precompute_ref_log_probs: the window's reference log-probs are computed from
        # the current policy at this refresh, which is the reference

    def _copy_adapter_to_reference(self):
        peft_model = self.accelerator.unwrap_model(self.model)
        for name, param in peft_model.named_parameters():
            if ".default." in name:
                peft_model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)

    # ---- loss: TRL's, plus the staleness of the window read from its policy forward ---------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sampler_logps = inputs.pop("sampler_chosen_logps", None)
        if sampler_logps is None or not self.model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        captured = []

        def capture(module, args, output):  # the first forward of DPO's loss is the policy's
            if not captured:
                captured.append(output.log_probs.detach())

        handle = self.accelerator.unwrap_model(model).register_forward_hook(capture)
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        if captured:
            seq_len = inputs["completion_mask"].size(1) - 1
            chosen = captured[0][:, -seq_len:].sum(dim=1).chunk(2, dim=0)[0].float()
            self._log_staleness(chosen - sampler_logps.to(chosen.device))
        return result

    def _log_staleness(self, log_ratio: torch.Tensor):
        """Mean and ESS fraction of the importance weights pi_theta / pi_sampler of the window's chosen answers
        (offline pairs, whose sampler is unknown, carry NaN and are left out)."""
        log_ratio = self.accelerator.gather(log_ratio)
        log_ratio = log_ratio[torch.isfinite(log_ratio)]
        if log_ratio.numel() == 0:
            return
        metrics = _trl.metrics(self, "train")
        metrics["resample/staleness_logratio"].append(log_ratio.mean().item())
        metrics["resample/ess"].append(effective_sample_size(log_ratio).item())

    # ---- checkpoints: the window and the schedule are training state --------------------------------------

    def _trl_kl_state_files(self) -> list[str]:
        return [WINDOW_STATE, f"{WINDOW_DIR}/"] if self._resampling else []

    def _save_trl_kl_state(self, folder: str) -> None:
        if not self._resampling or self._window is None or self.args.save_only_model or not self.args.should_save:
            return
        self._window.save_to_disk(os.path.join(folder, WINDOW_DIR))
        state = {
            "last_refresh": self._last_refresh,
            "window_step": self._window_step,
            "window_batches": self._window_batches,
            "window_stats": self._window_stats,
        }
        with open(os.path.join(folder, WINDOW_STATE), "w") as f:
            json.dump(state, f, indent=2)

    def _load_trl_kl_state(self, folder: str) -> None:
        if not self._resampling:
            return
        with open(os.path.join(folder, WINDOW_STATE)) as f:
            state = json.load(f)
        self._window = Dataset.load_from_disk(os.path.join(folder, WINDOW_DIR), keep_in_memory=True)
        self._last_refresh, self._window_step = state["last_refresh"], state["window_step"]
        self._window_batches, self._window_stats = state["window_batches"], state["window_stats"]
        self._window_perms = {}
