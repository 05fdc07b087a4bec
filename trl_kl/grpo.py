"""Drop-in ``GRPOConfig`` / ``GRPOTrainer``: off-policy GRPO with the KL in the per-token reward (eq. 39).

``from trl_kl import GRPOConfig, GRPOTrainer`` instead of ``from trl import ...``. The math lives in
``trl_kl.kl`` and ``trl_kl.advantages``; every TRL internal used here goes through ``trl_kl._trl``. The KL, from
config to loss:

* config: ``GRPOConfig.kl_settings()`` resolves the KL fields once into a frozen ``KLSettings``, the trainer's
  ``kl_settings``. The coefficient is the trainer's ``kl_coef`` (``beta`` at the start, moved by ``kl_target``).
* rollout: ``_calculate_rewards`` keeps the gathered rewards; ``_generate_and_score_completions`` replaces TRL's
  advantages by the group-normalised ones with clip_std (eq. 41). They hold no KL, whatever the scope.
* loss, one micro-batch (``_compute_loss``): TRL's own ``_compute_loss`` (importance ratio, PPO-2 clip, vLLM
  correction, every ``loss_type``) runs with its KL term off (``_trl.trl_kl_term_off``). Right after its policy
  forward, before its surrogate reads the advantages, ``_policy_logps_ready`` forms the KL penalty once: for the
  reward placement with ``kl_importance_weight="token"`` the per-token advantage R = A - kl_coef * (penalty
  carried per ``kl_reward_scope``) that the surrogate then reads; for ``kl_estimator="full"`` the exact KL over the
  vocabulary from the same forward's hidden states and one reference forward (``trl_kl.full_kl``). Then the KL
  loss term (``_kl_loss_term``: the loss placement's, or with ``kl_importance_weight="sequence"`` the KL weighted
  by pi_theta(y) / q(y), ``trl_kl.importance``) is added and the ``kl/*`` and ``is/*`` metrics logged, from those
  same values.

When the sampler is not the policy (stale rollouts, vLLM; docs/theory.md#sampler-mismatch) the functions the
trainer composes are those ``trl_kl.exact_gradients`` evaluates (``exact_gradients.trainer_form`` names the form
of a config; ``tests/test_grpo_vllm.py`` checks the trainer's loss against it).
"""

from __future__ import annotations

from . import _trl  # first: refuses an untested TRL before its internals are touched

import os
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import trl
from accelerate.utils import send_to_device

from . import guards, importance, kl
from .advantages import effective_sample_size, group_normalized_advantages, validate_std_bounds
from .config import KLConfigMixin, KLSettings, check_choice, check_loss_masks, check_number
from .full_kl import chunked_full_kl
from .reliability import ReliabilityMixin


@dataclass
class GRPOConfig(KLConfigMixin, trl.GRPOConfig):
    """``trl.GRPOConfig`` plus where the KL goes and how it is estimated (docs/theory.md#estimators, #placement,
    #off-policy, #clip-std, #sequence-kl).

    ``beta`` keeps TRL's meaning (the KL coefficient; 0 loads no reference model, and then every KL field must keep
    its default). TRL's own KL term (k3 as a loss) is replaced by the one chosen here.
    """

    kl_reward_scope: str = field(
        default="return_to_go",
        metadata={
            "help": "With kl_placement='reward', what each token's advantage carries of the per-token penalty: "
            "'return_to_go' (penalties of tokens t..end, the exact gradient of sequence KL, "
            "docs/theory.md#sequence-kl), 'token' (its own, eq. 39 literally), 'sequence' (the completion's summed "
            "penalty on every token, exact and noisier). Added to the group-normalised advantage, never rescaled by "
            "it. Needs beta > 0.",
            "choices": list(kl.REWARD_SCOPES),
        },
    )
    kl_importance_weight: str = field(
        default="token",
        metadata={
            "help": "How the KL term is corrected when the sampler is not the policy being trained (stale rollouts: "
            "num_iterations, steps_per_generation; an inference engine: vLLM). 'token' (eq. 39): the penalty from the "
            "rollout's log-probs (pi_old), the KL-shaped advantage under TRL's importance ratio, clip and vLLM "
            "correction; a KL loss times the per-token ratio and the same vLLM correction. Exact on the first "
            "optimizer step of a rollout (with a sequence-level vLLM correction), a trust-region approximation after. "
            "'sequence': the penalty from the current policy's log-probs and the KL term weighted by the sequence's "
            "likelihood ratio pi_theta(y)/q(y) (q: the sampler, vLLM's log-probs when it generated), outside TRL's "
            "ratio and clip: exact on every step for k1 in the reward (return_to_go, sequence) and k1 or k3 as a "
            "loss, at a higher variance (is/ess). docs/theory.md#sampler-mismatch. Needs beta > 0.",
            "choices": list(importance.KL_IMPORTANCE_WEIGHTS),
        },
    )
    clip_std_min: float | None = field(
        default=None,
        metadata={
            "help": "Lower bound of the group std in advantage normalisation (eq. 41): advantages are at most "
            "max|r - mean| / clip_std_min. None keeps TRL's std + 1e-4."
        },
    )
    clip_std_max: float | None = field(
        default=None, metadata={"help": "Upper bound of the group std in advantage normalisation (eq. 41)."}
    )
    skip_nonfinite_steps: bool = field(default=False, metadata={"help": guards.SKIP_HELP})

    KL_FIELDS = (*KLConfigMixin.KL_FIELDS, "kl_reward_scope", "kl_importance_weight")

    def _check_fields(self) -> None:
        super()._check_fields()  # num_generations >= 1 here; TRL's own check then refuses fewer than 2
        for name in ("clip_std_min", "clip_std_max"):
            check_number(name, getattr(self, name), greater_than=0, optional=True, why="a bound of the group std")

    def _check_combinations(self) -> None:
        super()._check_combinations()
        validate_std_bounds(self.clip_std_min, self.clip_std_max)
        if self.scale_rewards == "none" and (self.clip_std_min is not None or self.clip_std_max is not None):
            raise ValueError(
                "clip_std_min/clip_std_max bound the std that group normalisation divides by (eq. 41), but "
                "scale_rewards='none' divides by nothing: use scale_rewards='group' (or 'batch') or unset them."
            )
        if self.multi_objective_aggregation == "normalize_then_sum" and (
            self.clip_std_min is not None or self.clip_std_max is not None
        ):
            raise ValueError(
                "clip_std_min/clip_std_max act on the summed reward: use "
                "multi_objective_aggregation='sum_then_normalize' with them."
            )

    def _validate_kl(self) -> None:
        check_choice("kl_reward_scope", self.kl_reward_scope, kl.REWARD_SCOPES)
        check_choice("kl_importance_weight", self.kl_importance_weight, importance.KL_IMPORTANCE_WEIGHTS)
        super()._validate_kl()
        if self.kl_placement == "loss" and self.kl_reward_scope != "return_to_go":
            raise ValueError(
                f"kl_reward_scope={self.kl_reward_scope!r} says how the penalty is carried in the *reward*; with "
                "kl_placement='loss' there is none. Unset kl_reward_scope or use kl_placement='reward'."
            )
        if self.use_bias_correction_kl and self.kl_importance_weight == "sequence":
            raise ValueError(
                "use_bias_correction_kl=True multiplies the KL loss by the per-token ratio with its gradient; "
                "kl_importance_weight='sequence' already multiplies it by the sequence's likelihood ratio with its "
                "gradient (the exact form of the same idea): use one of them, e.g. use_bias_correction_kl=False."
            )
        # with kl_importance_weight="token" the reward placement's KL is inside the advantage TRL's surrogate reads
        kl_in_advantage = self.beta != 0 and self.kl_placement == "reward" and self.kl_importance_weight == "token"
        if kl_in_advantage and self.kl_reward_scope != "sequence" and self.loss_type == "vespo":
            raise ValueError(
                "loss_type='vespo' weights whole sequences by the sign of their advantage, so it cannot take "
                "per-token KL-shaped advantages: use kl_reward_scope='sequence' (the same penalty on every token of a "
                "completion), kl_importance_weight='sequence' (the KL as its own term, outside the advantage), "
                "kl_placement='loss', or another loss_type (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo)."
            )
        gspo = self.importance_sampling_level == "sequence"
        if kl_in_advantage and gspo and self.kl_reward_scope != "sequence" and not self.allow_unsound_kl:
            raise ValueError(
                f"importance_sampling_level='sequence' (GSPO) with kl_reward_scope={self.kl_reward_scope!r}: GSPO's "
                "ratio is the geometric mean of the token ratios, one value for the whole completion whose gradient "
                "is grad log pi(y) / |y|, so a penalty that differs from token to token is misweighted even "
                "on-policy: the return_to_go form is biased (relative error 0.64 against the sequence-KL gradient, "
                "docs/kl_gradient_bias.md) and the token scope becomes the KL gradient divided by the length. Use "
                "kl_reward_scope='sequence' (exact with GSPO), kl_importance_weight='sequence' (the KL weighted "
                "outside TRL's ratio: every scope), importance_sampling_level='token', or allow_unsound_kl=True for "
                "an ablation."
            )
        check_loss_masks(self, kl_in_advantage, outside="kl_importance_weight='sequence' or kl_placement='loss'")

    def _kl_loss_weighted_with_gradient(self) -> bool:
        return (
            self.kl_importance_weight == "sequence"
            and self.kl_placement == "loss"
            and self.kl_estimator in importance.UNBIASED_VALUE_ESTIMATORS
        )

    def kl_settings(self) -> KLSettings:
        return replace(
            super().kl_settings(), reward_scope=self.kl_reward_scope, importance_weight=self.kl_importance_weight
        )


WEIGHT_METRICS = ("is/ess", "is/seq_weight_mean", "is/seq_weight_max")
"""The metrics of the sequence weights W = pi_theta(y) / q(y) of a micro-batch (q: the sampler, vLLM's log-probs
when it generated, else pi_old), over every process: the effective sample size fraction (sum W)^2 / (n sum W^2),
the mean of W (1 in expectation when q covers the policy) and its largest value. 1 when q = pi_theta."""


def loss_mask(inputs: dict) -> torch.Tensor:
    """The tokens TRL's loss counts, ``(B, T)``: completion tokens, minus tool output."""
    mask = inputs["completion_mask"]
    return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]


@dataclass
class _MicroBatch:
    """One ``_compute_loss`` call: its inputs (a shallow copy whose ``advantages`` may be replaced) and what
    ``_policy_logps_ready`` formed from the policy's forward."""

    inputs: dict
    logps: torch.Tensor | None = None
    """The policy's per-token log-probs ``(B, T)``, with their graph."""
    penalty: torch.Tensor | None = None
    """Reward placement: the per-token penalty (eq. 20/35) ``(B, T)``, detached: of pi_old
    (``kl_importance_weight="token"``) or of the current policy (``"sequence"``)."""
    full_kl: torch.Tensor | None = None
    """``kl_estimator="full"``: the exact per-state KL ``(B, T)``, differentiable in the policy."""

    @property
    def mask(self) -> torch.Tensor:
        return loss_mask(self.inputs)

    @property
    def old_logps(self) -> torch.Tensor:
        """Log-probs of pi_old, the trainer's policy when the rollout was made: TRL's ``old_per_token_logps``, or,
        when TRL skips them because the step is on-policy, the current log-probs detached (numerically pi_old)."""
        old = self.inputs.get("old_per_token_logps")
        return self.logps.detach() if old is None else old

    @property
    def sampler_logps(self) -> torch.Tensor:
        """Log-probs of q, the sampler that drew the tokens: the inference engine's when vLLM generated them
        (``_trl.sampler_logps``), else pi_old's."""
        engine = _trl.sampler_logps(self.inputs)
        return self.old_logps if engine is None else engine


class GRPOTrainer(ReliabilityMixin, trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with the KL term of ``trl_kl.GRPOConfig`` (see the module docstring).

    ``kl_settings``: the resolved KL fields (``KLSettings``). ``kl_coef``: the KL coefficient trl_kl applies (the
    config's ``beta``, moved by adaptive KL control, logged as ``kl/coef``, saved in checkpoints). TRL's own ``beta``
    attribute stays the config's value: TRL reads it as the switch that loads the reference model and computes the
    reference log-probs."""

    _config_class = GRPOConfig

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *trl_args, **trl_kwargs):
        args = self._checked_config(model, args)
        super().__init__(model, reward_funcs, args, *trl_args, **trl_kwargs)
        self.kl_settings: KLSettings = args.kl_settings()
        self.kl_coef: float = args.beta
        self._rewards_per_func: torch.Tensor | None = None
        self._step_kl = torch.zeros(2, dtype=torch.float64)  # (sum of sequence KLs, sequences) this optimizer step

    @classmethod
    def _checked_config(cls, model, args):
        """``args``, or the default config named after the model as TRL names it; a stock TRL config is refused."""
        config_class = cls._config_class
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path
            return config_class(f"{name.split('/')[-1]}-{config_class.__name__.removesuffix('Config')}")
        if not isinstance(args, config_class):
            raise TypeError(
                f"trl_kl.{cls.__name__} needs a trl_kl.{config_class.__name__} (it carries the KL fields): replace "
                f"`from trl import {config_class.__name__}` by `from trl_kl import {config_class.__name__}`."
            )
        return args

    @property
    def _kl_on(self) -> bool:
        return self.kl_coef != 0.0

    # ---- rollout: advantages with clip_std ----------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Rewards of every process (TRL gathers them); kept to renormalise in _generate_and_score_completions.
        # Checked, with non-finite values made NaN, TRL's "unscorable" (trl_kl.guards).
        with guards.checked_reward_funcs(*_trl.reward_functions(self)) as check:
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = self._exclude_nonfinite_rewards(rewards, check.nonfinite)
        return self._rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func, self._rewards_per_func = self._rewards_per_func, None
        if self.multi_objective_aggregation != "sum_then_normalize":
            return output  # TRL's own advantages (the config refuses clip_std here)
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable: advantage 0, as in TRL
        output["advantages"] = self._advantages(output, rewards)
        return output

    def _advantages(self, output: dict, rewards: torch.Tensor) -> torch.Tensor:
        """This process's advantages from the scalar rewards of every process, ``(B_local,)``: group normalisation
        with clip_std (eq. 41). The KL is not in them: every ``kl_reward_scope`` adds its penalty to the normalised
        advantage per token, in the loss (``_policy_logps_ready``), so the group std never rescales it."""
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        advantages = group_normalized_advantages(
            rewards, group_size, self.scale_rewards, self.args.clip_std_min, self.args.clip_std_max
        )
        return advantages[self._process_slice(output)]

    def _process_slice(self, output: dict) -> slice:
        local = output["completion_ids"].size(0)
        return slice(self.accelerator.process_index * local, (self.accelerator.process_index + 1) * local)

    # ---- checkpoints: the rollout in flight is part of the training state ---------------------------------

    def _trl_kl_state_files(self) -> list[str]:
        return [f"trl_kl_rollout_state_rank{rank}.pt" for rank in range(self.accelerator.num_processes)]

    def _save_trl_kl_state(self, folder: str) -> None:
        """Each process's buffered rollout and micro-step counter: a checkpoint taken between two generations
        (steps_per_generation * num_iterations > 1) would otherwise lose the rollout still being trained on, and the
        resumed run would regenerate off schedule (stock TRL 1.16 does)."""
        super()._save_trl_kl_state(folder)
        if not self.args.save_only_model:
            state = {**_trl.rollout_state(self), "beta": self.kl_coef}  # "beta": the config's name for the coefficient
            torch.save(state, os.path.join(folder, self._trl_kl_state_files()[self.accelerator.process_index]))

    def _load_trl_kl_state(self, folder: str) -> None:
        super()._load_trl_kl_state(folder)
        path = os.path.join(folder, self._trl_kl_state_files()[self.accelerator.process_index])
        state = torch.load(path, map_location="cpu", weights_only=False)  # not the device: CPU processes are "cpu:N"
        if self.accelerator.device.type != "cpu":
            state = send_to_device(state, self.accelerator.device)
        _trl.restore_rollout_state(self, state)
        self.kl_coef = state["beta"]

    # ---- adaptive KL control ------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch):
        output = super().training_step(model, inputs, num_items_in_batch)
        if _trl.optimizer_step_ended(self):
            self._end_of_optimizer_step()
        return output

    def _end_of_optimizer_step(self):
        """Adaptive KL control (docs/theory.md#adaptive-kl): move kl_coef with the sequence KL of the samples of
        this optimizer step, the same on every process (the KL sums are reduced over processes)."""
        if self.kl_settings.target is not None:
            totals = self.accelerator.reduce(self._step_kl.to(self.accelerator.device), reduction="sum").tolist()
            if totals[1] > 0:
                settings = self.kl_settings
                self.kl_coef = kl.adaptive_kl_coef(
                    self.kl_coef, totals[0] / totals[1], settings.target, settings.horizon, int(totals[1])
                )
        self._step_kl.zero_()
        if self._kl_on:
            _trl.metrics(self, "train")["kl/coef"].append(self.kl_coef)

    # ---- loss: TRL's surrogate with our KL term ---------------------------------------------------------

    def _compute_loss(self, model, inputs):
        """One micro-batch's loss, in order:

        1. TRL's ``_compute_loss`` runs its policy forward, then its surrogate on ``inputs["advantages"]``, with its
           own KL term off (``_trl.trl_kl_term_off``).
        2. Between the two, ``_policy_logps_ready`` forms this micro-batch's KL quantities once and, for the reward
           placement, the KL-shaped advantages the surrogate reads (``_trl.on_policy_forward``).
        3. The loss placement's KL term is added, and the metrics logged, from those same quantities.
        """
        micro = _MicroBatch(inputs=dict(inputs))  # a shallow copy: TRL reuses the rollout across num_iterations
        exact = self._kl_on and self.kl_settings.estimator == "full"
        ready = partial(self._policy_logps_ready, micro)
        with _trl.trl_kl_term_off(self), _trl.on_policy_forward(self, ready, capture_hidden_states=exact):
            loss = super()._compute_loss(model, micro.inputs)
        return loss + self._kl_loss_and_metrics(micro)

    def _policy_logps_ready(self, micro: _MicroBatch, forward: _trl.PolicyForward) -> None:
        """The policy's log-probs of this micro-batch are ready, and TRL's surrogate has not read the advantages yet.

        Reward placement: the per-token penalty (eq. 20/35), of pi_old with ``kl_importance_weight="token"`` (eq. 39:
        exact on the first optimizer step of a rollout, PPO's frozen reward after it) or of the current policy with
        ``"sequence"`` (exact on every step; docs/theory.md#sampler-mismatch). With ``"token"``, when the advantages
        carry it (``kl_reward_scope``; PPO carries it in its rewards instead), the per-token advantage
        R[i, t] = A[i] - kl_coef * (penalty carried per scope) (eq. 39) that the surrogate reads next; with
        ``"sequence"`` the advantages stay A and the KL becomes its own loss term (``_kl_loss_term``).
        ``kl_estimator="full"``: the exact per-state KL over the vocabulary, from this forward's hidden states and
        one reference forward (docs/theory.md#full-kl)."""
        micro.logps = forward.logps
        if not self._kl_on:
            return
        settings, inputs = self.kl_settings, micro.inputs
        if settings.in_reward:
            current = settings.importance_weight == "sequence"
            micro.penalty = kl.reward_penalty(
                settings.estimator,
                micro.logps.detach() if current else micro.old_logps,
                inputs["ref_per_token_logps"],
                settings.k3_clip_max,
            )
            if settings.reward_scope is not None and not current:
                inputs["advantages"] = kl.kl_shaped_advantages(
                    inputs["advantages"], micro.penalty, micro.mask, self.kl_coef, settings.reward_scope
                )
        elif settings.estimator == "full":
            micro.full_kl = chunked_full_kl(**self._full_kl_args(forward), mask=micro.mask.bool())

    # ---- kl_estimator="full": the exact per-state KL over the vocabulary (section 4, way (1)) -----------------

    @torch.no_grad()
    def _reference_hidden_states(self, input_ids, attention_mask, logits_to_keep: int, batch_size: int):
        """The reference's final hidden states at the completion-predicting positions, ``(B, K, H_ref)``, and its
        causal LM: the one extra reference forward (backbone only, in TRL's micro-batches) that 'full' costs at
        loss time, with the reference TRL's rollout uses (``_trl.reference_model``)."""
        ref, context = _trl.reference_model(self)
        states = []
        with context:
            for start in range(0, input_ids.size(0), batch_size):
                rows = slice(start, start + batch_size)
                with self.accelerator.autocast():
                    output = ref.base_model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], use_cache=False)
                states.append(output.last_hidden_state[:, -logits_to_keep - 1 : -1])
        return torch.cat(states), ref

    def _full_kl_args(self, forward: _trl.PolicyForward) -> dict:
        """Keyword arguments of ``chunked_full_kl`` for this micro-batch: the policy's hidden states from its own
        forward (with their graph), the reference's from one extra no-grad forward, both heads, TRL's temperature."""
        if any(forward.extra.get(key) is not None for key in ("pixel_values", "token_type_ids", "mm_token_type_ids")):
            raise NotImplementedError("kl_estimator='full' is not supported for vision-language models.")
        ref_hidden, ref = self._reference_hidden_states(
            forward.input_ids, forward.attention_mask, forward.logits_to_keep, forward.batch_size
        )
        policy = _trl.fused_head_model(self, forward.model)
        args = {**_trl.lm_head_args(policy), **_trl.lm_head_args(ref, prefix="ref_")}
        hidden = forward.hidden_states
        if self.args.cast_lm_head_to_fp32:  # TRL projects in float32 then; so do we
            hidden, ref_hidden = hidden.float(), ref_hidden.float()
        args.update(
            hidden=hidden.to(args["weight"].device),
            ref_hidden=ref_hidden.to(args["ref_weight"].device),
            temperature=self.temperature,
            token_chunk_size=self.kl_settings.token_chunk_size,
            vocab_chunk_size=self.kl_settings.vocab_chunk_size,
        )
        return args

    # ---- the KL loss term, and the metrics ------------------------------------------------------------------

    def _kl_loss_and_metrics(self, micro: _MicroBatch) -> torch.Tensor | float:
        """The KL loss term (``_kl_loss_term``; 0 when the KL is inside the advantages), ``kl_coef`` times its
        TRL-normalised mean; and this micro-batch's ``kl/*`` and ``is/*`` metrics."""
        inputs, logps = micro.inputs, micro.logps
        mask = micro.mask.to(logps.dtype)
        old, engine = inputs.get("old_per_token_logps"), _trl.sampler_logps(inputs)
        token, sequence, maxima, log_weights = {}, {}, {}, None
        if old is not None:  # is/ratio_*, is/clip_frac: the policy ratio pi_theta / pi_old (detached)
            ratio = importance.token_ratio(logps.detach(), old)
            outside = (ratio < 1 - self.epsilon_low) | (ratio > 1 + self.epsilon_high)
            token.update({"is/ratio_mean": ratio, "is/clip_frac": outside})
            maxima["is/ratio_max"] = ratio
        if old is not None or engine is not None:  # is/ess, is/seq_weight_*: the whole weight pi_theta(y) / q(y)
            log_weights = importance.sequence_log_weight(logps.detach(), micro.sampler_logps, mask).squeeze(-1)
        loss = 0.0
        if self._kl_on:
            kl_token, sequence = self._kl_metrics(logps.detach(), micro.old_logps, inputs["ref_per_token_logps"], mask)
            token.update(kl_token)
            if self.kl_settings.in_reward:
                token["kl/reward_penalty"] = micro.penalty
            per_token = self._kl_loss_term(micro)
            if per_token is not None:
                if not self.kl_settings.in_reward:
                    token["kl/loss_term"] = per_token
                loss = self.kl_coef * _trl.aggregate_like_trl(self, per_token, mask, inputs)
        self._log_metrics(mask, token, sequence, maxima, log_weights)
        metrics = _trl.metrics(self, "train" if self.model.training else "eval")
        if old is None:  # pi_theta = pi_old: the ratio is exactly 1
            for name, value in (("is/ratio_mean", 1.0), ("is/ratio_max", 1.0), ("is/clip_frac", 0.0)):
                metrics[name].append(value)
        if log_weights is None:  # and q = pi_old: every weight is 1
            for name in WEIGHT_METRICS:
                metrics[name].append(1.0)
        return loss

    def _kl_loss_term(self, micro: _MicroBatch) -> torch.Tensor | None:
        """The per-token KL term added to TRL's loss, ``(B, T)``, differentiable in the policy log-probs; None when
        the KL is inside the advantages (reward placement, ``kl_importance_weight="token"``).

        * ``kl_importance_weight="sequence"``: the KL weighted by the sequence's likelihood ratio pi_theta(y) / q(y),
          reward placement ``importance.sequence_weighted_penalty``, loss placement
          ``importance.sequence_weighted_kl_loss`` (exact under any sampler that covers the policy for k1 in the
          reward with return_to_go or sequence scope, and k1 or k3 as a loss; docs/theory.md#sampler-mismatch).
        * ``"token"``, loss placement: the estimator times the importance ratio pi_theta / pi_old per token
          (detached: each estimator keeps its on-policy gradient off-policy, E_old[rho grad f] = E_pi[grad f]; with
          its gradient for ``use_bias_correction_kl``) and times TRL's vLLM correction pi_old / q
          (``_trl.sampler_correction``), the factor TRL's surrogate applies to the reward placement's KL too. The
          exact KL over the vocabulary (``full``) is an expectation over the action already: no policy ratio."""
        settings, mask = self.kl_settings, micro.mask
        if settings.in_reward:
            if settings.importance_weight == "token":
                return None
            return importance.sequence_weighted_penalty(
                micro.penalty, micro.logps, micro.sampler_logps, mask, settings.reward_scope
            )
        ref_logps = micro.inputs["ref_per_token_logps"]
        if settings.importance_weight == "sequence":
            per_token = micro.full_kl if settings.estimator == "full" else kl.estimate(
                settings.estimator, micro.logps, ref_logps, settings.k3_clip_max
            )
            return importance.sequence_weighted_kl_loss(
                settings.estimator, per_token, micro.logps, micro.sampler_logps, mask
            )
        if settings.estimator == "full":
            per_token = micro.full_kl
        else:
            ratio = importance.token_ratio(micro.logps, micro.old_logps)
            per_token = kl.kl_loss(
                settings.estimator, micro.logps, ref_logps, settings.k3_clip_max,
                importance_ratio=ratio if settings.bias_correction else ratio.detach(),
            )
        correction = _trl.sampler_correction(micro.inputs)
        return per_token if correction is None else per_token * correction

    # ---- metrics ------------------------------------------------------------------------------------

    def _log_metrics(
        self,
        mask: torch.Tensor,
        token: dict[str, torch.Tensor] | None = None,
        sequence: dict[str, torch.Tensor] | None = None,
        maxima: dict[str, torch.Tensor] | None = None,
        log_weights: torch.Tensor | None = None,
    ) -> None:
        """Log under TRL's metrics (``_trl.metrics``), over every process, with one gather and one host sync per call
        (not one per metric: on a small model a sync costs as much as the metric): masked per-token means (``token``,
        ``(B, T)`` each), per-sequence means (``sequence``, ``(B,)`` each), masked maxima (``maxima``, ``(B, T)``
        each; NaN when no process has a token, which TRL's ``log`` drops) and ``WEIGHT_METRICS`` (effective
        sample size fraction, mean and maximum) of the per-sequence importance log-weights ``log_weights``
        ``(B,)``. Every process must pass the same names and the same B (TRL's micro-batches are equal-sized)."""
        mode = "train" if self.model.training else "eval"
        token, sequence, maxima = token or {}, sequence or {}, maxima or {}
        selected = mask.bool()
        parts = []
        if token:
            parts.append(kl.masked(torch.stack([v.detach().float() for v in token.values()]), selected).sum((1, 2)))
        if sequence:
            parts.append(torch.stack([v.detach().float() for v in sequence.values()]).sum(-1))
        parts.append(torch.stack([selected.sum(), selected.new_tensor(selected.shape[0], dtype=torch.long)]).float())
        if maxima:
            stacked = torch.stack([v.detach().float() for v in maxima.values()])
            parts.append(torch.where(selected, stacked, stacked.new_tensor(float("-inf"))).amax((1, 2)))
        if log_weights is not None:
            parts.append(log_weights.detach().float())
        local = torch.cat(parts)
        processes = self.accelerator.num_processes
        table = (self.accelerator.gather(local) if processes > 1 else local).view(processes, -1)
        n_sums = len(token) + len(sequence) + 2
        results = [table[:, :n_sums].sum(0), table[:, n_sums : n_sums + len(maxima)].amax(0)]
        if log_weights is not None:
            all_log_weights = table[:, n_sums + len(maxima) :].reshape(-1)
            weights = torch.exp(all_log_weights.clamp(-kl.LOG_RATIO_BOUND, kl.LOG_RATIO_BOUND))
            ess = effective_sample_size(all_log_weights).float()
            results.append(torch.stack([ess, weights.mean(), weights.max()]))
        values = torch.cat(results).tolist()
        totals, (tokens, sequences), rest = values[: n_sums - 2], values[n_sums - 2 : n_sums], values[n_sums:]
        metrics = _trl.metrics(self, mode)
        for name, total in zip([*token, *sequence], totals, strict=True):
            metrics[name].append(total / max(tokens if name in token else sequences, 1.0))
        for name, value in zip([*maxima, *WEIGHT_METRICS], rest):
            metrics[name].append(value if value != float("-inf") else float("nan"))

    def _kl_metrics(self, logps, old_logps, ref_logps, mask) -> tuple[dict, dict]:
        """``kl/*`` whatever the estimator trained: k1, k2, k3 of the current policy (and TRL's ``kl`` key, the
        k3 mean), the sampling policy's sequence KL, how often a log-ratio hit the clamp. Returns the per-token
        and per-sequence values whose means the caller logs."""
        current_log_ratio = kl.log_ratio(logps, ref_logps)
        sampling_log_ratio = kl.log_ratio(old_logps, ref_logps)
        clamped = (sampling_log_ratio.abs() > kl.LOG_RATIO_BOUND) | (current_log_ratio.abs() > kl.LOG_RATIO_BOUND)
        k3 = kl.k3(logps, ref_logps)
        token = {
            "kl/k1": kl.k1(logps, ref_logps),
            "kl/k2": kl.k2(logps, ref_logps),
            "kl/k3": k3,
            "kl": k3,
            "kl/clamp_frac": clamped.float(),
        }
        sequence_kl = kl.sequence_sum(-sampling_log_ratio, mask)
        if self.model.training and self.kl_settings.target is not None:  # adaptive KL: this step's sequence KLs
            local = torch.stack([sequence_kl.sum(), sequence_kl.new_tensor(float(sequence_kl.numel()))]).double()
            self._step_kl = self._step_kl.to(local.device) + local
        return token, {"kl/seq_kl": sequence_kl}
