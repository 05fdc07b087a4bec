"""Advantages: group normalisation with clip_std, GAE, whitening, importance-sampling ESS.

Pure tensor functions, no trainer state. Shapes: ``(B,)`` per sequence, ``(B, T)`` per token.
"""

from __future__ import annotations

import torch

from .kl import masked

SCALE_MODES = ("group", "batch", "none")

TRL_STD_EPS = 1e-4
"""TRL 1.16 divides by ``std + 1e-4``; kept when no ``std_min`` is given so results match stock TRL."""


def validate_std_bounds(std_min: float | None, std_max: float | None) -> None:
    """Config-time check of the clip_std bounds (eq. 41)."""
    if std_min is not None and not std_min > 0:
        raise ValueError(f"clip_std_min must be > 0 (it bounds the amplification 1/std), got {std_min}.")
    if std_max is not None and not std_max > 0:
        raise ValueError(f"clip_std_max must be > 0, got {std_max}.")
    if std_min is not None and std_max is not None and std_min > std_max:
        raise ValueError(f"clip_std_min ({std_min}) must be <= clip_std_max ({std_max}).")


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaN (as ``trl.trainer.utils.nanstd``); NaN with < 2 values."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) / (count - 1).clamp(min=1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    return var.sqrt().squeeze(dim)


def _is_constant(grouped: torch.Tensor) -> torch.Tensor:
    """True for rows whose non-NaN values are all bitwise equal: such a group carries no signal, and
    its mean may differ from its members by rounding, which must not become an advantage."""
    filled = torch.where(torch.isnan(grouped), torch.nanmean(grouped, dim=-1, keepdim=True), grouped)
    first = filled[..., :1]
    return (filled == first).all(dim=-1) | torch.isnan(first).squeeze(-1)


def group_normalized_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: str = "group",
    std_min: float | None = None,
    std_max: float | None = None,
) -> torch.Tensor:
    """GRPO advantages with clip_std (eq. 41, docs/theory.md#clip-std):
    ``A_i = (r_i - mean_g(r)) / clip(std, std_min, std_max)``.

    ``rewards`` is ``(B,)`` with consecutive groups of ``group_size`` completions of one prompt. ``scale``
    follows TRL's ``scale_rewards``: ``group`` (std of the group), ``batch`` (std of the whole batch),
    ``none`` (no division). Without bounds the divisor is TRL's ``std + 1e-4``; with either bound it is
    ``clip(std, std_min, std_max)`` and no epsilon: ``std_min`` is the principled floor (advantages are at
    most ``max|r - mean| / std_min``). NaN rewards (unscorable completions) are left out of the mean and
    std and get advantage 0, as in TRL; a group whose rewards are all exactly equal gets advantage 0.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}.")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size ({group_size}) must divide the number of rewards ({rewards.numel()}): each prompt "
            "needs exactly group_size completions."
        )
    if scale not in SCALE_MODES:
        raise ValueError(f"scale must be one of {SCALE_MODES}, got {scale!r}.")
    validate_std_bounds(std_min, std_max)

    grouped = rewards.view(-1, group_size)
    centred = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale == "none":
        advantages = centred
    else:
        if scale == "group":
            std = _nanstd(grouped, dim=1).unsqueeze(1) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        else:
            std = _nanstd(rewards).expand(grouped.shape[0], 1) if rewards.numel() > 1 else rewards.new_zeros(1, 1)
        if std_min is None and std_max is None:
            divisor = std + TRL_STD_EPS
        else:
            divisor = std.clamp(min=std_min, max=std_max)
        advantages = centred / divisor
    advantages = torch.where(_is_constant(grouped).unsqueeze(1), torch.zeros_like(advantages), advantages)
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), per token, inside each sequence's mask.

    ``rewards``, ``values``, ``mask``: ``(B, T)``; a token after the last masked-in one is terminal
    (value 0). delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}. Returns
    ``(advantages, returns)`` with ``returns = advantages + values``, both zero off the mask.
    """
    rewards, values = masked(rewards, mask), masked(values, mask)
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])
    next_advantage = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        # A padded position passes the next real token's quantities through unchanged.
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        current = delta + gamma * lam * next_advantage
        real = mask[:, t].bool()
        advantages[:, t] = torch.where(real, current, 0.0)
        next_value = torch.where(real, values[:, t], next_value)
        next_advantage = torch.where(real, current, next_advantage)
    return advantages, masked(advantages + values, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``x`` over the masked-in entries: zero mean, unit variance there, exactly 0 elsewhere."""
    x = masked(x, mask)
    n = mask.sum().clamp(min=1)
    mean = x.sum() / n
    var = masked((x - mean) ** 2, mask).sum() / n
    return masked((x - mean) * torch.rsqrt(var + eps), mask)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """Effective sample size fraction of importance weights w = exp(log_weights), 1-D:
    ``(sum w)^2 / (n sum w^2)`` in (0, 1], computed in log space (overflow-free). 1 on-policy."""
    lw = log_weights.double().reshape(-1)
    if lw.numel() == 0:
        return log_weights.new_tensor(1.0)
    ess = torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)) / lw.numel()
    return ess.to(log_weights.dtype if log_weights.is_floating_point() else torch.float32)
