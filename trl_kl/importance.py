"""Importance sampling between the sampler and the policy: TRL 1.16's ratios and corrections, and the exact
sequence-level weight (docs/theory.md#sampler-mismatch).

Pure tensor functions, no trainer state. Three distributions are involved when the tokens were not drawn
from the policy being trained:

* pi_theta, the policy being trained: ``logps`` ``(B, T)``, with gradient;
* pi_old, the trainer's own copy of the policy when the rollout was made: ``old_logps`` ``(B, T)``, TRL's
  ``old_per_token_logps`` (recomputed by the trainer); it differs from pi_theta after the first optimizer
  step on a rollout (``num_iterations``, ``steps_per_generation``);
* q, the sampler that drew the tokens: ``sampling_logps`` ``(B, T)``, TRL's ``sampling_per_token_logps``
  (vLLM's processed log-probs, after temperature and top-k/top-p); q = pi_old when the trainer generates.

pi_theta / q = (pi_theta / pi_old) * (pi_old / q). TRL 1.16 corrects its loss with both factors: the
*policy ratio* ``coef_1`` (``importance_sampling_level``: per token, or GSPO's per-sequence geometric mean;
differentiable) and the *sampler correction* (``vllm_importance_sampling_correction``: per token or per
sequence, truncated or masked at ``[clip_min, clip_max]``; a constant). ``policy_ratio``,
``sampler_correction`` and ``clipped_surrogate_loss`` reproduce TRL's formulas exactly (file and line cited
in each; pinned against TRL's own code by ``tests/test_importance.py``), unclamped as TRL's are.

Neither TRL level is the sequence's likelihood ratio pi_theta(y) / q(y), the weight that makes a
sequence-level objective exact under any sampler. ``sequence_log_weight`` / ``sequence_weight`` give it (and
``prefix_weights`` the per-decision weights pi(y_<=t) / q(y_<=t)), with the exponent clamped at
``+-kl.LOG_RATIO_BOUND`` as everywhere in ``kl.py`` and the gradient kept beyond the clamp.

The trainer's ``kl_importance_weight`` (``GRPOConfig``) chooses between the two: ``"token"`` puts the KL
through TRL's factors (the KL-shaped advantage under ``coef_1``, its clip and the sampler correction; the loss
placement's term times ``token_ratio`` and the same correction), ``"sequence"`` weights the KL term by
pi_theta(y) / q(y) itself (``sequence_weighted_penalty``, ``sequence_weighted_kl_loss``). The exact-gradient
harness (``trl_kl.exact_gradients``) evaluates these same functions.

Shapes: a mask is float or bool ``(B, T)``, 1 on the tokens that count; per-sequence results are ``(B, 1)``
so they broadcast onto per-token tensors, as TRL's do.
"""

from __future__ import annotations

import math

import torch

from . import kl
from .kl import LOG_RATIO_BOUND, masked

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
"""TRL's ``importance_sampling_level``: ``token`` (pi_theta / pi_old per token) or ``sequence`` (GSPO)."""

SAMPLER_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
"""TRL's ``vllm_importance_sampling_mode``."""

KL_IMPORTANCE_WEIGHTS = ("token", "sequence")
"""``GRPOConfig.kl_importance_weight``: how the KL term is corrected for the sampler (module docstring)."""

UNBIASED_VALUE_ESTIMATORS = ("k1", "k3")
"""The sampled estimators whose value is unbiased for the per-state KL (E_pi[k] = KL(pi || pi_ref) at each
state), so that the summed estimator times the sequence weight *with its gradient* has expected gradient
grad KL(pi(y) || pi_ref(y)) (``sequence_weighted_kl_loss``)."""


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def policy_ratio(
    logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """TRL 1.16's importance ratio ``coef_1`` of the policy being trained to the trainer's rollout-time copy,
    differentiable in ``logps`` (``trl/trainer/grpo_trainer.py``, ``_compute_loss``, lines 3083-3095):

    * ``token``: ``exp(log pi_theta - log pi_old)`` per token, ``(B, T)``;
    * ``sequence`` (GSPO): ``exp`` of the *mean* over the mask of the per-token log-ratios, ``(B, 1)``: the
      geometric mean of the token ratios, not the sequence's likelihood ratio (``sequence_weight``).

    No clamp (TRL has none). In the dtype of ``logps - old_logps``, as TRL."""
    log_ratio = logps - old_logps
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        mask = mask.to(log_ratio.dtype)
        return torch.exp((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}.")


@torch.no_grad()
def sampler_correction(
    old_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> torch.Tensor:
    """TRL 1.16's ``vllm_importance_sampling_ratio``, the correction pi_old / q for the sampler, a constant
    (``trl/trainer/grpo_trainer.py``, ``_generate_and_score_completions``, lines 2660-2706):

    * ``token_*``: ``exp(log pi_old - log q)`` per token, ``(B, T)`` (1 off the mask);
    * ``sequence_*``: ``exp`` of the *sum* over the mask, ``(B, 1)``: the sequence's likelihood ratio
      pi_old(y) / q(y);
    * ``*_truncate``: clamped to ``[clip_min, clip_max]``; ``*_mask``: ratios outside it set to 0 (a bound
      of ``None`` is no bound; TRL's config refuses truncation with both bounds ``None``).

    A NaN sampling log-prob (a token vLLM could not score) contributes a log-difference of 0, as in TRL.
    TRL's defaults: ``mode="sequence_mask"``, ``clip_max=3.0``, ``clip_min=None``."""
    if mode not in SAMPLER_CORRECTION_MODES:
        raise ValueError(f"vllm_importance_sampling_mode must be one of {SAMPLER_CORRECTION_MODES}, got {mode!r}.")
    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        if clip_min is None and clip_max is None:
            raise ValueError("a *_truncate sampler correction needs clip_min or clip_max (TRL's config rule).")
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def clipped_surrogate_loss(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
) -> torch.Tensor:
    """TRL 1.16's per-token PPO-2 loss for ``loss_type`` grpo, bnpo, dr_grpo, dapo, luspo
    (``trl/trainer/grpo_trainer.py``, ``_compute_loss``, lines 3112-3120): ``-min(coef_1 A, coef_2 A)`` with
    ``coef_2 = clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)`` and, when ``delta`` is set, ``coef_1``
    capped at ``delta`` (two-sided clipping). ``ratio`` is ``policy_ratio``'s ``coef_1``; ``advantages``
    broadcast against it (``(B, 1)`` or ``(B, T)``). TRL then multiplies the result by the sampler
    correction (line 3147) before adding its KL term (line 3150)."""
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    return -torch.min(ratio * advantages, clipped * advantages)


def sequence_log_weight(logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y) / q(y) = sum over the mask of ``logps - sampling_logps``, ``(B, 1)``, differentiable in
    ``logps``. Pass q's log-probs (``sampling_logps``) for the full correction pi_theta / q, or pi_old's for
    the policy part only. A NaN log-prob of the sampler contributes 0, as in ``sampler_correction``."""
    diff = _float(logps) - _float(sampling_logps)
    return masked(torch.nan_to_num(diff, nan=0.0), mask).sum(-1, keepdim=True)


def _exp_clamped_keep_gradient(log_w: torch.Tensor) -> torch.Tensor:
    """``exp(clamp(log_w, +-LOG_RATIO_BOUND))`` in value, ``w_c * grad log_w`` in gradient (kl.k3's rule):
    beyond the clamp the weight keeps the gradient of its log instead of losing it."""
    w = torch.exp(log_w.detach().clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    if not log_w.requires_grad:
        return w
    return w + w * (log_w - log_w.detach())


def token_ratio(logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    """pi_theta / pi_old per token, ``(B, T)``: ``exp(clamp(logps - old_logps, +-LOG_RATIO_BOUND))`` in value,
    ``ratio * grad log pi_theta`` in gradient, also beyond the clamp (the literal derivative of a clamped exp is 0
    there: a token whose ratio passed e^20 would lose its gradient). The ratio of the loss placement's KL term
    (detached, or with this gradient for ``use_bias_correction_kl``) and of the ``is/*`` metrics."""
    return _exp_clamped_keep_gradient(_float(logps) - _float(old_logps))


def sequence_weight(logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sequence's likelihood ratio W = pi(y) / q(y), ``(B, 1)``, with its full gradient
    ``W grad log pi(y)``: multiplied by a per-sequence value V(y) whose expectation under pi is the objective
    (e.g. the summed k1 or k3 of the sequence), ``E_q[grad(W V)] = grad E_pi[V]`` exactly, whatever q (on its
    support). The sequence-level form of TRL's ``use_bias_correction_kl``. Exponent clamped at
    ``+-kl.LOG_RATIO_BOUND``, gradient kept."""
    return _exp_clamped_keep_gradient(sequence_log_weight(logps, sampling_logps, mask))


def sequence_weight_per_token(logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)``: on every token the *value* of the sequence weight W = pi(y) / q(y), and at token t the
    gradient ``W grad log pi(y_t | y_<t)`` only. A per-token ratio with this value makes a per-token advantage
    (return-to-go KL, a sequence reward) exact under any sampler: ``E_q[sum_t W A_t grad log pi_t] =
    E_pi[sum_t A_t grad log pi_t]``. TRL's token-level ratio has the value pi_theta(y_t) / pi_old(y_t), which
    leaves the prefix and the suffix of the token under the sampler's distribution. (GSPO's "token" variant
    with the product of the token ratios instead of their geometric mean.) Zero off the mask."""
    log_w = sequence_log_weight(logps, sampling_logps, mask).detach()
    w = torch.exp(log_w.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    own = _float(logps)
    return masked(w * torch.exp(own - own.detach()), mask)


@torch.no_grad()
def prefix_weights(logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-decision weights pi(y_<=t) / q(y_<=t) = exp(cumulative sum of ``logps - sampling_logps`` up to
    and including t), ``(B, T)``, detached, 0 off the mask. The weight a term that depends on the tokens up
    to t only needs (per-decision importance sampling, Precup et al. 2000): lower variance than the whole
    sequence's weight. Exponent clamped at ``+-kl.LOG_RATIO_BOUND``."""
    diff = masked(torch.nan_to_num(_float(logps) - _float(sampling_logps), nan=0.0), mask)
    return masked(torch.exp(diff.cumsum(-1).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)), mask)


def sequence_weighted_penalty(
    penalty: torch.Tensor, logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor, scope: str
) -> torch.Tensor:
    """``kl_importance_weight="sequence"``, reward placement: the KL part of the per-token loss, ``(B, T)``,
    ``W * (penalty carried per scope)`` with W = ``sequence_weight_per_token(logps, sampling_logps, mask)``
    (the value pi_theta(y) / q(y) on every token, each token's own gradient). It is what the KL-shaped advantage
    A - beta * carried contributes to TRL's per-token loss (-coef_1 * advantage), with the sequence weight in
    place of coef_1, TRL's clip and its sampler correction: the caller adds ``beta`` times its TRL-normalised
    mean to the loss, outside TRL's surrogate. With ``penalty`` the current policy's (``kl.reward_penalty`` of
    ``logps.detach()``) and the ``return_to_go`` or ``sequence`` scope, k1's expected gradient under any sampler q
    that covers pi_theta is grad KL(pi_theta(y) || pi_ref(y)) (docs/theory.md#sampler-mismatch)."""
    weight = sequence_weight_per_token(logps, sampling_logps, mask)
    return weight * kl.scoped_penalty(penalty, mask, scope).to(weight.dtype)


def sequence_weighted_kl_loss(
    estimator: str, per_token_kl: torch.Tensor, logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``kl_importance_weight="sequence"``, loss placement: the per-token KL loss ``(B, T)`` times the sequence
    weight W = pi_theta(y) / q(y) (``sequence_weight``).

    * k1, k3 (``UNBIASED_VALUE_ESTIMATORS``): W *with its gradient*. Summed over the tokens, W * sum_t k_t has
      expected gradient grad E_pi[sum_t k_t] = grad KL(pi_theta(y) || pi_ref(y)) under any sampler that covers
      pi_theta: the exact loss form, the sequence-level ``use_bias_correction_kl``.
    * k2, k3_clip, full (``per_token_kl`` the exact per-state KL): W *detached*. Their gradient is a per-state
      one, not that of the sequence KL; the detached weight makes its expectation under q the term's own
      on-policy update, whatever the sampler."""
    weight = sequence_weight(logps, sampling_logps, mask)
    if estimator not in UNBIASED_VALUE_ESTIMATORS:
        weight = weight.detach()
    return _float(per_token_kl) * weight
