"""``PPOConfig`` / ``PPOTrainer`` on TRL 1.16: a critic, GAE, and the KL inside the per-token reward (eq. 20).

TRL deleted its PPOTrainer; this one reuses TRL's GRPO rollout machinery through ``trl_kl.GRPOTrainer``
(generation, vLLM, reward functions and models, reference and old log-probs, ``num_iterations``,
``steps_per_generation``, the clipped surrogate, DDP/DeepSpeed/FSDP) and replaces the group baseline by a
value model. At each rollout:

    r_t = -beta * penalty_t  (+ the scalar score on the last completion token)     (eq. 20: k1 -> log pi_old/pi_ref)
    A_t, R_t = GAE(r, V_old; gamma, lam)                                           (trl_kl.advantages.gae)

then TRL's surrogate trains the policy on A_t, and the critic is trained on the clipped value loss
against R_t with its own optimizer. See docs/ppo.md for why GRPOTrainer is the base, and for the migration from
TRL's former ``PPOConfig`` / ``PPOTrainer``.
"""

from __future__ import annotations

from . import _trl  # first: refuses an untested TRL before its internals are touched

import math
import os
from dataclasses import dataclass, field

import torch
import trl
from transformers import AutoModelForTokenClassification, PreTrainedModel

from . import guards, kl
from .advantages import gae, masked_whiten
from .config import KLConfigMixin, check_bool, check_loss_masks, check_number
from .grpo import GRPOTrainer, loss_mask


@dataclass
class PPOConfig(KLConfigMixin, trl.GRPOConfig):
    """``trl.GRPOConfig`` with trl_kl's KL fields (shared with ``GRPOConfig``, same validation) for PPO: one
    completion per prompt (``num_generations=1``), a critic, GAE. GRPO's group-baseline fields
    (``kl_reward_scope``, ``clip_std_min``, ``clip_std_max``) are not part of it: with ``kl_placement="reward"``
    the penalty enters the per-token reward before GAE, which carries it backwards, and the advantages are
    whitened (``whiten_advantages``); GRPO's reward normalisation (``scale_rewards``,
    ``multi_objective_aggregation="normalize_then_sum"``) is refused for the same reason."""

    num_generations: int | None = field(
        default=1, metadata={"help": "Completions per prompt. PPO's baseline is the critic, so 1 is the default."}
    )
    value_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Critic initialisation (a scalar head is added). None: the policy's checkpoint."},
    )
    value_learning_rate: float | None = field(
        default=None, metadata={"help": "Critic learning rate (AdamW). None: the policy's learning_rate."}
    )
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss (TRL's former PPO default)."})
    cliprange_value: float = field(
        default=0.2, metadata={"help": "Clip range of the value prediction around the rollout's value."}
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE."})
    lam: float = field(default=0.95, metadata={"help": "Lambda of GAE."})
    whiten_advantages: bool = field(
        default=True, metadata={"help": "Whiten the advantages over the rollout's completion tokens."}
    )
    skip_nonfinite_steps: bool = field(default=False, metadata={"help": guards.SKIP_HELP})

    def _check_fields(self) -> None:
        super()._check_fields()
        check_number("gamma", self.gamma, at_least=0, at_most=1, why="GAE's discount")
        check_number("lam", self.lam, at_least=0, at_most=1, why="GAE's lambda")
        check_number("cliprange_value", self.cliprange_value, greater_than=0)
        check_number("vf_coef", self.vf_coef, at_least=0)
        check_number("value_learning_rate", self.value_learning_rate, greater_than=0, optional=True)
        check_bool("whiten_advantages", self.whiten_advantages)

    def _run_trl_checks(self) -> None:
        # TRL's GRPOConfig refuses num_generations < 2 (its group baseline); PPO's baseline is the critic. Its
        # checks run with a stand-in group size that divides every generation batch, then 1 is restored.
        single = self.num_generations == 1
        if single:
            if self.per_device_train_batch_size < 2:
                raise ValueError("trl_kl's PPO needs per_device_train_batch_size >= 2 (TRL's batch checks).")
            self.num_generations = self.per_device_train_batch_size
            self.num_generations_eval = self.num_generations_eval or 1
        try:
            super()._run_trl_checks()
        finally:
            if single:
                self.num_generations = 1

    def _check_combinations(self) -> None:
        super()._check_combinations()
        check_loss_masks(self, kl_in_advantage=self.beta != 0 and self.kl_placement == "reward")  # GAE carries it
        if self.loss_type == "vespo":
            raise ValueError(
                "loss_type='vespo' weights whole sequences by the sign of their advantage, but PPO's advantages are "
                "per token (GAE): use another loss_type (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo)."
            )
        if self.scale_rewards != self._default("scale_rewards"):
            raise ValueError(
                f"scale_rewards={self.scale_rewards!r} has no effect in PPO, whose advantages are GAE's, whitened over "
                "the rollout's tokens (whiten_advantages), not rewards normalised in groups: leave scale_rewards at "
                "its default, and set whiten_advantages=False for raw GAE advantages."
            )
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                f"multi_objective_aggregation={self.multi_objective_aggregation!r} normalises each reward within the "
                "group of completions of a prompt, which PPO does not form (its baseline is the critic): PPO scores a "
                "completion by the reward_weights-weighted sum of its rewards. Use 'sum_then_normalize' (the "
                "default), and scale the rewards in the reward functions if they differ in size."
            )


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (PPO2; TRL's former PPOTrainer): 0.5 * masked mean of
    max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2). Returns ``(loss, clip fraction)``."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    n = mask.sum().clamp(min=1)
    loss = 0.5 * kl.masked(losses, mask).sum() / n
    clip_frac = kl.masked(((values - returns) ** 2 < (clipped - returns) ** 2).float(), mask).sum() / n
    return loss, clip_frac


def token_rewards(scores: torch.Tensor, penalty: torch.Tensor | None, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards ``(B, T)``: ``-beta * penalty_t`` on every completion token plus the scalar score
    on the last one (eq. 20; Ziegler et al. 2019). A NaN score (unscorable completion) adds nothing: the caller
    excludes that completion (``PPOTrainer._advantages``). An infinite score is an error, never made finite."""
    if torch.isinf(scores).any():
        raise ValueError("scores must be finite or NaN (unscorable); trl_kl.guards turns non-finite rewards into NaN.")
    mask = mask.bool()
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if penalty is not None:
        rewards = rewards - beta * kl.masked(penalty.float(), mask)
    last = (mask.long().cumsum(-1) == mask.sum(-1, keepdim=True)) & mask  # the last completion token
    return rewards + kl.masked(torch.nan_to_num(scores.float(), nan=0.0).unsqueeze(-1).expand_as(rewards), last)


class PPOTrainer(GRPOTrainer):
    """PPO with a critic and GAE on TRL's rollout machinery (see the module docstring).

    The arguments are ``trl.GRPOTrainer``'s, in its order (``model, reward_funcs, args, train_dataset,
    eval_dataset, processing_class, ...``), plus, by keyword:

    * ``value_model``: an ``AutoModelForTokenClassification``-style model with one label, or None to build one
      from ``args.value_model_name_or_path`` (default: the policy's checkpoint);
    * ``reward_model``: TRL's former ``PPOTrainer`` argument, a sequence-classification reward model or its path
      or hub id. It is scored exactly as a reward model in ``reward_funcs`` is (it is appended to them), so
      ``reward_funcs`` may be left out.

    The reference is the initial policy (or, with PEFT, the policy with its adapter disabled), loaded as TRL's
    GRPOTrainer loads it, so the former ``ref_model`` argument is refused. docs/ppo.md maps the former API onto
    this one."""

    _config_class = PPOConfig

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: PPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *trl_args,
        value_model: PreTrainedModel | None = None,
        reward_model=None,
        ref_model=None,
        **trl_kwargs,
    ):
        if isinstance(model, trl.GRPOConfig):
            raise TypeError(
                "trl_kl.PPOTrainer takes TRL's trainer order, model first: PPOTrainer(model, reward_funcs, args, "
                "train_dataset, ...), with value_model=, reward_model= and processing_class= by keyword (TRL's former "
                "PPOTrainer took args first; see docs/ppo.md)."
            )
        if ref_model is not None:
            raise ValueError(
                "trl_kl.PPOTrainer takes no ref_model: the reference is the initial policy, loaded from `model` as "
                "trl.GRPOTrainer loads it (with PEFT: the policy with its adapter disabled). Drop ref_model."
            )
        reward_funcs = self._with_reward_model(reward_funcs, reward_model)
        super().__init__(
            model, reward_funcs, args, train_dataset, eval_dataset, processing_class, *trl_args, **trl_kwargs
        )
        if value_model is None:
            source = self.args.value_model_name_or_path or self.model.config.name_or_path
            value_model = AutoModelForTokenClassification.from_pretrained(source, num_labels=1)
        self.value_model = self.accelerator.prepare_model(value_model)
        self.value_optimizer = torch.optim.AdamW(
            self.value_model.parameters(), lr=self.args.value_learning_rate or self.args.learning_rate
        )

    @staticmethod
    def _with_reward_model(reward_funcs, reward_model) -> list:
        """GRPO's ``reward_funcs`` list, with ``reward_model`` (TRL's former argument) appended: a model object or a
        path / hub id, which ``trl.GRPOTrainer`` loads and scores as it does any reward model."""
        if reward_funcs is None:
            funcs = []
        elif isinstance(reward_funcs, (list, tuple)):
            funcs = list(reward_funcs)
        else:
            funcs = [reward_funcs]
        if reward_model is not None:
            funcs.append(reward_model)
        if not funcs:
            raise ValueError(
                "trl_kl.PPOTrainer needs a reward: pass reward_model= (a sequence-classification model, or its path or "
                "hub id) or reward_funcs= (reward functions and/or reward models, as for trl.GRPOTrainer)."
            )
        return funcs

    # ---- rollout: per-token rewards, GAE -----------------------------------------------------------

    def _values(self, input_ids, attention_mask, logits_to_keep) -> torch.Tensor:
        """V(s_t) for each completion token t: the head's output at the position that predicts token t."""
        values = self.value_model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()
        return values[:, -logits_to_keep - 1 : -1]

    def _rollout_penalty(self, output: dict) -> torch.Tensor:
        """Per-token KL penalty of the rollout, for the sampling policy (eq. 20/35), ``(B, T)``: it enters the
        per-token rewards before GAE. Stores the sampling log-probs in ``output`` when TRL did not compute them
        (on-policy; then the loss's importance ratio uses them too)."""
        if output.get("old_per_token_logps") is None:
            output["old_per_token_logps"] = self._sampling_logps(output)
        settings = self.kl_settings
        return kl.reward_penalty(
            settings.estimator, output["old_per_token_logps"], output["ref_per_token_logps"], settings.k3_clip_max
        )

    @torch.no_grad()
    def _sampling_logps(self, output) -> torch.Tensor:
        """Log-probs of the sampling policy when TRL did not compute them (on-policy): one no-grad forward, which
        PPO needs because its per-token rewards carry the penalty before GAE, at rollout time."""
        if "pixel_values" in output:
            raise NotImplementedError(
                "PPO with the KL in the reward, on-policy, is not supported for vision-language models."
            )
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        batch_size = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        logps, _, _ = self._get_per_token_logps_and_entropies(
            self.model, input_ids, attention_mask, output["completion_ids"].size(1), batch_size=batch_size
        )
        return logps

    def _advantages(self, output: dict, rewards: torch.Tensor) -> torch.Tensor:
        mask = loss_mask(output).float()
        scores = rewards[self._process_slice(output)]
        # an unscorable completion (NaN score: trl_kl.guards) teaches nothing: advantage 0, no value loss
        value_mask = mask * ~torch.isnan(scores).unsqueeze(-1)
        penalty = self._rollout_penalty(output) if self._kl_on and self.kl_settings.in_reward else None
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        with torch.no_grad():
            old_values = self._values(input_ids, attention_mask, output["completion_ids"].size(1))
        per_token_rewards = token_rewards(scores, penalty, mask, self.kl_coef)
        advantages, returns = gae(per_token_rewards, old_values, mask, self.args.gamma, self.args.lam)
        advantages = masked_whiten(advantages, value_mask) if self.args.whiten_advantages else kl.masked(advantages, value_mask)
        output["old_values"], output["returns"], output["value_mask"] = kl.masked(old_values, mask), returns, value_mask

        finite = torch.nan_to_num(scores, nan=0.0)
        sequence_kl = kl.sequence_sum(penalty, mask) if penalty is not None else torch.zeros_like(finite)
        self._log_metrics(
            mask,
            token={"val/values": old_values, "val/returns": returns},
            sequence={
                "objective/scores": finite,
                "objective/kl": sequence_kl,
                "objective/rlhf_reward": finite - self.kl_coef * sequence_kl,
            },
        )
        return advantages

    # ---- loss: TRL's surrogate for the policy, the clipped value loss for the critic --------------------

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        metrics = _trl.metrics(self, mode)
        # TRL divides the loss by the gradient accumulation; the logged value is the micro-batch's own
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        metrics["loss/policy_avg"].append(self.accelerator.gather(loss.detach()).mean().item() * accumulation)
        if "clip_ratio/region_mean" in metrics:
            metrics["policy/clipfrac_avg"].append(metrics["clip_ratio/region_mean"][-1])
        self._critic_step(inputs, mode)
        return loss

    def _critic_step(self, inputs: dict, mode: str):
        """Value loss on this micro-batch; backward into the critic (its own graph and optimizer), scaled for
        gradient accumulation like TRL's policy loss. Its optimizer steps with the policy's (``_get_grad_norm``)."""
        mask = inputs.get("value_mask", loss_mask(inputs).float())  # hand-built batches may carry none
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with torch.set_grad_enabled(mode == "train"):
            values = self._values(input_ids, attention_mask, inputs["completion_ids"].size(1))
            loss, clip_frac = value_loss(values, inputs["old_values"], inputs["returns"], mask, self.args.cliprange_value)
            if mode == "train":
                (self.args.vf_coef * loss / self.current_gradient_accumulation_steps).backward()
        metrics = _trl.metrics(self, mode)
        metrics["loss/value_avg"].append(self.accelerator.gather(loss.detach()).mean().item())
        metrics["val/clipfrac_avg"].append(self.accelerator.gather(clip_frac).mean().item())

    def _get_grad_norm(self, model, grad_norm=None):
        # the critic steps after the policy's step was checked (trl_kl.reliability), so a non-finite policy step
        # stops training with both models as they were
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._critic_optimizer_step()
        return grad_norm

    def _critic_optimizer_step(self):
        """The critic's optimizer step, with its own non-finite check; skipped with the policy's (skip_nonfinite_steps:
        the step is skipped as a whole)."""
        clip = self.args.max_grad_norm if self.args.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.value_model.parameters(), clip)
        if getattr(self, "_skipping_step", False):
            _trl.metrics(self, "train")["nonfinite/critic_skipped_frac"].append(1.0)
        else:
            bad = None if guards.is_finite(norm) else "critic gradient norm"
            if not self._nonfinite_step(bad, float(norm), True, metric="nonfinite/critic_skipped_frac"):
                self.value_optimizer.step()
        self.value_optimizer.zero_grad()

    # ---- checkpoints: the critic is trained state too ----------------------------------------------------

    def _trl_kl_state_files(self) -> list[str]:
        return [*super()._trl_kl_state_files(), "value_model/", "value_optimizer.pt"]

    def _save_trl_kl_state(self, folder: str) -> None:
        super()._save_trl_kl_state(folder)
        if self.args.should_save:
            self.accelerator.unwrap_model(self.value_model).save_pretrained(os.path.join(folder, "value_model"))
            if not self.args.save_only_model:
                torch.save(self.value_optimizer.state_dict(), os.path.join(folder, "value_optimizer.pt"))

    def _load_trl_kl_state(self, folder: str) -> None:
        super()._load_trl_kl_state(folder)
        restored = AutoModelForTokenClassification.from_pretrained(os.path.join(folder, "value_model"))
        self.accelerator.unwrap_model(self.value_model).load_state_dict(restored.state_dict())
        state = torch.load(os.path.join(folder, "value_optimizer.pt"), map_location="cpu", weights_only=True)
        self.value_optimizer.load_state_dict(state)  # moves the state to the parameters' device

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            target = os.path.join(output_dir or self.args.output_dir, "value_model")
            self.accelerator.unwrap_model(self.value_model).save_pretrained(target)
