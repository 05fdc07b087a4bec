"""Non-finite guards: rewards, losses and gradient norms (docs/reliability.md#non-finite-values).

One rule for rewards, in all three trainers: a reward that is not a finite number (``None``, NaN, +inf, -inf)
means *unscorable*. That reward function's value is left out of the completion's reward, exactly as TRL leaves
out ``None``; a completion with no scorable value at all is excluded (GRPO: out of its group's mean and std,
advantage 0; PPO: advantage 0 and no value loss; DPO: out of the best/worst pairing). A non-finite value is never
turned into a finite one (``nan_to_num`` would make +inf the float32 maximum, which NaNs every weight one step
later). ``reward/nonfinite_frac`` logs the fraction of (completion, reward function) values that were NaN or
+-inf (``None``, TRL's deliberate "does not apply", is not counted). A value of the wrong type (a string, a
list, a tensor with more than one element) is an error naming the reward function and the row.

A non-finite loss or gradient norm stops training before the optimizer step (``NonFiniteError``, naming the
step and the likely cause), so no NaN reaches the weights; with ``skip_nonfinite_steps=True`` the step is
skipped instead (the optimizer sees no gradient, the weights stay as they are) and counted in
``nonfinite/skipped_frac``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from contextlib import contextmanager

import torch

REWARD_METRIC = "reward/nonfinite_frac"
SKIPPED_METRIC = "nonfinite/skipped_frac"

SKIP_HELP = (
    "What to do when the loss or the gradient norm of an optimizer step is not finite (NaN or inf). False: stop "
    "with an error naming the step, before the optimizer writes NaN into the weights. True: skip that step (no "
    "weight changes; counted in nonfinite/skipped_frac) and go on."
)
"""Help text of the ``skip_nonfinite_steps`` config field (GRPOConfig, PPOConfig, DPOConfig)."""


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm that is NaN or inf: training stopped before the optimizer step."""


def checked_rewards(values, expected: int, name: str) -> tuple[list[float | None], int]:
    """One reward function's output, checked: ``(values, nonfinite)`` where ``values`` holds a ``float`` or
    ``None`` (unscorable) per completion and ``nonfinite`` counts the NaN/inf numbers that became ``None``.

    Accepted per completion: ``None``, a real number (``bool`` counts as 0/1; numpy scalars; a one-element
    tensor or array). Raises ``TypeError`` for anything else and ``ValueError`` when there are not ``expected``
    values, both naming the reward function ``name`` and the first offending row.
    """
    try:
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
            raise TypeError
        length = len(values)
    except TypeError:
        raise TypeError(
            f"The reward function {name!r} returned {type(values).__name__}: it must return a list with one "
            f"reward (a number, or None for unscorable) per completion, {expected} here."
        ) from None
    if length != expected:
        raise ValueError(
            f"The reward function {name!r} returned {length} rewards for {expected} completions: it must "
            "return one per completion."
        )
    out, nonfinite = [], 0
    for row, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
            if (value.numel() if isinstance(value, torch.Tensor) else value.size) != 1:
                raise TypeError(
                    f"The reward function {name!r} returned a {type(value).__name__} of shape {tuple(value.shape)} at row "
                    f"{row}: each reward must be one number (or None)."
                )
            value = value.item()
        if not isinstance(value, numbers.Real):
            raise TypeError(
                f"The reward function {name!r} returned {value!r} ({type(value).__name__}) at row {row}: each reward "
                "must be a number, or None for a completion it cannot score."
            )
        value = float(value)
        if math.isfinite(value):
            out.append(value)
        else:
            out.append(None)
            nonfinite += 1
    return out, nonfinite


def nonfinite_to_nan(rewards: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``rewards`` with +-inf replaced by NaN (TRL's "unscorable"), and how many were replaced. A finite
    reward of a reward function can still reach a float32 tensor as inf (e.g. 1e39): this catches it there."""
    infinite = torch.isinf(rewards)
    count = int(infinite.sum())
    return (rewards.masked_fill(infinite, math.nan) if count else rewards), count


class RewardCheck:
    """Wraps reward functions so that their outputs are checked (``checked_rewards``); counts the non-finite
    values of this process. Reward *models* (``torch.nn.Module``) are left as they are."""

    def __init__(self):
        self.nonfinite = 0

    def wrap(self, func: Callable, name: str) -> Callable:
        from ._trl import is_async_callable  # TRL's test for an async reward function: the wrapper keeps its kind

        def check(values, kwargs):
            checked, nonfinite = checked_rewards(values, len(kwargs["prompts"]), name)
            self.nonfinite += nonfinite
            return checked

        if is_async_callable(func):

            @functools.wraps(func)
            async def async_wrapper(*args, **kwargs):
                return check(await func(*args, **kwargs), kwargs)

            return async_wrapper

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            return check(func(*args, **kwargs), kwargs)

        return wrapper


@contextmanager
def checked_reward_funcs(reward_funcs: list, names: list[str]):
    """Within the block, the callables of ``reward_funcs`` (a trainer's list, modified in place and restored)
    check their outputs; yields the ``RewardCheck`` that counts non-finite values."""
    check = RewardCheck()
    originals = list(reward_funcs)
    for i, (func, name) in enumerate(zip(originals, names, strict=True)):
        if not isinstance(func, torch.nn.Module):
            reward_funcs[i] = check.wrap(func, name)
    try:
        yield check
    finally:
        reward_funcs[:] = originals


def nonfinite_step_message(step: int, what: str, value: float, loss_was_finite: bool, can_skip: bool = True) -> str:
    """The error of a non-finite optimizer step: which quantity, at which step, the likely cause, the options."""
    if loss_was_finite:
        cause = (
            "The loss was finite, so the backward pass overflowed: a learning rate or KL coefficient (beta) far too "
            "large, fp16 overflow (use bf16 or fp32), or a loss term with an unbounded gradient."
        )
    else:
        cause = (
            "The loss itself was not finite. Rewards cannot cause it (non-finite rewards are excluded, see "
            "reward/nonfinite_frac): look for a policy that collapsed (learning rate or beta too large; grad_norm "
            "and kl/* in the logs before this step), fp16 overflow (use bf16 or fp32), or NaN in the model's weights "
            "or inputs."
        )
    option = " Set skip_nonfinite_steps=True to skip such steps instead." if can_skip else ""
    return (
        f"Non-finite {what} ({value}) at optimizer step {step + 1} (global_step {step} -> {step + 1}): training "
        f"stopped before the optimizer step, so the weights are those of step {step}. {cause}{option} "
        "(docs/reliability.md#non-finite-values)"
    )


def is_finite(value) -> bool:
    """Whether a Python number or a one-element tensor is finite (None, e.g. no gradient norm, counts as finite)."""
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(float(value))
