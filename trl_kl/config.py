"""Configuration shared by trl_kl's RL trainers: the KL fields, their resolved form, and field validators.

* ``KLConfigMixin``: the fields ``GRPOConfig`` and ``PPOConfig`` share (``kl_estimator``, ``kl_placement``, the
  adaptive control, ... next to TRL's ``beta``), their validation, and ``kl_settings()``, which resolves them once
  into a frozen ``KLSettings``: the one object the trainers read the KL configuration from.
* ``truncated_sampling``: the generation settings (top-p, top-k, min-p, ...) that make the sampler draw from a
  truncated distribution, which no importance weight corrects: refused with a KL term (TRL issue #6789).
* Validators for config fields, each raising one ``ValueError`` that names the field, what it must be and the
  value it got: ``check_bool``, ``check_int``, ``check_number`` (finite, with optional bounds), ``check_numbers``
  (a list of them), ``check_choice``, ``check_items`` (a list of choices). ``None`` passes where the field is
  optional (``optional=True``); ``why`` adds the field's meaning to the message.
* The fields of transformers and TRL that trl_kl relies on, checked at construction by all three configs
  (``check_training_fields``, ``check_reference_sync_fields``) and by GRPO's and PPO's (``check_rollout_fields``,
  ``check_generation_kwargs``, ``check_rollout_combinations``): TRL computes with several of them in its own
  ``__post_init__`` (a string batch size there is a bare ``TypeError``) and refuses others only inside ``train()``,
  with torch or generation errors (docs/reliability.md#before-training).

The theory behind the fields: docs/theory.md (estimators, placement, sequence-kl, adaptive-kl).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import ClassVar

from . import _trl, importance, kl
from .advantages import SCALE_MODES

# ---------------------------------------------------------------------------------------------------
# Validators
# ---------------------------------------------------------------------------------------------------


def _message(name: str, requirement: str, value: object, optional: bool, why: str | None) -> str:
    return f"{name} must be {requirement}{' or None' if optional else ''}{f' ({why})' if why else ''}, got {value!r}."


def check_bool(name: str, value: object, *, why: str | None = None) -> None:
    """``value`` must be ``True`` or ``False`` itself: not 0/1, not the string ``"false"`` (which is truthy)."""
    if not isinstance(value, bool):
        raise ValueError(_message(name, "True or False", value, False, why))


def check_choice(name: str, value: object, choices: Collection, *, why: str | None = None) -> None:
    """``value`` must be one of ``choices`` (compared by equality and type, so ``True`` is not ``1``)."""
    if not any(value == choice and type(value) is type(choice) for choice in choices):
        raise ValueError(_message(name, f"one of {tuple(choices)}", value, False, why))


def _bounds(greater_than, at_least, less_than, at_most) -> tuple[str | None, str | None, str | None]:
    """(interval, lower, upper) texts of the bounds, e.g. ``"in [0, 1]"``, ``"> 0"``, ``"<= 1"``."""
    lower = f"> {greater_than:g}" if greater_than is not None else f">= {at_least:g}" if at_least is not None else None
    upper = f"< {less_than:g}" if less_than is not None else f"<= {at_most:g}" if at_most is not None else None
    interval = None
    if lower and upper:
        left = f"({greater_than:g}" if greater_than is not None else f"[{at_least:g}"
        right = f"{less_than:g})" if less_than is not None else f"{at_most:g}]"
        interval = f"in {left}, {right}"
    return interval, lower, upper


def _within(value, greater_than, at_least, less_than, at_most) -> bool:
    return (
        (greater_than is None or value > greater_than)
        and (at_least is None or value >= at_least)
        and (less_than is None or value < less_than)
        and (at_most is None or value <= at_most)
    )


def check_number(
    name: str,
    value: object,
    *,
    greater_than: float | None = None,
    at_least: float | None = None,
    less_than: float | None = None,
    at_most: float | None = None,
    optional: bool = False,
    why: str | None = None,
) -> None:
    """``value`` must be a finite real number (an int or a float; not a bool, NaN or inf) within the bounds given:
    ``> greater_than``, ``>= at_least``, ``< less_than``, ``<= at_most``. With ``optional``, None passes.

    Example: ``check_number("gamma", 1.5, at_least=0, at_most=1)`` raises "gamma must be in [0, 1], got 1.5."
    """
    if value is None and optional:
        return
    interval, lower, upper = _bounds(greater_than, at_least, less_than, at_most)
    requirement = interval or f"a finite number {lower or upper or ''}".rstrip()
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (is_number and math.isfinite(value) and _within(value, greater_than, at_least, less_than, at_most)):
        raise ValueError(_message(name, requirement, value, optional, why))


def check_int(
    name: str,
    value: object,
    *,
    at_least: int | None = None,
    at_most: int | None = None,
    optional: bool = False,
    why: str | None = None,
) -> None:
    """``value`` must be an int (not a bool, not a float such as 2.0) in ``[at_least, at_most]`` (either bound may be
    omitted). With ``optional``, None passes.

    Example: ``check_int("resample_every", 0, at_least=1, optional=True)`` raises
    "resample_every must be an integer >= 1 or None, got 0."
    """
    if value is None and optional:
        return
    interval, lower, upper = _bounds(None, at_least, None, at_most)
    requirement = f"an integer {interval or lower or upper or ''}".rstrip()
    if not (isinstance(value, int) and not isinstance(value, bool) and _within(value, None, at_least, None, at_most)):
        raise ValueError(_message(name, requirement, value, optional, why))


def check_numbers(name: str, value: object, *, optional: bool = False, why: str | None = None) -> None:
    """``value`` must be a list (or tuple) of finite real numbers. With ``optional``, None passes."""
    if value is None and optional:
        return
    finite = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if not (isinstance(value, (list, tuple)) and all(finite(v) for v in value)):
        raise ValueError(_message(name, "a list of finite numbers", value, optional, why))


def check_items(name: str, value: object, choices: Collection, *, why: str | None = None) -> None:
    """``value`` must be a non-empty list (or tuple) whose items are each one of ``choices``."""
    if not (isinstance(value, (list, tuple)) and value and all(item in choices for item in value)):
        raise ValueError(_message(name, f"a non-empty list of values from {tuple(choices)}", value, False, why))


# ---------------------------------------------------------------------------------------------------
# transformers' and TRL's fields that trl_kl relies on
# ---------------------------------------------------------------------------------------------------


def check_training_fields(config) -> None:
    """The optimisation fields of every trl_kl config (transformers' ``TrainingArguments`` and trl_kl's own
    ``skip_nonfinite_steps``): each one's type and range. Runs before TRL's checks, which compute with the batch
    sizes (a string there is a bare ``TypeError``); torch refused a bad learning rate only in ``train()``."""
    check_int("per_device_train_batch_size", config.per_device_train_batch_size, at_least=1)
    check_int("gradient_accumulation_steps", config.gradient_accumulation_steps, at_least=1)
    check_number("learning_rate", config.learning_rate, greater_than=0, why="the optimizer's step size")
    check_number("max_grad_norm", config.max_grad_norm, at_least=0, why="the norm gradients are clipped to; 0: none")
    check_bool("skip_nonfinite_steps", config.skip_nonfinite_steps)


def check_rollout_fields(config) -> None:
    """TRL's ``GRPOConfig`` fields that the rollout and TRL's surrogate (which trl_kl runs with its own KL term)
    compute with, for GRPO and PPO: each one's type and range, before TRL's checks (which then refuse fewer than 2
    generations for GRPO; PPO takes 1)."""
    check_int("num_generations", config.num_generations, at_least=1, why="completions per prompt")
    check_int("num_generations_eval", config.num_generations_eval, at_least=1, optional=True,
              why="None: num_generations")
    check_int("generation_batch_size", config.generation_batch_size, at_least=1, optional=True)
    check_int("steps_per_generation", config.steps_per_generation, at_least=1, optional=True)
    check_int("num_iterations", config.num_iterations, at_least=1,
              why="updates per generation batch, 1 on-policy; 0 trained nothing")
    check_int("max_completion_length", config.max_completion_length, at_least=1, optional=True)
    # sampling: TRL's ranges, refused by transformers' generate only inside train()
    check_number("temperature", config.temperature, greater_than=0, why="logits are divided by it")
    check_number("top_p", config.top_p, greater_than=0, at_most=1, optional=True, why="1.0: no top-p")
    check_int("top_k", config.top_k, at_least=-1, optional=True, why="0: no top-k")
    check_number("min_p", config.min_p, at_least=0, at_most=1, optional=True)
    check_number("repetition_penalty", config.repetition_penalty, greater_than=0, why="1.0: no penalty")
    # TRL's surrogate
    check_number("epsilon", config.epsilon, at_least=0, why="the clip range 1 - epsilon")
    check_number("epsilon_high", config.epsilon_high, at_least=0, optional=True, why="None: epsilon")
    check_number("delta", config.delta, greater_than=0, optional=True, why="two-sided clip of the ratio")
    check_numbers("reward_weights", config.reward_weights, optional=True, why="one per reward function")
    check_choice("loss_type", config.loss_type, _trl.GRPO_LOSS_TYPES)
    check_choice("importance_sampling_level", config.importance_sampling_level, importance.IMPORTANCE_SAMPLING_LEVELS)
    check_choice("multi_objective_aggregation", config.multi_objective_aggregation, _trl.MULTI_OBJECTIVE_AGGREGATIONS)
    check_choice("scale_rewards", config.scale_rewards, (*SCALE_MODES, True, False), why="True: group, False: none")
    for name in ("sapo_temperature_neg", "sapo_temperature_pos"):
        check_number(name, getattr(config, name), greater_than=0, why="the sapo gate divides by it")
    for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef"):
        check_number(name, getattr(config, name))
    check_number("top_entropy_quantile", config.top_entropy_quantile, at_least=0, at_most=1)
    check_number("off_policy_mask_threshold", config.off_policy_mask_threshold, greater_than=0, optional=True)
    for name in ("mask_truncated_completions", "use_vllm", "vllm_importance_sampling_correction", "sync_ref_model",
                 "use_adaptive_entropy"):
        check_bool(name, getattr(config, name))
    check_choice("vllm_importance_sampling_mode", config.vllm_importance_sampling_mode,
                 importance.SAMPLER_CORRECTION_MODES)
    check_number("vllm_importance_sampling_clip_max", config.vllm_importance_sampling_clip_max, greater_than=0,
                 optional=True)
    check_number("vllm_importance_sampling_clip_min", config.vllm_importance_sampling_clip_min, at_least=0,
                 optional=True)
    check_reference_sync_fields(config)


_GENERATION_KWARGS = {
    "temperature": dict(greater_than=0),
    "repetition_penalty": dict(greater_than=0),
    "top_p": dict(greater_than=0, at_most=1),
    "min_p": dict(at_least=0, at_most=1),
    "typical_p": dict(greater_than=0, at_most=1),
    "epsilon_cutoff": dict(at_least=0, less_than=1),
    "eta_cutoff": dict(at_least=0, less_than=1),
}
"""Sampling keys of ``generation_kwargs`` (which override TRL's fields in ``generate``) and their ranges."""


def check_generation_kwargs(config) -> None:
    """The sampling keys of a ``generation_kwargs`` dict (TRL passes it on to ``generate`` or vLLM over its own
    fields; a JSON string is a dict once TRL's checks ran): the ranges of the fields they override."""
    kwargs = config.generation_kwargs
    if not isinstance(kwargs, dict):
        return
    for key, bounds in _GENERATION_KWARGS.items():
        if key in kwargs:
            check_number(f"generation_kwargs[{key!r}]", kwargs[key], optional=True, **bounds)
    if "top_k" in kwargs:
        check_int("generation_kwargs['top_k']", kwargs["top_k"], at_least=-1, optional=True, why="0: no top-k")
    if "do_sample" in kwargs:
        check_bool("generation_kwargs['do_sample']", kwargs["do_sample"])


def changed_settings(config, names) -> str:
    """``"name=value, ..."`` for the fields of ``names`` set away from their dataclass defaults ("" when none is):
    what an error about fields that would have no effect names."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    return ", ".join(f"{name}={getattr(config, name)!r}" for name in names if getattr(config, name) != defaults[name])


def check_reference_sync_fields(config) -> None:
    """TR-DPO's reference sync (GRPO, PPO, DPO): ``ref_model_mixup_alpha`` in [0, 1], ``ref_model_sync_steps`` >= 1,
    and neither set away from its default without ``sync_ref_model=True``, where TRL ignores them."""
    check_number("ref_model_mixup_alpha", config.ref_model_mixup_alpha, at_least=0, at_most=1)
    check_int("ref_model_sync_steps", config.ref_model_sync_steps, at_least=1)
    if not config.sync_ref_model:
        settings = changed_settings(config, ("ref_model_mixup_alpha", "ref_model_sync_steps"))
        if settings:
            raise ValueError(
                f"{settings} only acts when the reference is synced with the policy: set sync_ref_model=True, or "
                "leave it at its default."
            )


def check_rollout_combinations(config) -> None:
    """The rules between TRL's GRPOConfig fields that trl_kl adds (GRPO, PPO), after TRL's checks."""
    if config.max_completion_length is None and config.loss_type == "dr_grpo":
        raise ValueError(
            "loss_type='dr_grpo' (trl_kl's default) divides the loss by max_completion_length, so it must be an "
            "integer (e.g. 256), not None; or choose another loss_type."
        )
    overrides = config.generation_kwargs if isinstance(config.generation_kwargs, dict) else {}
    if overrides.get("top_k", config.top_k) == -1 and not config.use_vllm:
        raise ValueError(
            "top_k=-1 is vLLM's spelling of 'no top-k'; transformers' generate (use_vllm=False) refuses it inside "
            "train(). Use top_k=0 (TRL's default)."
        )


# ---------------------------------------------------------------------------------------------------
# Sampling settings that truncate the sampler
# ---------------------------------------------------------------------------------------------------

_UNTRUNCATED = {
    "top_p": lambda v: v is None or v >= 1,
    "top_k": lambda v: v is None or v <= 0,  # 0 (TRL, transformers) or -1 (vLLM): no top-k
    "min_p": lambda v: v is None or v <= 0,
    "typical_p": lambda v: v is None or v >= 1,
    "epsilon_cutoff": lambda v: v is None or v <= 0,
    "eta_cutoff": lambda v: v is None or v <= 0,
    "do_sample": lambda v: v is None or v is True,  # False: greedy, the most likely token only
}
"""Generation settings that restrict sampling to part of the vocabulary, with the values that do not."""


def truncated_sampling(config) -> list[str]:
    """The settings of a TRL generation config (``top_p``, ``top_k``, ``min_p`` and the truncating keys of
    ``generation_kwargs``, which override them) that make the sampler draw from a truncated distribution, as
    ``"name=value"`` texts; empty when it samples the whole distribution."""
    values = {name: getattr(config, name, None) for name in _UNTRUNCATED}
    overrides = getattr(config, "generation_kwargs", None)
    if isinstance(overrides, dict):
        values.update({name: value for name, value in overrides.items() if name in _UNTRUNCATED})
    return [f"{name}={value!r}" for name, value in values.items() if not _UNTRUNCATED[name](value)]


def check_loss_masks(config, kl_in_advantage: bool, outside: str = "kl_placement='loss'") -> None:
    """TRL's loss masks (``top_entropy_quantile < 1``, ``off_policy_mask_threshold``) multiply its per-token loss; a
    KL penalty carried in the advantage would be dropped wherever they are 0, so the update would no longer follow
    the sequence KL (stock TRL adds its own KL after the masks). Refused there unless ``allow_unsound_kl``; the error
    names ``outside``, the settings that keep the KL a term of its own."""
    masks = [f"top_entropy_quantile={config.top_entropy_quantile}"] if config.top_entropy_quantile < 1 else []
    if config.off_policy_mask_threshold is not None:
        masks.append(f"off_policy_mask_threshold={config.off_policy_mask_threshold}")
    if kl_in_advantage and masks and not config.allow_unsound_kl:
        raise ValueError(
            f"{' and '.join(masks)} with the KL in the reward: TRL multiplies its per-token loss by these masks "
            "(low-entropy tokens; negative-advantage sequences that drifted from the sampler), and with "
            "kl_placement='reward' the advantages in that loss carry the KL penalty, so the penalty would be dropped "
            "wherever the mask is 0 and the update would no longer follow the sequence KL (stock TRL adds its own "
            f"KL after the masks). Use {outside} (the KL as its own term, outside the masks), drop the mask, "
            "or set allow_unsound_kl=True for an ablation."
        )


def reshaped_sampling(config) -> list[str]:
    """The settings of a TRL generation config that make the sampler draw from another distribution than the one
    TRL computes the policy's log-probabilities of (``temperature``), without cutting tokens: a repetition penalty,
    an n-gram ban, or a ``generation_kwargs`` temperature other than ``temperature``; as ``"name=value"`` texts."""
    values = {"repetition_penalty": getattr(config, "repetition_penalty", None)}
    overrides = getattr(config, "generation_kwargs", None)
    if isinstance(overrides, dict):
        values.update({k: v for k, v in overrides.items() if k in ("repetition_penalty", "no_repeat_ngram_size")})
        if "temperature" in overrides and overrides["temperature"] != getattr(config, "temperature", None):
            values["generation_kwargs temperature"] = overrides["temperature"]
    kept = {"repetition_penalty": lambda v: v is None or v == 1, "no_repeat_ngram_size": lambda v: not v}
    return [f"{name}={value!r}" for name, value in values.items() if not kept.get(name, lambda v: False)(value)]


# ---------------------------------------------------------------------------------------------------
# The KL settings
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KLSettings:
    """The KL configuration of a run, resolved once from the config (``KLConfigMixin.kl_settings()``).

    The coefficient is not here: it is the trainer's ``kl_coef`` (``beta`` at the start, moved by ``target``)."""

    estimator: str
    """``kl_estimator``: k1, k2, k3, k3_clip or full (docs/theory.md#estimators)."""
    placement: str
    """``kl_placement``: "reward" (a detached penalty in the per-token advantage) or "loss"
    (docs/theory.md#placement)."""
    reward_scope: str | None
    """``kl_reward_scope`` (GRPO, reward placement): what each token's advantage carries of the penalty. None: the
    trainer carries the penalty itself (PPO puts it into its per-token rewards before GAE)."""
    k3_clip_max: float
    """Clamp of the ratio pi_ref/pi for k3_clip (appendix D)."""
    bias_correction: bool
    """``use_bias_correction_kl``: the loss placement's importance ratio keeps its gradient."""
    token_chunk_size: int | None
    """kl_estimator="full": rows per tile of TRL's chunked kernel (None: TRL's)."""
    vocab_chunk_size: int | None
    """kl_estimator="full": vocabulary columns per tile (None: TRL's)."""
    target: float | None
    """``kl_target``: adaptive KL control's target sequence KL (docs/theory.md#adaptive-kl); None: fixed coefficient."""
    horizon: float
    """``kl_horizon``: adaptive KL control's horizon, in samples."""
    importance_weight: str = "token"
    """``kl_importance_weight`` (GRPO): how the KL term is corrected for the sampler, "token" (through TRL's
    per-token ratio, clip and sampler correction) or "sequence" (by pi_theta(y) / q(y), the exact form;
    docs/theory.md#sampler-mismatch). PPO: always "token"."""

    @property
    def in_reward(self) -> bool:
        return self.placement == "reward"


@dataclass
class KLConfigMixin:
    """The KL fields of trl_kl's RL configs, mixed in before TRL's config (``class GRPOConfig(KLConfigMixin,
    trl.GRPOConfig)``); ``beta`` stays TRL's field and keeps its meaning (the KL coefficient; 0 loads no reference
    model). The rule for ``beta=0``: every KL field must then keep its default (there is no KL term for it to act
    on), else the config raises naming the fix.

    ``__post_init__`` in order: ``_check_fields`` (each field's type and range: a bad value fails here, naming the
    field, not as a bare ``TypeError`` in TRL's arithmetic or an error inside ``train()``), ``_run_trl_checks``
    (transformers' and TRL's own), ``check_generation_kwargs``, ``_validate_kl``, ``_check_combinations``."""

    loss_type: str = field(
        default="dr_grpo",
        metadata={
            "help": "TRL's loss aggregation. trl_kl defaults to 'dr_grpo' (TRL: 'dapo'): a constant normaliser, so the "
            "gradient does not depend on how the batch is cut (gradient accumulation, processes, steps_per_generation; "
            "docs/reliability.md) and the objective stays a sum over tokens, the form whose KL gradient return-to-go "
            "makes exact (docs/theory.md#sequence-kl). Every TRL loss_type is accepted.",
        },
    )
    kl_estimator: str = field(
        default="k1",
        metadata={
            "help": "KL estimator: 'k1' (log pi/pi_ref), 'k2' ((log r)^2/2), 'k3' (r - 1 - log r), 'k3_clip' "
            "(k3 with r clamped at k3_clip_max), 'full' (exact over the vocabulary, loss placement). Needs beta > 0.",
            "choices": list(kl.ESTIMATORS),
        },
    )
    kl_placement: str = field(
        default="reward",
        metadata={
            "help": "'reward': a detached penalty in the per-token reward, under the same importance sampling and "
            "clip as the advantage (eq. 39; sound with k1). 'loss': a differentiable loss term (sound with k2). "
            "Needs beta > 0.",
            "choices": list(kl.PLACEMENTS),
        },
    )
    k3_clip_max: float = field(
        default=kl.DEFAULT_K3_CLIP_MAX,
        metadata={"help": "Upper clamp of the ratio pi_ref/pi for kl_estimator='k3_clip' (appendix D uses 10)."},
    )
    full_kl_token_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "kl_estimator='full' only: rows (completion tokens) per tile of TRL's chunked KL kernel. None: "
            "TRL's 4096. The kernel's working set is a fixed number of tiles, whatever the sequence length."
        },
    )
    full_kl_vocab_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "kl_estimator='full' only: vocabulary columns per tile. None: TRL's 32768 (right for GPUs with "
            "Triton and large vocabularies). About vocab_size / 12 keeps the CPU (torch) path within 1.2x one "
            "chunk's logits (docs/performance.md)."
        },
    )
    kl_target: float | None = field(
        default=None,
        metadata={
            "help": "Adaptive KL control (Ziegler et al. 2019): after each optimizer step, beta is moved towards the "
            "value that keeps the sequence KL at kl_target. None: beta stays fixed. Needs beta > 0."
        },
    )
    kl_horizon: float = field(
        default=10000.0,
        metadata={
            "help": "Adaptive KL control horizon, in samples (TRL's old PPO default). Only with kl_target."
        },
    )
    use_bias_correction_kl: bool = field(
        default=False,
        metadata={
            "help": "With kl_placement='loss': multiply the KL loss by the importance ratio *with* its gradient (TRL's "
            "semantics, where it defaults to True). Then k1 and k3 as losses give the per-state KL gradient "
            "(grad(rho k) = rho (k grad log pi + grad k)). False: a detached ratio, which keeps each estimator's "
            "on-policy gradient off-policy."
        },
    )
    allow_unsound_kl: bool = field(
        default=False,
        metadata={
            "help": "Allow what is refused as unsound, for ablations: the estimator/placement pairs the paper shows to "
            "be unsound (k1 as loss, k2 or full in the reward), a truncated sampler (top_p < 1, top_k, min_p) with "
            "beta > 0, and (GRPO) GSPO's sequence ratio or TRL's loss masks (top_entropy_quantile, "
            "off_policy_mask_threshold) on a KL carried in the advantage. Biased pairs (k3) only warn."
        },
    )

    KL_FIELDS: ClassVar[tuple[str, ...]] = (
        "kl_estimator",
        "kl_placement",
        "k3_clip_max",
        "full_kl_token_chunk_size",
        "full_kl_vocab_chunk_size",
        "kl_target",
        "kl_horizon",
        "use_bias_correction_kl",
        "allow_unsound_kl",
    )
    """The fields that only act through the KL term: with ``beta=0`` each must keep its default."""

    def __post_init__(self):
        self._check_fields()
        self._run_trl_checks()
        check_generation_kwargs(self)  # a JSON string is a dict once TRL's checks ran
        self._validate_kl()
        self._check_combinations()

    def _check_fields(self) -> None:
        """Each field's type and range (transformers', TRL's, trl_kl's), before TRL's checks compute with them."""
        check_training_fields(self)
        check_rollout_fields(self)

    def _run_trl_checks(self) -> None:
        """transformers' and TRL's ``__post_init__``: TRL derives the generation batch and checks its own rules."""
        super().__post_init__()

    def _check_combinations(self) -> None:
        """The rules between fields, once TRL has derived its values (subclasses add theirs)."""
        check_rollout_combinations(self)

    def kl_settings(self) -> KLSettings:
        """The KL fields, resolved (subclasses add what is theirs, e.g. GRPO's ``kl_reward_scope``)."""
        return KLSettings(
            estimator=self.kl_estimator,
            placement=self.kl_placement,
            reward_scope=None,
            k3_clip_max=float(self.k3_clip_max),
            bias_correction=self.use_bias_correction_kl,
            token_chunk_size=self.full_kl_token_chunk_size,
            vocab_chunk_size=self.full_kl_vocab_chunk_size,
            target=self.kl_target,
            horizon=float(self.kl_horizon),
        )

    def _validate_kl(self) -> None:
        """Each field's type and range, then the rules between fields; one message per failure, naming the fix."""
        check_number("beta", self.beta, at_least=0, why="the KL coefficient; 0 turns the KL off")
        check_choice("kl_estimator", self.kl_estimator, kl.ESTIMATORS)
        check_choice("kl_placement", self.kl_placement, kl.PLACEMENTS)
        check_number("k3_clip_max", self.k3_clip_max, greater_than=1, why="a clamp on pi_ref/pi")
        for name in ("full_kl_token_chunk_size", "full_kl_vocab_chunk_size"):
            check_int(name, getattr(self, name), at_least=1, optional=True, why="None: TRL's default tile")
        check_number("kl_target", self.kl_target, greater_than=0, optional=True, why="a sequence KL, in nats")
        check_number("kl_horizon", self.kl_horizon, greater_than=0, why="in samples")
        check_bool("use_bias_correction_kl", self.use_bias_correction_kl)
        check_bool("allow_unsound_kl", self.allow_unsound_kl)
        self._refuse_kl_fields_without_beta()
        self._refuse_kl_fields_without_effect()
        self._refuse_truncated_sampling()
        if self.use_bias_correction_kl:
            if self.kl_placement != "loss" or self.kl_estimator not in ("k1", "k3"):
                raise ValueError(
                    "use_bias_correction_kl=True (KL loss times the importance ratio with its gradient) is defined for "
                    "kl_placement='loss' with kl_estimator 'k1' or 'k3', where it yields the per-state KL gradient "
                    f"(TRL's default is k3); got kl_estimator={self.kl_estimator!r}, "
                    f"kl_placement={self.kl_placement!r}. Set use_bias_correction_kl=False."
                )
        elif not self._kl_loss_weighted_with_gradient():
            kl.validate_kl(self.kl_estimator, self.kl_placement, self.allow_unsound_kl)
        if self.kl_estimator == "full" and self.kl_placement != "loss":
            # SOUNDNESS refuses it already; with allow_unsound_kl there is still no per-token reward to carry
            raise ValueError(
                "kl_estimator='full' (exact KL over the vocabulary) exists only as a loss: use kl_placement='loss'."
            )

    def _kl_loss_weighted_with_gradient(self) -> bool:
        """Whether the KL loss is multiplied by a sequence importance weight with its gradient, which makes k1 and
        k3 as losses exact (GRPO's ``kl_importance_weight="sequence"``): then ``kl.SOUNDNESS``'s verdicts, which are
        those of the bare estimators, do not apply."""
        return False

    def _refuse_truncated_sampling(self) -> None:
        """With a KL term, the completions must be drawn from the whole distribution of the policy (TRL #6789)."""
        if self.beta == 0 or self.allow_unsound_kl:
            return
        cut = truncated_sampling(self)
        if cut:
            raise ValueError(
                f"{', '.join(cut)} truncates the distribution the completions are sampled from (TRL issue #6789), "
                "while the KL is that of the whole policy: the sampler never draws the tokens it cuts, so no "
                "importance weight can restore their share and every KL gradient is biased, whatever the estimator, "
                "placement or kl_importance_weight (the effective sample size stays ~1 and does not show it; "
                "docs/theory.md#sampler-mismatch). Sample the training rollouts untruncated: top_p=1.0, top_k=0 (or "
                "None), min_p=None (TRL's defaults; also in generation_kwargs), or set allow_unsound_kl=True to "
                "accept the bias."
            )
        reshaped = reshaped_sampling(self)
        if reshaped:
            raise ValueError(
                f"{', '.join(reshaped)} changes the distribution the completions are sampled from, while the policy's "
                "log-probabilities (the KL penalty, the importance ratio) are computed without it, at `temperature`: "
                "the rollouts are off-policy in a way no weight of the trainer corrects, and every KL gradient is "
                "biased (docs/theory.md#sampler-mismatch). Sample the training rollouts from the policy itself: "
                "repetition_penalty=1.0, no n-gram ban, the same temperature in generation_kwargs as in "
                "`temperature`, or set allow_unsound_kl=True to accept the bias."
            )

    @classmethod
    def _default(cls, name: str):
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)

    def _refuse_kl_fields_without_beta(self) -> None:
        """beta=0 turns the KL term off (no reference model is loaded): a KL field set then would be ignored."""
        if self.beta != 0:
            return
        if self.kl_target is not None:
            raise ValueError("kl_target adapts beta multiplicatively, so it needs an initial beta > 0 (e.g. 0.04).")
        settings = changed_settings(self, self.KL_FIELDS)
        if settings:
            raise ValueError(
                f"beta=0 turns the KL term off (TRL's default: no reference model, no KL), so {settings} would have no "
                "effect: set beta > 0 (e.g. 0.04), or leave these fields at their defaults."
            )

    def _refuse_kl_fields_without_effect(self) -> None:
        """Nothing set is silently ignored: a field set away from its default where it cannot act is an error."""
        if self.kl_estimator != "k3_clip" and self.k3_clip_max != kl.DEFAULT_K3_CLIP_MAX:
            raise ValueError(
                f"k3_clip_max={self.k3_clip_max} only acts with kl_estimator='k3_clip' (got {self.kl_estimator!r}): "
                "unset it or choose k3_clip."
            )
        if self.kl_estimator != "full" and (
            self.full_kl_token_chunk_size is not None or self.full_kl_vocab_chunk_size is not None
        ):
            raise ValueError(
                "full_kl_token_chunk_size / full_kl_vocab_chunk_size set the tile of the exact KL over the vocabulary, "
                f"which only kl_estimator='full' computes (got kl_estimator={self.kl_estimator!r}): unset them."
            )
        if self.kl_target is None and self.kl_horizon != self._default("kl_horizon"):
            raise ValueError(
                f"kl_horizon={self.kl_horizon} is the horizon of adaptive KL control, which only kl_target turns on: "
                "set kl_target (e.g. 0.3 nats) or unset kl_horizon."
            )
