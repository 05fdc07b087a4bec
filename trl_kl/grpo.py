"""Drop-in ``GRPOConfig`` / ``GRPOTrainer``: off-policy GRPO with the KL in the per-token reward (eq. 39).

``from trl_kl import GRPOConfig, GRPOTrainer`` instead of ``from trl import ...``. The math lives in
``trl_kl.kl`` and ``trl_kl.advantages``; this module moves tensors between TRL 1.16's hooks and them:

* ``_calculate_rewards`` keeps the gathered rewards, ``_generate_and_score_completions`` recomputes the
  group-normalised advantages with clip_std (eq. 41) and, for ``kl_reward_scope="sequence"``, with the
  completion's summed KL penalty subtracted from the reward first;
* ``_compute_loss`` runs TRL's own surrogate (importance ratio, PPO-2 clip, every ``loss_type``) with
  TRL's k3-as-loss term switched off, and ``_get_per_token_logps_and_entropies`` is where the
  policy's log-probs become available: there the per-token advantage R = A - beta * penalty is formed
  (reward placement), before TRL's surrogate reads it. The loss placement adds its own term after.
  With ``kl_estimator="full"`` the same hook also keeps the policy's final hidden states and runs one
  extra reference forward (backbone only), for the exact KL over the vocabulary (``trl_kl.full_kl``).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import trl
from accelerate.utils import is_peft_model, send_to_device

from . import guards, kl
from .compat import check_trl_version
from .advantages import SCALE_MODES, effective_sample_size, group_normalized_advantages, validate_std_bounds
from .full_kl import chunked_full_kl, validate_tile_size
from .reliability import ReliabilityMixin

check_trl_version()


@dataclass
class GRPOConfig(trl.GRPOConfig):
    """``trl.GRPOConfig`` plus where the KL goes and how it is estimated (NOTES §1-4, 7).

    ``beta`` keeps TRL's meaning (the KL coefficient; 0 loads no reference model). TRL's own KL term
    (k3 as a loss) is replaced by the one chosen here.
    """

    loss_type: str = field(
        default="dr_grpo",
        metadata={
            "help": "TRL's loss aggregation. trl_kl defaults to 'dr_grpo' (TRL: 'dapo'): a constant normaliser, so the "
            "gradient does not depend on how the batch is cut (gradient accumulation, processes, steps_per_generation; "
            "docs/reliability.md) and the objective stays a sum over tokens, the form whose KL gradient return-to-go "
            "makes exact (NOTES §7). Every TRL loss_type is accepted.",
        },
    )
    kl_estimator: str = field(
        default="k1",
        metadata={
            "help": "KL estimator: 'k1' (log pi/pi_ref), 'k2' ((log r)^2/2), 'k3' (r - 1 - log r), 'k3_clip' "
            "(k3 with r clamped at k3_clip_max), 'full' (exact over the vocabulary, loss placement).",
            "choices": list(kl.ESTIMATORS),
        },
    )
    kl_placement: str = field(
        default="reward",
        metadata={
            "help": "'reward': a detached penalty in the per-token reward, under the same importance sampling and "
            "clip as the advantage (eq. 39; sound with k1). 'loss': a differentiable loss term (sound with k2).",
            "choices": list(kl.PLACEMENTS),
        },
    )
    kl_reward_scope: str = field(
        default="return_to_go",
        metadata={
            "help": "With kl_placement='reward', what each token carries: 'return_to_go' (penalties of tokens t..end, "
            "the exact gradient of sequence KL, NOTES §7), 'token' (its own, eq. 39 literally), 'sequence' (the "
            "summed penalty subtracted from the scalar reward before group normalisation).",
            "choices": list(kl.REWARD_SCOPES),
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
    kl_target: float | None = field(
        default=None,
        metadata={
            "help": "Adaptive KL control (Ziegler et al. 2019): after each optimizer step, beta is moved towards the "
            "value that keeps the sequence KL at kl_target. None: beta stays fixed."
        },
    )
    kl_horizon: float = field(
        default=10000.0, metadata={"help": "Adaptive KL control horizon, in samples (TRL's old PPO default)."}
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
            "help": "Allow estimator/placement pairs the paper shows to be unsound (k1 as loss, k2 or full in the "
            "reward), for ablations. Biased pairs (k3) only warn."
        },
    )
    skip_nonfinite_steps: bool = field(default=False, metadata={"help": guards.SKIP_HELP})

    def __post_init__(self):
        super().__post_init__()
        if self.kl_reward_scope not in kl.REWARD_SCOPES:
            raise ValueError(f"kl_reward_scope must be one of {kl.REWARD_SCOPES}, got {self.kl_reward_scope!r}.")
        if self.use_bias_correction_kl:
            if self.kl_placement != "loss" or self.kl_estimator not in ("k1", "k3"):
                raise ValueError(
                    "use_bias_correction_kl=True (KL loss times the importance ratio with its gradient) is defined for "
                    "kl_placement='loss' with kl_estimator 'k1' or 'k3', where it yields the per-state KL gradient "
                    f"(TRL's default is k3); got kl_estimator={self.kl_estimator!r}, kl_placement={self.kl_placement!r}. "
                    "Set use_bias_correction_kl=False."
                )
        else:
            kl.validate_kl(self.kl_estimator, self.kl_placement, self.allow_unsound_kl)
        if not (isinstance(self.k3_clip_max, (int, float)) and math.isfinite(self.k3_clip_max) and self.k3_clip_max > 1):
            raise ValueError(f"k3_clip_max must be a finite number > 1 (a clamp on pi_ref/pi), got {self.k3_clip_max}.")
        validate_std_bounds(self.clip_std_min, self.clip_std_max)
        self._refuse_fields_without_effect()
        if not math.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}.")
        if self.kl_target is not None:
            if not (math.isfinite(self.kl_target) and self.kl_target > 0):
                raise ValueError(f"kl_target must be a finite number > 0 (a sequence KL, in nats), got {self.kl_target}.")
            if self.beta == 0:
                raise ValueError("kl_target adapts beta multiplicatively, so it needs an initial beta > 0 (e.g. 0.04).")
        if not (math.isfinite(self.kl_horizon) and self.kl_horizon > 0):
            raise ValueError(f"kl_horizon must be a finite number > 0, got {self.kl_horizon}.")
        if self.scale_rewards not in SCALE_MODES:
            raise ValueError(f"scale_rewards must be one of {SCALE_MODES}, got {self.scale_rewards!r}.")
        if self.kl_estimator == "full" and self.kl_placement != "loss":
            # SOUNDNESS refuses it already; with allow_unsound_kl there is still no per-token reward to carry
            raise ValueError(
                "kl_estimator='full' (exact KL over the vocabulary) exists only as a loss: use kl_placement='loss'."
            )
        validate_tile_size(self.full_kl_token_chunk_size, self.full_kl_vocab_chunk_size)
        if self.kl_estimator != "full" and (
            self.full_kl_token_chunk_size is not None or self.full_kl_vocab_chunk_size is not None
        ):
            raise ValueError(
                "full_kl_token_chunk_size / full_kl_vocab_chunk_size set the tile of the exact KL over the vocabulary, "
                f"which only kl_estimator='full' computes (got kl_estimator={self.kl_estimator!r}): unset them."
            )
        if self.multi_objective_aggregation == "normalize_then_sum" and (
            self.clip_std_min is not None
            or self.clip_std_max is not None
            or (self.beta != 0 and self.kl_placement == "reward" and self.kl_reward_scope == "sequence")
        ):
            raise ValueError(
                "clip_std_min/clip_std_max and kl_reward_scope='sequence' act on the summed reward: use "
                "multi_objective_aggregation='sum_then_normalize' with them."
            )
        if self.kl_placement == "reward" and self.kl_reward_scope != "sequence" and self.loss_type == "vespo":
            raise ValueError(
                "loss_type='vespo' weights whole sequences by the sign of their advantage, so it cannot take "
                "per-token KL-shaped advantages: use kl_reward_scope='sequence', kl_placement='loss', or another "
                "loss_type (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo)."
            )

    def _refuse_fields_without_effect(self):
        """Nothing set is silently ignored: a field set away from its default where it cannot act is an error."""
        if self.kl_placement == "loss" and self.kl_reward_scope != "return_to_go":
            raise ValueError(
                f"kl_reward_scope={self.kl_reward_scope!r} says how the penalty is carried in the *reward*; with "
                "kl_placement='loss' there is none. Unset kl_reward_scope or use kl_placement='reward'."
            )
        if self.kl_estimator != "k3_clip" and self.k3_clip_max != kl.DEFAULT_K3_CLIP_MAX:
            raise ValueError(
                f"k3_clip_max={self.k3_clip_max} only acts with kl_estimator='k3_clip' (got {self.kl_estimator!r}): "
                "unset it or choose k3_clip."
            )
        if self.scale_rewards == "none" and (self.clip_std_min is not None or self.clip_std_max is not None):
            raise ValueError(
                "clip_std_min/clip_std_max bound the std that group normalisation divides by (eq. 41), but "
                "scale_rewards='none' divides by nothing: use scale_rewards='group' (or 'batch') or unset them."
            )


@dataclass
class _LossCall:
    """State of one ``_compute_loss`` call, shared with the log-prob hook."""

    inputs: dict
    beta: float
    logps: torch.Tensor | None = None
    full_kl_args: dict | None = None  # kl_estimator="full": chunked_full_kl's inputs, from the same forward


class GRPOTrainer(ReliabilityMixin, trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with the KL term of ``trl_kl.GRPOConfig`` (see the module docstring)."""

    def __init__(self, model, reward_funcs, args: GRPOConfig | None = None, *pos, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GRPOConfig(f"{name.split('/')[-1]}-GRPO")
        if not isinstance(args, GRPOConfig):
            raise TypeError(
                "trl_kl.GRPOTrainer needs a trl_kl.GRPOConfig (it carries the KL fields): replace "
                "`from trl import GRPOConfig` by `from trl_kl import GRPOConfig`."
            )
        super().__init__(model, reward_funcs, args, *pos, **kwargs)
        self._loss_call: _LossCall | None = None
        self._rewards_per_func: torch.Tensor | None = None
        self._step_kl = torch.zeros(2, dtype=torch.float64)  # (sum of sequence KLs, sequences) this optimizer step

    # ---- rollout: advantages with clip_std, sequence-scope penalty -------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Rewards of every process (TRL gathers them); kept to renormalise in _generate_and_score_completions.
        # Checked, with non-finite values made NaN, TRL's "unscorable" (trl_kl.guards).
        with guards.checked_reward_funcs(self.reward_funcs, self.reward_func_names) as check:
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = self._exclude_nonfinite_rewards(rewards, check.nonfinite)
        return self._rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func, self._rewards_per_func = self._rewards_per_func, None
        if self.multi_objective_aggregation != "sum_then_normalize":
            return output  # TRL's own advantages (config refuses clip_std and sequence scope here)
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable: advantage 0, as in TRL
        output["advantages"] = self._advantages(output, rewards)
        return output

    def _advantages(self, output: dict, rewards: torch.Tensor) -> torch.Tensor:
        """This process's advantages from the scalar rewards of every process, ``(B_global,)``: group
        normalisation with clip_std (eq. 41), after subtracting the summed KL penalty for the sequence scope."""
        if self._kl_in_reward and self.args.kl_reward_scope == "sequence":
            penalty = self._rollout_penalty(output)
            sequence_penalty = kl.sequence_sum(penalty, self._loss_mask(output))
            rewards = rewards - self.beta * self.accelerator.gather(sequence_penalty)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        advantages = group_normalized_advantages(
            rewards, group_size, self.scale_rewards, self.args.clip_std_min, self.args.clip_std_max
        )
        return advantages[self._process_slice(output)]

    def _process_slice(self, output: dict) -> slice:
        local = output["completion_ids"].size(0)
        return slice(self.accelerator.process_index * local, (self.accelerator.process_index + 1) * local)

    def _rollout_penalty(self, output: dict) -> torch.Tensor:
        """Per-token KL penalty of the rollout, for the sampling policy (eq. 20/35), ``(B, T)``. Stores the
        sampling log-probs in ``output`` when TRL did not (then the loss's importance ratio uses them too)."""
        if output.get("old_per_token_logps") is None:
            output["old_per_token_logps"] = self._sampling_logps(output)
        return kl.reward_penalty(
            self.args.kl_estimator, output["old_per_token_logps"], output["ref_per_token_logps"], self.args.k3_clip_max
        )

    @torch.no_grad()
    def _sampling_logps(self, output) -> torch.Tensor:
        """Log-probs of the sampling policy, when TRL did not compute them (on-policy): one no-grad forward,
        needed only by kl_reward_scope='sequence', whose penalty enters the reward before normalisation."""
        if "pixel_values" in output:
            raise NotImplementedError("kl_reward_scope='sequence' on-policy is not supported for vision-language models.")
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        batch_size = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        logps, _, _ = self._get_per_token_logps_and_entropies(
            self.model, input_ids, attention_mask, output["completion_ids"].size(1), batch_size=batch_size
        )
        return logps

    # ---- checkpoints: the rollout in flight is part of the training state ---------------------------------

    def _trl_kl_state_files(self) -> list[str]:
        return [f"trl_kl_rollout_state_rank{rank}.pt" for rank in range(self.accelerator.num_processes)]

    def _save_trl_kl_state(self, folder: str) -> None:
        """Each process's buffered rollout and micro-step counter: a checkpoint taken between two generations
        (steps_per_generation * num_iterations > 1) would otherwise lose the rollout still being trained on, and the
        resumed run would regenerate off schedule (stock TRL 1.16 does)."""
        super()._save_trl_kl_state(folder)
        if not self.args.save_only_model:
            state = {"step": self._step, "buffered_inputs": self._buffered_inputs, "beta": self.beta}
            torch.save(state, os.path.join(folder, self._trl_kl_state_files()[self.accelerator.process_index]))

    def _load_trl_kl_state(self, folder: str) -> None:
        super()._load_trl_kl_state(folder)
        path = os.path.join(folder, self._trl_kl_state_files()[self.accelerator.process_index])
        state = torch.load(path, map_location="cpu", weights_only=False)  # not the device: CPU processes are "cpu:N"
        if self.accelerator.device.type != "cpu":
            state = send_to_device(state, self.accelerator.device)
        self._step, self._buffered_inputs, self.beta = state["step"], state["buffered_inputs"], state["beta"]

    # ---- adaptive KL control ------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch):
        output = super().training_step(model, inputs, num_items_in_batch)
        if self._step % self.current_gradient_accumulation_steps == 0:  # an optimizer step ends (as TRL counts)
            self._end_of_optimizer_step()
        return output

    def _end_of_optimizer_step(self):
        """Adaptive KL control: move beta with the sequence KL of the samples of this optimizer step, the
        same on every process (the KL sums are reduced over processes)."""
        if self.args.kl_target is not None:
            totals = self.accelerator.reduce(self._step_kl.to(self.accelerator.device), reduction="sum").tolist()
            if totals[1] > 0:
                self.beta = kl.adaptive_kl_coef(
                    self.beta, totals[0] / totals[1], self.args.kl_target, self.args.kl_horizon, int(totals[1])
                )
        self._step_kl.zero_()
        if self.beta != 0.0:
            self._metrics["train"]["kl/coef"].append(self.beta)

    # ---- loss: TRL's surrogate with our KL term ---------------------------------------------------------

    @property
    def _kl_in_reward(self) -> bool:
        return self.beta != 0.0 and self.args.kl_placement == "reward"

    @property
    def _penalty_shapes_advantages_in_loss(self) -> bool:
        """Whether the per-token penalty is added to the advantages inside the loss (token and return-to-go
        scopes); the sequence scope put it into the reward at rollout already."""
        return self.args.kl_placement == "reward" and self.args.kl_reward_scope != "sequence"

    @staticmethod
    def _loss_mask(inputs) -> torch.Tensor:
        mask = inputs["completion_mask"]
        return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]

    def _compute_loss(self, model, inputs):
        # A shallow copy: TRL reuses the rollout dict across num_iterations, the shaped advantages must not stick.
        call = _LossCall(inputs=dict(inputs), beta=self.beta)
        self._loss_call, self.beta = call, 0.0  # beta 0: TRL adds no k3 loss of its own; we own the KL term
        try:
            loss = super()._compute_loss(model, call.inputs)
        finally:
            self._loss_call, self.beta = None, call.beta
        return loss + self._kl_loss_and_metrics(call)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        call = self._loss_call
        exact = call is not None and call.logps is None and call.beta != 0.0 and self.args.kl_estimator == "full"
        with self._captured_hidden_states(model) if exact else nullcontext() as states:
            out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        if call is not None and call.logps is None:  # the policy forward of _compute_loss
            call.logps = out[0]
            if exact:
                batch_size = kwargs.get("batch_size", args[0] if args else None) or input_ids.size(0)
                hidden = torch.cat([s[:, -logits_to_keep - 1 : -1] for s in states])  # as TRL slices its logits
                call.full_kl_args = self._full_kl_args(model, hidden, input_ids, attention_mask, logits_to_keep, batch_size, kwargs)
            if call.beta != 0.0 and self._penalty_shapes_advantages_in_loss:
                inputs = call.inputs
                old = inputs.get("old_per_token_logps")
                old = out[0].detach() if old is None else old  # on-policy: the sampling policy is the current one
                penalty = kl.reward_penalty(
                    self.args.kl_estimator, old, inputs["ref_per_token_logps"], self.args.k3_clip_max
                )
                inputs["advantages"] = kl.kl_shaped_advantages(
                    inputs["advantages"], penalty, self._loss_mask(inputs), call.beta, self.args.kl_reward_scope
                )
        return out

    # ---- kl_estimator="full": the exact per-state KL over the vocabulary (section 4, way (1); NOTES §3) ----------

    def _causal_lm(self, model):
        """The transformers model under the accelerate/PEFT wrappers: it owns ``base_model`` and the LM head."""
        unwrapped = self.accelerator.unwrap_model(model)
        return unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped

    @contextmanager
    def _captured_hidden_states(self, model):
        """Collect the backbone's ``last_hidden_state`` of every forward inside (TRL's micro-batches), through a
        forward hook on ``base_model``, the module TRL's fused LM head (``add_fused_lm_head``) runs."""
        states = []

        def hook(module, args, output):
            states.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

        handle = self._causal_lm(model).base_model.register_forward_hook(hook)
        try:
            yield states
        finally:
            handle.remove()

    @staticmethod
    def _lm_head_args(causal_lm, prefix: str = "") -> dict:
        """A model's LM head and logit post-processing, read from its config as TRL's ``add_fused_lm_head`` does
        (scale: ``logit_scale``, ``output_multiplier``, ``lm_head_multiplier`` or ``logits_scaling``; softcap:
        ``final_logit_softcapping``), so the exact KL sees the distributions TRL's log-probs come from."""
        config = causal_lm.config.get_text_config()
        scale = getattr(config, "logit_scale", None)
        if scale is None:
            scale = getattr(config, "output_multiplier", None)
        if scale is None:
            scale = getattr(config, "lm_head_multiplier", None)
        if scale is None and getattr(config, "logits_scaling", None) is not None:
            scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
        head = causal_lm.get_output_embeddings()
        return {
            f"{prefix}weight": head.weight,
            f"{prefix}bias": head.bias,
            f"{prefix}logit_scale": 1.0 if scale is None else scale,
            f"{prefix}final_logit_softcapping": getattr(config, "final_logit_softcapping", None),
        }

    @torch.no_grad()
    def _reference_hidden_states(self, input_ids, attention_mask, logits_to_keep: int, batch_size: int):
        """The reference's final hidden states at the completion-predicting positions, ``(B, K, H_ref)``, and its
        causal LM: the one extra reference forward (backbone only, in TRL's micro-batches) that 'full' costs at
        loss time. The reference is ``ref_model``, or the PEFT policy with its adapter disabled (or the "ref"
        adapter), exactly as TRL picks it at rollout."""
        if self.ref_model is not None:
            ref, context = self._causal_lm(self.ref_model), nullcontext()
        else:
            from trl.trainer.utils import use_adapter

            peft_model = self.accelerator.unwrap_model(self.model)
            ref = peft_model.get_base_model()
            context = use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None)
        states = []
        with context:
            for start in range(0, input_ids.size(0), batch_size):
                rows = slice(start, start + batch_size)
                with self.accelerator.autocast():
                    output = ref.base_model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], use_cache=False)
                states.append(output.last_hidden_state[:, -logits_to_keep - 1 : -1])
        return torch.cat(states), ref

    def _full_kl_args(self, model, hidden, input_ids, attention_mask, logits_to_keep, batch_size, kwargs) -> dict:
        """Keyword arguments of ``chunked_full_kl`` for this loss call: the policy's hidden states from its own
        forward (with their graph), the reference's from one extra no-grad forward, both heads, TRL's temperature."""
        if any(kwargs.get(key) is not None for key in ("pixel_values", "token_type_ids", "mm_token_type_ids")):
            raise NotImplementedError("kl_estimator='full' is not supported for vision-language models.")
        ref_hidden, ref = self._reference_hidden_states(input_ids, attention_mask, logits_to_keep, batch_size)
        args = {**self._lm_head_args(self._causal_lm(model)), **self._lm_head_args(ref, prefix="ref_")}
        if self.args.cast_lm_head_to_fp32:  # TRL projects in float32 then; so do we
            hidden, ref_hidden = hidden.float(), ref_hidden.float()
        args.update(
            hidden=hidden.to(args["weight"].device),
            ref_hidden=ref_hidden.to(args["ref_weight"].device),
            temperature=self.temperature,
            token_chunk_size=self.args.full_kl_token_chunk_size,
            vocab_chunk_size=self.args.full_kl_vocab_chunk_size,
        )
        return args

    def _aggregate_like_trl(self, per_token: torch.Tensor, mask: torch.Tensor, inputs) -> torch.Tensor:
        """Average a per-token loss term with the normaliser TRL 1.16 applies to ``self.loss_type``, so the KL
        term weighs exactly as TRL's own KL term would (pinned by a test against stock TRL)."""
        train = self.model.training
        accumulation = self.current_gradient_accumulation_steps if train else 1.0
        masked = per_token * mask
        if self.loss_type in ("grpo", "sapo"):
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return masked.sum() / (per_token.size(0) * self.max_completion_length) / accumulation
        if self.loss_type == "luspo":
            return masked.sum(-1).mean() / accumulation
        # cispo, dapo, vespo: normalised by the number of loss tokens of the generation batch
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if train:
            normalizer = normalizer * accumulation / self.args.steps_per_generation
        return masked.sum() / normalizer

    def _kl_loss_and_metrics(self, call: _LossCall) -> torch.Tensor | float:
        inputs, logps = call.inputs, call.logps
        mask = self._loss_mask(inputs).to(logps.dtype)
        old = inputs.get("old_per_token_logps")
        token, sequence, maxima, log_weights, ratio = {}, {}, {}, None, None
        if old is not None:  # is/*: the importance ratio pi_theta / pi_old of this micro-batch (detached)
            log_ratio = logps.detach() - old
            ratio = torch.exp(log_ratio.clamp(-kl.LOG_RATIO_BOUND, kl.LOG_RATIO_BOUND))
            outside = (ratio < 1 - self.epsilon_low) | (ratio > 1 + self.epsilon_high)
            token.update({"is/ratio_mean": ratio, "is/clip_frac": outside})
            maxima["is/ratio_max"], log_weights = ratio, kl.sequence_sum(log_ratio, mask)
        loss = 0.0
        if call.beta != 0.0:
            sampling = logps.detach() if old is None else old
            kl_token, sequence = self._kl_metrics(logps.detach(), sampling, inputs["ref_per_token_logps"], mask)
            token.update(kl_token)
            if self.args.kl_placement == "loss":
                per_token = self._kl_loss_term(call, mask, ratio)
                token["kl/penalty"] = per_token
                loss = call.beta * self._aggregate_like_trl(per_token, mask, inputs)
        self._log_metrics(mask, token, sequence, maxima, log_weights)
        if old is None:  # on-policy: the ratio is exactly 1
            mode = "train" if self.model.training else "eval"
            for name, value in (("is/ratio_mean", 1.0), ("is/ratio_max", 1.0), ("is/clip_frac", 0.0), ("is/ess", 1.0)):
                self._metrics[mode][name].append(value)
        return loss

    def _kl_loss_term(self, call: _LossCall, mask: torch.Tensor, detached_ratio: torch.Tensor | None) -> torch.Tensor:
        """The per-token KL loss of ``kl_placement='loss'``, ``(B, T)``, differentiable in the policy log-probs;
        ``detached_ratio`` is pi_theta / pi_old off-policy (None on-policy)."""
        inputs, logps = call.inputs, call.logps
        if self.args.kl_estimator == "full":
            # Exact KL(pi(.|s_t) || pi_ref(.|s_t)) over the vocabulary at each visited state (section 4, way (1);
            # appendix A): an expectation over actions already, so no sampled action to re-weight, no ratio.
            return chunked_full_kl(**call.full_kl_args, mask=mask.bool())
        # A detached importance ratio keeps each estimator's on-policy gradient off-policy
        # (E_old[rho grad f] = E_pi[grad f]); on-policy it is exactly 1. use_bias_correction_kl keeps its gradient.
        ratio = detached_ratio
        if self.args.use_bias_correction_kl:
            old = inputs.get("old_per_token_logps")
            sampling = logps.detach() if old is None else old
            ratio = torch.exp((logps - sampling).clamp(-kl.LOG_RATIO_BOUND, kl.LOG_RATIO_BOUND))
        return kl.kl_loss(self.args.kl_estimator, logps, inputs["ref_per_token_logps"], self.args.k3_clip_max,
                          importance_ratio=ratio)

    # ---- metrics ------------------------------------------------------------------------------------

    def _log_metrics(
        self,
        mask: torch.Tensor,
        token: dict[str, torch.Tensor] | None = None,
        sequence: dict[str, torch.Tensor] | None = None,
        maxima: dict[str, torch.Tensor] | None = None,
        log_weights: torch.Tensor | None = None,
    ) -> None:
        """Log under TRL's ``_metrics``, over every process, with one gather and one host sync per call (not one
        per metric: on a small model a sync costs as much as the metric): masked per-token means (``token``,
        ``(B, T)`` each), per-sequence means (``sequence``, ``(B,)`` each), masked maxima (``maxima``, ``(B, T)``
        each; NaN when no process has a token, which TRL's ``log`` drops) and ``is/ess``, the effective sample
        size fraction of the per-sequence importance log-weights ``log_weights`` ``(B,)``. Every process must
        pass the same names and the same B (TRL's micro-batches are equal-sized)."""
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
            results.append(effective_sample_size(table[:, n_sums + len(maxima) :].reshape(-1)).float().reshape(1))
        values = torch.cat(results).tolist()
        totals, (tokens, sequences), rest = values[: n_sums - 2], values[n_sums - 2 : n_sums], values[n_sums:]
        for name, total in zip([*token, *sequence], totals, strict=True):
            self._metrics[mode][name].append(total / max(tokens if name in token else sequences, 1.0))
        for name, value in zip([*maxima, "is/ess"], rest):
            self._metrics[mode][name].append(value if value != float("-inf") else float("nan"))

    def _kl_metrics(self, logps, sampling_logps, ref_logps, mask) -> tuple[dict, dict]:
        """``kl/*`` whatever the estimator trained: k1, k2, k3 of the current policy (and TRL's ``kl`` key, the
        k3 mean), the sampling policy's penalty and sequence KL, how often a log-ratio hit the clamp. Returns
        the per-token and per-sequence values whose means the caller logs."""
        current, sampling = kl.log_ratio(logps, ref_logps), kl.log_ratio(sampling_logps, ref_logps)
        clamped = (sampling.abs() > kl.LOG_RATIO_BOUND) | (current.abs() > kl.LOG_RATIO_BOUND)
        k3 = kl.k3(logps, ref_logps)
        token = {
            "kl/k1": kl.k1(logps, ref_logps),
            "kl/k2": kl.k2(logps, ref_logps),
            "kl/k3": k3,
            "kl": k3,
            "kl/clamp_frac": clamped.float(),
        }
        if self.args.kl_placement == "reward":
            token["kl/penalty"] = kl.reward_penalty(self.args.kl_estimator, sampling_logps, ref_logps, self.args.k3_clip_max)
        sequence_kl = kl.sequence_sum(-sampling, mask)
        if self.model.training and self.args.kl_target is not None:  # adaptive KL: this optimizer step's sequence KLs
            local = torch.stack([sequence_kl.sum(), sequence_kl.new_tensor(float(sequence_kl.numel()))]).double()
            self._step_kl = self._step_kl.to(local.device) + local
        return token, {"kl/seq_kl": sequence_kl}
