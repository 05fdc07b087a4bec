"""Configuration shared by trl_kl's RL trainers: the KL fields, their resolved form, and field validators.

* ``KLConfigMixin``: the fields ``GRPOConfig`` and ``PPOConfig`` share (``kl_estimator``, ``kl_placement``, the
  adaptive control, ... next to TRL's ``beta``), their validation, and ``kl_settings()``, which resolves them once
  into a frozen ``KLSettings``: the one object the trainers read the KL configuration from.
* ``truncated_sampling``: the generation settings (top-p, top-k, min-p, ...) that make the sampler draw from a
  truncated distribution, which no importance weight corrects: refused with a KL term (TRL issue #6789).
* Validators for config fields, each raising one ``ValueError`` that names the field, what it must be and the
  value it got: ``check_bool``, ``check_int``, ``check_number`` (finite, with optional bounds), ``check_choice``.
  ``None`` passes where the field is optional (``optional=True``); ``why`` adds the field's meaning to the message.

The theory behind the fields: docs/theory.md (estimators, placement, sequence-kl, adaptive-kl).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import ClassVar

from . import kl

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
    model). ``__post_init__`` runs TRL's checks, then ``_validate_kl``. The rule for ``beta=0``: every KL field must
    then keep its default (there is no KL term for it to act on), else the config raises naming the fix."""

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
            "beta > 0, and (GRPO) GSPO's sequence ratio on a per-token KL. Biased pairs (k3) only warn."
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
        super().__post_init__()
        self._validate_kl()

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

    @classmethod
    def _default(cls, name: str):
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)

    def _refuse_kl_fields_without_beta(self) -> None:
        """beta=0 turns the KL term off (no reference model is loaded): a KL field set then would be ignored."""
        if self.beta != 0:
            return
        if self.kl_target is not None:
            raise ValueError("kl_target adapts beta multiplicatively, so it needs an initial beta > 0 (e.g. 0.04).")
        changed = [name for name in self.KL_FIELDS if getattr(self, name) != self._default(name)]
        if changed:
            settings = ", ".join(f"{name}={getattr(self, name)!r}" for name in changed)
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
