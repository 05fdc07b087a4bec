"""KL estimators, where they go, and which combinations are sound.

Pure tensor functions, no trainer state. Conventions:

* ``logps``: log pi(a_t | s_t) of the policy being trained, shape ``(B, T)``;
* ``old_logps``: the *sampling* policy pi_old (the one that generated the tokens), ``(B, T)``;
* ``ref_logps``: the frozen reference pi_ref, ``(B, T)``;
* ``mask``: float or bool ``(B, T)``, 1 on completion tokens;
* the paper writes r = pi_ref / pi, so ``log r = ref_logps - logps`` and k1 = -log r.

Every estimator is computed in float32 (or float64 when given float64), whatever the input dtype,
so bf16 log-probabilities never feed ``exp``. ``exp`` only ever sees log-ratios clamped to
``[-LOG_RATIO_BOUND, LOG_RATIO_BOUND]``: with |log r| up to 50 nothing is inf or NaN.

References: "the paper" is Liu, Liu & Liu (2025), "Rethinking KL Divergence in RLHF: From Single Sample to
Mini-Batch to Expectation" (docs/theory.md#references); its equations are quoted as "eq. N". The theory
each function implements is in ``docs/theory.md``, cited by section anchor.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

ESTIMATORS = ("k1", "k2", "k3", "k3_clip", "full")
PLACEMENTS = ("reward", "loss")
REWARD_SCOPES = ("return_to_go", "token", "sequence")

LOG_RATIO_BOUND = 20.0
"""Log-ratios are clamped to +-20 before ``exp`` (e^20 ~ 4.9e8): finite in float32 with room for the
products and squares that follow. Only k3, k3_clip and the eq. 35 penalty exponentiate; k1 and k2 are
polynomial in the log-ratio and are never clamped."""

DEFAULT_K3_CLIP_MAX = 10.0
"""Appendix D clamps the ratio r = pi_ref / pi at 10 before forming k3."""


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def log_ratio(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """log r = log pi_ref - log pi (docs/theory.md#estimators), in float32 (float64 kept)."""
    return _as_float(ref_logps) - _as_float(logps)


def clamped_log_ratio(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """log r clamped to ``[-LOG_RATIO_BOUND, LOG_RATIO_BOUND]``: the only form that is exponentiated."""
    return log_ratio(logps, ref_logps).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)


# ---------------------------------------------------------------------------------------------------
# The estimators (docs/theory.md#estimators, the paper's section 2 and appendix D)
# ---------------------------------------------------------------------------------------------------


def k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k1 = -log r = log pi - log pi_ref. Unbiased for KL(pi || pi_ref) (docs/theory.md#estimators)."""
    return -log_ratio(logps, ref_logps)


def k2(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k2 = (log r)^2 / 2. Biased value; its gradient (log pi - log pi_ref) grad log pi is the per-state
    KL gradient (eq. 14, appendix A.2)."""
    return 0.5 * log_ratio(logps, ref_logps) ** 2


def _value_with_score_gradient(value: torch.Tensor, coefficient: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, ``coefficient * grad log pi`` in the backward pass (w.r.t. ``logps``
    only). This is how k3 and k3_clip keep their gradient coefficient bounded *and* of the right sign where
    the exponent is clamped: the literal derivative of a clamped ``exp`` is 0 there, which would leave only
    the linear term's ``+1`` (push pi down where pi << pi_ref, the wrong way)."""
    if not logps.requires_grad:
        return value
    score = _as_float(logps) - _as_float(logps).detach()  # 0 in value, grad log pi in gradient
    return value.detach() + coefficient.detach() * score


def k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 = r - 1 - log r (Schulman's estimator, docs/theory.md#estimators). Unbiased value, but its gradient
    (1 - r) grad log pi is that of KL(pi_ref || pi), and r explodes when pi << pi_ref (Fig. 1).

    Only the exponentiated log-ratio is clamped (to +-LOG_RATIO_BOUND); the linear term of the value stays
    exact. The gradient is ``(1 - r_c) grad log pi`` with ``r_c = exp(clamp(log r))``: beyond the clamp it
    keeps the sign and the bounded size of k3's coefficient (1 - e^20 at log r = 30, not the +1 that the
    literal derivative of the clamped value would give), as ``k3_clip`` does at its own clamp. The gradient
    flows to ``logps`` only (the reference is frozen)."""
    lr = log_ratio(logps, ref_logps)
    ratio_m1 = torch.expm1(lr.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    return _value_with_score_gradient(ratio_m1 - lr, -ratio_m1, logps)


def k3_clip(logps: torch.Tensor, ref_logps: torch.Tensor, max_ratio: float = DEFAULT_K3_CLIP_MAX) -> torch.Tensor:
    """k3 with the ratio r clamped at ``max_ratio`` (appendix D: ``clip_r = clamp(r, max=10)``,
    ``k3_clip = clip_r - 1 - log r``): that is the value.

    Its gradient is k3's coefficient with the same clamp, ``(1 - min(r, max_ratio)) grad log pi``, the
    bounded form of Fig. 1's exploding term and the same coefficient as ``reward_penalty("k3_clip")``.
    (The literal derivative of the clamped value would be ``+1`` above the clamp: it would push a token
    that pi already under-weights further down.)"""
    if not max_ratio > 1:
        raise ValueError(f"k3_clip max_ratio must be > 1 (a clamp on pi_ref/pi), got {max_ratio}.")
    lr = log_ratio(logps, ref_logps)
    clipped_ratio_m1 = torch.expm1(lr.clamp(-LOG_RATIO_BOUND, min(LOG_RATIO_BOUND, math.log(max_ratio))))
    return _value_with_score_gradient(clipped_ratio_m1 - lr, -clipped_ratio_m1, logps)


def estimate(
    estimator: str, logps: torch.Tensor, ref_logps: torch.Tensor, k3_clip_max: float = DEFAULT_K3_CLIP_MAX
) -> torch.Tensor:
    """Per-token value of a sampled estimator (k1, k2, k3, k3_clip) of KL(pi || pi_ref), ``(B, T)``."""
    if estimator == "k1":
        return k1(logps, ref_logps)
    if estimator == "k2":
        return k2(logps, ref_logps)
    if estimator == "k3":
        return k3(logps, ref_logps)
    if estimator == "k3_clip":
        return k3_clip(logps, ref_logps, k3_clip_max)
    raise ValueError(f"kl estimator must be one of k1, k2, k3, k3_clip for sampled tokens, got {estimator!r}")


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact per-state KL(pi(.|s) || pi_ref(.|s)) over the vocabulary (the paper's way (1) in section 4),
    from logits ``(B, T, V)``; returns ``(B, T)``. Differentiable in ``logits``. Naive memory: it holds
    both log-softmaxes whole."""
    logp = torch.log_softmax(_as_float(logits), dim=-1)
    ref_logp = torch.log_softmax(_as_float(ref_logits), dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


# ---------------------------------------------------------------------------------------------------
# KL in the reward: a detached per-token penalty (eq. 20, 34, 35, 39)
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def reward_penalty(
    estimator: str,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    k3_clip_max: float = DEFAULT_K3_CLIP_MAX,
) -> torch.Tensor:
    """Per-token KL penalty that goes *into the reward*, from the sampling policy (detached), ``(B, T)``.

    The shaped reward is ``R_t = A - beta * penalty_t`` (eq. 39), and the policy-gradient surrogate
    multiplies it by grad log pi. So the penalty is the estimator's *gradient coefficient*:

    * k1: ``log(pi_old / pi_ref)`` (eq. 20, PPO's reward): sound;
    * k3 (and k3_clip): "k3 moved into the reward", ``1 - pi_ref / pi_old`` (eq. 35, ratio clamped at
      ``k3_clip_max`` for k3_clip): biased, the gradient of KL(pi_ref || pi);
    * k2: the value ``(log r)^2 / 2`` (eq. 34): unsound, always positive, it pushes every sampled
      token down. Offered for ablations only.
    """
    if estimator == "k1":
        return k1(old_logps, ref_logps)
    if estimator in ("k3", "k3_clip"):
        lr = clamped_log_ratio(old_logps, ref_logps)
        if estimator == "k3_clip":
            lr = lr.clamp(max=math.log(k3_clip_max))
        return -torch.expm1(lr)
    if estimator == "k2":
        return k2(old_logps, ref_logps)
    raise ValueError(
        f"kl_estimator={estimator!r} cannot go in the reward: use k1 (sound), k3/k3_clip (eq. 35) or k2 (ablation)"
    )


def masked(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``per_token`` where ``mask`` is set, exactly 0 elsewhere (selection, not a product: a NaN or inf on a
    padded position must not leak into sums)."""
    return torch.where(mask.bool(), per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))


def return_to_go(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reverse cumulative sum inside each sequence's mask: out[b, t] = sum_{t' >= t} x[b, t'] mask[b, t'],
    zero on masked positions (docs/theory.md#sequence-kl: each token must carry the KL of the rest of the sequence, PPO's
    return with gamma = 1). ``(B, T) -> (B, T)``."""
    return masked(masked(per_token, mask).flip(-1).cumsum(-1).flip(-1), mask)


def sequence_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over each sequence's mask, ``(B, T) -> (B,)``: the sequence-level KL estimate (docs/theory.md#sequence-kl)."""
    return masked(per_token, mask).sum(-1)


def scoped_penalty(penalty: torch.Tensor, mask: torch.Tensor, scope: str) -> torch.Tensor:
    """What each token carries of the per-token penalty, ``(B, T)``, by ``kl_reward_scope`` (docs/theory.md#sequence-kl):

    * ``token``: its own penalty (eq. 39 literally; exact only when each token is its own episode);
    * ``return_to_go``: the penalties from this token to the end (the exact gradient of sequence KL);
    * ``sequence``: the whole completion's sum on every token (exact in expectation, noisier).
    """
    if scope == "token":
        return masked(penalty, mask)
    if scope == "return_to_go":
        return return_to_go(penalty, mask)
    if scope == "sequence":
        return masked(sequence_sum(penalty, mask).unsqueeze(-1).expand_as(penalty), mask)
    raise ValueError(f"kl_reward_scope must be one of {REWARD_SCOPES}, got {scope!r}")


def kl_shaped_advantages(
    advantages: torch.Tensor, penalty: torch.Tensor, mask: torch.Tensor, beta: float, scope: str
) -> torch.Tensor:
    """Eq. 39: ``R_hat[i, t] = A_hat[i, t] - beta * penalty`` with the penalty carried per ``scope``.
    ``advantages`` is ``(B,)`` or ``(B, T)``; returns ``(B, T)``."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    return advantages - beta * scoped_penalty(penalty, mask, scope).to(advantages.dtype)


# ---------------------------------------------------------------------------------------------------
# KL as a loss: differentiated directly (eq. 14, 61; section 3)
# ---------------------------------------------------------------------------------------------------


def kl_loss(
    estimator: str,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    k3_clip_max: float = DEFAULT_K3_CLIP_MAX,
    importance_ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token differentiable KL loss term, ``(B, T)`` (to be masked and averaged by the caller).

    On-policy the gradient of k2 is the per-state KL gradient (sound), of k1 zero in expectation
    (unsound), of k3 the gradient of KL(pi_ref || pi) (biased). Off-policy, pass the importance ratio
    pi_theta / pi_old: it multiplies the estimator as given, so a *detached* ratio keeps each form's
    on-policy gradient (E_old[rho grad f] = E_pi[grad f]); a ratio with gradient turns k1 and k3
    into sound per-token forms (grad(rho f) = rho (f grad log pi + grad f)), which is what TRL's
    ``use_bias_correction_kl`` does for k3.
    """
    per_token = estimate(estimator, logps, ref_logps, k3_clip_max)
    if importance_ratio is not None:
        per_token = per_token * importance_ratio
    return per_token


def adaptive_kl_coef(beta: float, observed_kl: float, target: float, horizon: float, n_samples: int) -> float:
    """Adaptive KL coefficient (Ziegler et al. 2019, eq. 2; TRL's former ``AdaptiveKLController``):
    ``e = clip(observed / target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n_samples / horizon)``.
    ``observed_kl`` is the sequence-level KL of the samples just trained on, ``n_samples`` their count."""
    error = min(max(observed_kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_samples / horizon)


# ---------------------------------------------------------------------------------------------------
# Which (estimator, placement) combinations are sound (docs/theory.md#placement, the paper's section 1 table)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Soundness:
    verdict: str  # "sound" | "biased" | "unsound"
    reason: str


SOUNDNESS: dict[tuple[str, str], Soundness] = {
    ("k1", "reward"): Soundness(
        "sound",
        "k1 in the reward, log(pi_old/pi_ref) (eq. 20), is PPO's reward and gives the KL gradient; of whole "
        "sequences with kl_reward_scope 'return_to_go' or 'sequence', per token only with 'token' (docs/theory.md#sequence-kl).",
    ),
    ("k1", "loss"): Soundness(
        "unsound",
        "k1 as a loss has zero expected gradient (E[grad log pi] = 0): it only pushes sampled tokens "
        "down and collapses the policy (section 2.1).",
    ),
    ("k2", "reward"): Soundness(
        "unsound",
        "k2 in the reward is always positive, so it pushes every sampled token down whatever the KL "
        "(eq. 34).",
    ),
    ("k2", "loss"): Soundness(
        "sound",
        "k2 as a loss has the same gradient as k1 in the reward on-policy (eq. 14, 61): the per-state KL "
        "gradient, not that of whole-sequence KL (docs/theory.md#sequence-kl).",
    ),
    ("k3", "reward"): Soundness(
        "biased",
        "k3 moved into the reward, beta * (1 - pi_ref/pi_old) (eq. 35), follows the gradient of "
        "KL(pi_ref || pi), not of KL(pi || pi_ref).",
    ),
    ("k3", "loss"): Soundness(
        "biased",
        "k3 as a loss has gradient (1 - pi_ref/pi) grad log pi, the gradient of KL(pi_ref || pi), not of "
        "KL(pi || pi_ref), and explodes when pi << pi_ref (Fig. 1).",
    ),
    ("k3_clip", "reward"): Soundness(
        "biased",
        "k3_clip moved into the reward, 1 - min(pi_ref/pi_old, k3_clip_max) (eq. 35, appendix D), "
        "follows a clipped gradient of KL(pi_ref || pi).",
    ),
    ("k3_clip", "loss"): Soundness(
        "biased",
        "k3_clip as a loss follows a clipped gradient of KL(pi_ref || pi), (1 - min(r, k3_clip_max)) grad log pi "
        "(appendix D): bounded, but not the gradient of KL(pi || pi_ref).",
    ),
    ("full", "loss"): Soundness(
        "sound",
        "the exact per-state KL over the vocabulary as a loss gives the exact per-state KL gradient "
        "(section 4, way 1), not that of whole-sequence KL (docs/theory.md#sequence-kl).",
    ),
    ("full", "reward"): Soundness(
        "unsound",
        "the exact per-state KL does not depend on the sampled token, so in the reward it carries no "
        "gradient for the state it was computed at; use kl_placement='loss' with 'full'.",
    ),
}

_warned: set[tuple[str, str]] = set()


def validate_kl(estimator: str, placement: str, allow_unsound: bool = False) -> Soundness:
    """Check an (estimator, placement) pair against ``SOUNDNESS``.

    Raises ``ValueError`` naming the valid values for an unknown name, and quoting the paper's reason for
    an unsound pair unless ``allow_unsound`` (ablations). Warns once per pair, with the reason, for a
    biased pair. Returns the table entry.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {ESTIMATORS}, got {estimator!r}.")
    if placement not in PLACEMENTS:
        raise ValueError(f"kl_placement must be one of {PLACEMENTS}, got {placement!r}.")
    entry = SOUNDNESS[(estimator, placement)]
    if entry.verdict == "unsound" and not allow_unsound:
        raise ValueError(
            f"kl_estimator={estimator!r} with kl_placement={placement!r} is unsound: {entry.reason} "
            "Use k1 in the reward or k2 as a loss, or set allow_unsound_kl=True for an ablation."
        )
    if entry.verdict == "biased" and (estimator, placement) not in _warned:
        _warned.add((estimator, placement))
        warnings.warn(
            f"kl_estimator={estimator!r} with kl_placement={placement!r} is biased: {entry.reason}",
            stacklevel=2,
        )
    return entry
