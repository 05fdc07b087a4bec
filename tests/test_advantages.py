"""Unit tests for trl_kl.advantages: group normalisation (TRL parity, clip_std eq. 41), GAE, whitening, ESS.

Every expected number is either TRL 1.16's own computation reproduced inline, a closed form, or written
out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from trl.trainer.utils import nanstd

from trl_kl import advantages as adv


def t64(*values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------
# group_normalized_advantages: parity with TRL 1.16 (grpo_trainer, "sum_then_normalize")
# ---------------------------------------------------------------------------------------------------


def trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, the inline advantage computation."""
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        if rewards.numel() > 1:
            std_rewards = nanstd(rewards).expand_as(rewards)
        else:
            std_rewards = torch.zeros_like(rewards)
    else:
        raise ValueError(scale_rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("scale", adv.SCALE_MODES)
@pytest.mark.parametrize("group_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["uniform", "binary", "with_nan"])
def test_matches_trl(kind, group_size, scale):
    g = torch.Generator().manual_seed(100 * group_size + len(kind))
    n = 24
    if kind == "binary":
        rewards = (torch.rand(n, generator=g) < 0.5).float()
    else:
        rewards = torch.rand(n, generator=g) * 3 - 1
    if kind == "with_nan":
        rewards[torch.rand(n, generator=g) < 0.25] = float("nan")
        rewards[0] = float("nan")
    out = adv.group_normalized_advantages(rewards, group_size, scale=scale)
    expected = trl_advantages(rewards, group_size, scale)
    assert out.shape == rewards.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert (out[torch.isnan(rewards)] == 0).all()


def test_trl_parity_is_not_trivial():
    # The random instances above must exercise real normalisation: group != batch != none.
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.7, 2.0, -1.0])
    a = {s: adv.group_normalized_advantages(rewards, 3, scale=s) for s in adv.SCALE_MODES}
    assert not torch.allclose(a["group"], a["batch"])
    assert not torch.allclose(a["group"], a["none"])


# ---------------------------------------------------------------------------------------------------
# clip_std (eq. 41, docs/theory.md#clip-std)
# ---------------------------------------------------------------------------------------------------

PAPER_REWARDS = [0.99999, 1.00001, 0.99999, 1.00001]
BESSEL_STD_PAPER = 2e-5 / math.sqrt(3)  # sqrt(4 * (1e-5)^2 / 3)


def test_paper_example_without_bounds_is_trl():
    r = t64(*PAPER_REWARDS)
    out = adv.group_normalized_advantages(r, 4)
    a = 1e-5 / (BESSEL_STD_PAPER + 1e-4)  # 0.0896...: TRL's 1e-4 epsilon dominates here
    torch.testing.assert_close(out, t64(-a, a, -a, a), rtol=1e-6, atol=0)
    # Not tighter: TRL's nanstd forms Bessel's count / (count - 1) in float32 even for float64 input (~3e-8).
    torch.testing.assert_close(out, trl_advantages(r, 4, "group"), rtol=1e-6, atol=0)


def test_paper_example_plain_std_gives_0866():
    # A non-binding floor leaves the bare Bessel std: the paper's +-0.866 = sqrt(3)/2.
    out = adv.group_normalized_advantages(t64(*PAPER_REWARDS), 4, std_min=1e-12)
    h = math.sqrt(3) / 2
    torch.testing.assert_close(out, t64(-h, h, -h, h), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paper_example_std_min_bounds_amplification(dtype):
    r = torch.tensor(PAPER_REWARDS, dtype=dtype)
    out = adv.group_normalized_advantages(r, 4, std_min=0.1)
    centred = r - r.mean()
    # Exactly centred / 0.1 (no epsilon), hence |A| <= max|r - mean| / std_min.
    torch.testing.assert_close(out, centred / 0.1, rtol=1e-6, atol=0)
    assert out.abs().max() <= centred.abs().max() / 0.1 * (1 + 1e-6)
    if dtype == torch.float64:
        torch.testing.assert_close(out, t64(-1e-4, 1e-4, -1e-4, 1e-4), rtol=1e-6, atol=0)


def test_std_max_caps_divisor():
    r = torch.tensor([0.0, 1.0, 0.0, 1.0])  # Bessel std = sqrt(1/3) = 0.577 > 0.25
    out = adv.group_normalized_advantages(r, 4, std_max=0.25)
    torch.testing.assert_close(out, torch.tensor([-2.0, 2.0, -2.0, 2.0]), rtol=0, atol=1e-6)  # +-0.5 / 0.25
    unbounded = adv.group_normalized_advantages(r, 4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(unbounded, torch.tensor([-a, a, -a, a]), rtol=1e-6, atol=0)


def test_std_max_not_binding_uses_bare_std():
    r = t64(0.0, 0.1, 0.0, 0.1)  # std = sqrt(0.01/3) = 0.0577 < 0.25: divisor is the std, no epsilon
    out = adv.group_normalized_advantages(r, 4, std_max=0.25)
    h = math.sqrt(3) / 2
    torch.testing.assert_close(out, t64(-h, h, -h, h), rtol=1e-12, atol=0)


def test_both_bounds_per_group():
    # Three groups: std below the floor, inside the band, above the cap.
    r = t64(*PAPER_REWARDS, 0.0, 0.5, 0.5, 1.0, 0.0, 1.0, 0.0, 1.0)
    out = adv.group_normalized_advantages(r, 4, std_min=0.1, std_max=0.25)
    mid_std = math.sqrt(0.5 / 3)  # centred [-.5, 0, 0, .5]: sum of squares 0.5, Bessel / 3
    assert 0.1 < mid_std < 0.5
    out2 = adv.group_normalized_advantages(r, 4, std_min=0.1, std_max=0.5)
    torch.testing.assert_close(out[:4], t64(-1e-4, 1e-4, -1e-4, 1e-4), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[4:8], t64(-0.5, 0, 0, 0.5) / 0.25, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out2[4:8], t64(-0.5, 0, 0, 0.5) / mid_std, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out[8:], t64(-2.0, 2.0, -2.0, 2.0), rtol=1e-12, atol=0)


def test_std_min_equals_std_max_divides_by_constant():
    r = t64(0.0, 0.3, 1.0, 0.7, 5.0, 2.0)
    out = adv.group_normalized_advantages(r, 3, std_min=0.5, std_max=0.5)
    expected = torch.cat([t64(0.0, 0.3, 1.0) - 1.3 / 3, t64(0.7, 5.0, 2.0) - 7.7 / 3]) / 0.5
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-15)


def test_batch_scale_with_bounds_uses_batch_std():
    r = t64(0.0, 1.0, 0.0, 1.0, 0.0, 0.2, 0.0, 0.2)
    batch_std = float(r.std())  # Bessel over the whole batch, centring stays per group
    assert batch_std > 0.1
    out = adv.group_normalized_advantages(r, 4, scale="batch", std_min=0.1)
    expected = t64(-0.5, 0.5, -0.5, 0.5, -0.1, 0.1, -0.1, 0.1) / batch_std
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-15)
    capped = adv.group_normalized_advantages(r, 4, scale="batch", std_max=0.1)
    torch.testing.assert_close(capped, t64(-0.5, 0.5, -0.5, 0.5, -0.1, 0.1, -0.1, 0.1) / 0.1, rtol=1e-12, atol=1e-15)


def test_scale_none_ignores_bounds():
    r = t64(0.0, 1.0, 0.0, 1.0)
    out = adv.group_normalized_advantages(r, 4, scale="none", std_min=0.1, std_max=0.25)
    torch.testing.assert_close(out, t64(-0.5, 0.5, -0.5, 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("bounds", [{}, {"std_min": 0.1}, {"std_max": 0.25}, {"std_min": 0.1, "std_max": 0.25}])
@pytest.mark.parametrize("scale", adv.SCALE_MODES)
@pytest.mark.parametrize(
    "value, dtype",
    [(0.1, torch.float32), (0.3, torch.float32), (1.0, torch.float32), (0.1, torch.float64)],
)
def test_constant_group_is_exactly_zero(value, dtype, scale, bounds):
    # 0.3 repeated 6 times in float32 has a mean 3e-8 away from its members and a "std" of 3.3e-8:
    # with std_max alone that rounding noise would become an advantage of 0.91.
    varying = torch.tensor([0.0, 1.0, 0.2, 0.9, 0.4, 0.4], dtype=dtype)
    r = torch.cat([torch.full((6,), value, dtype=dtype), varying])
    out = adv.group_normalized_advantages(r, 6, scale=scale, **bounds)
    assert (out[:6] == 0).all(), out[:6]
    assert (out[6:] != 0).any()


def test_constant_group_with_nan_is_zero():
    r = torch.tensor([0.3, float("nan"), 0.3, 0.3, 0.0, 1.0, 0.0, 1.0])
    out = adv.group_normalized_advantages(r, 4, std_max=0.25)
    assert (out[:4] == 0).all()
    torch.testing.assert_close(out[4:], torch.tensor([-2.0, 2.0, -2.0, 2.0]), rtol=0, atol=1e-6)


def test_nan_excluded_from_mean_and_std():
    # Group [1, nan, 3, 5]: mean 3, Bessel std sqrt((4 + 0 + 4) / 2) = 2; the NaN gets 0.
    r = t64(1.0, float("nan"), 3.0, 5.0)
    torch.testing.assert_close(adv.group_normalized_advantages(r, 4, std_min=0.1), t64(-1.0, 0.0, 0.0, 1.0),
                               rtol=1e-12, atol=0)
    a = 2.0 / (2.0 + 1e-4)
    torch.testing.assert_close(adv.group_normalized_advantages(r, 4), t64(-a, 0.0, 0.0, a), rtol=1e-12, atol=0)
    torch.testing.assert_close(adv.group_normalized_advantages(r, 4, scale="none"), t64(-2.0, 0.0, 0.0, 2.0),
                               rtol=0, atol=0)


@pytest.mark.parametrize("bounds", [{}, {"std_min": 0.1}, {"std_max": 0.25}])
def test_all_nan_or_single_value_groups_are_zero(bounds):
    nan = float("nan")
    r = t64(nan, nan, nan, nan, nan, 2.0, nan, nan, 0.0, 1.0, 0.0, 1.0)
    out = adv.group_normalized_advantages(r, 4, **bounds)
    assert torch.isfinite(out).all()
    assert (out[:8] == 0).all()
    assert (out[8:] != 0).all()


# ---------------------------------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"std_min": 0.5, "std_max": 0.1}, r"clip_std_min \(0.5\) must be <= clip_std_max \(0.1\)"),
        ({"std_min": 0.0}, "clip_std_min must be > 0"),
        ({"std_min": -0.1}, "clip_std_min must be > 0"),
        ({"std_min": float("nan")}, "clip_std_min must be > 0"),
        ({"std_max": 0.0}, "clip_std_max must be > 0"),
        ({"group_size": 4}, r"group_size \(4\) must divide the number of rewards \(6\)"),
        ({"group_size": 0}, r"group_size \(0\) must divide"),
        ({"scale": "global"}, "scale must be one of"),
    ],
)
def test_validation_errors(kwargs, match):
    call = {"group_size": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        adv.group_normalized_advantages(torch.rand(6), **call)


def test_validate_std_bounds_direct():
    adv.validate_std_bounds(None, None)
    adv.validate_std_bounds(0.1, 0.1)
    adv.validate_std_bounds(0.1, None)
    adv.validate_std_bounds(None, 2.0)
    with pytest.raises(ValueError, match="must be <="):
        adv.validate_std_bounds(0.2, 0.1)


def test_rewards_must_be_1d():
    with pytest.raises(ValueError, match=r"rewards must be 1-D \(B,\), got shape \(2, 3\)"):
        adv.group_normalized_advantages(torch.rand(2, 3), 3)


def test_bad_scale_lists_valid_values():
    with pytest.raises(ValueError) as exc:
        adv.group_normalized_advantages(torch.rand(4), 2, scale="Group")
    assert all(repr(s) in str(exc.value) for s in adv.SCALE_MODES)


# ---------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------

R3 = [[1.0, 0.0, 2.0]]
V3 = [[0.5, 1.0, 1.5]]


def test_gae_gamma1_lam1_is_return_to_go_minus_value():
    rewards, values, mask = t64(*R3[0])[None], t64(*V3[0])[None], torch.ones(1, 3)
    advantages, returns = adv.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # Returns-to-go [1+0+2, 0+2, 2] = [3, 2, 2]; minus values [0.5, 1, 1.5].
    torch.testing.assert_close(advantages, t64(2.5, 1.0, 0.5)[None], rtol=0, atol=1e-15)
    torch.testing.assert_close(returns, t64(3.0, 2.0, 2.0)[None], rtol=0, atol=1e-15)


def test_gae_gamma09_lam05_by_hand():
    rewards, values, mask = t64(*R3[0])[None], t64(*V3[0])[None], torch.ones(1, 3)
    advantages, returns = adv.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # gamma * lam = 0.45; the token after the last is terminal (V = 0).
    # t=2: delta = 2 + 0.9*0   - 1.5 = 0.5;  A_2 = 0.5
    # t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35; A_1 = 0.35 + 0.45*0.5   = 0.575
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4;  A_0 = 1.4  + 0.45*0.575 = 1.65875
    torch.testing.assert_close(advantages, t64(1.65875, 0.575, 0.5)[None], rtol=0, atol=1e-14)
    torch.testing.assert_close(returns, t64(2.15875, 1.575, 2.0)[None], rtol=0, atol=1e-14)


def test_gae_right_padded_batch():
    # Row 0: the 3-token example, right-padded with garbage rewards/values; row 1: 5 real tokens.
    rewards = t64(1.0, 0.0, 2.0, 7.0, 7.0, 0.0, 0.0, 0.0, 0.0, 1.0).view(2, 5)
    values = t64(0.5, 1.0, 1.5, 9.0, 9.0, 0.1, 0.2, 0.3, 0.4, 0.5).view(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    advantages, returns = adv.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # Row 1 by hand (gamma * lam = 0.45):
    # t=4: delta = 1 - 0.5             = 0.5;  A = 0.5
    # t=3: delta = 0.9*0.5 - 0.4       = 0.05; A = 0.05 + 0.45*0.5       = 0.275
    # t=2: delta = 0.9*0.4 - 0.3       = 0.06; A = 0.06 + 0.45*0.275     = 0.18375
    # t=1: delta = 0.9*0.3 - 0.2       = 0.07; A = 0.07 + 0.45*0.18375   = 0.1526875
    # t=0: delta = 0.9*0.2 - 0.1       = 0.08; A = 0.08 + 0.45*0.1526875 = 0.148709375
    expected_adv = t64(1.65875, 0.575, 0.5, 0.0, 0.0, 0.148709375, 0.1526875, 0.18375, 0.275, 0.5).view(2, 5)
    expected_ret = t64(2.15875, 1.575, 2.0, 0.0, 0.0, 0.248709375, 0.3526875, 0.48375, 0.675, 1.0).view(2, 5)
    torch.testing.assert_close(advantages, expected_adv, rtol=0, atol=1e-14)
    torch.testing.assert_close(returns, expected_ret, rtol=0, atol=1e-14)


def test_gae_mid_sequence_masked_token_is_skipped():
    """A masked-out token inside a sequence (e.g. a tool output) is passed through: the result on the real
    tokens equals GAE on the sequence with that token removed, and the masked position is zero."""
    rewards = t64(1.0, 5.0, 0.0, 2.0)[None]
    values = t64(0.5, 8.0, 1.0, 1.5)[None]
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    advantages, returns = adv.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # Same numbers as the 3-token example R3/V3 (see test_gae_gamma09_lam05_by_hand), a zero inserted.
    torch.testing.assert_close(advantages, t64(1.65875, 0.0, 0.575, 0.5)[None], rtol=0, atol=1e-14)
    torch.testing.assert_close(returns, t64(2.15875, 0.0, 1.575, 2.0)[None], rtol=0, atol=1e-14)


def test_gae_lam0_is_one_step_td():
    rewards, values, mask = t64(*R3[0])[None], t64(*V3[0])[None], torch.ones(1, 3)
    advantages, returns = adv.gae(rewards, values, mask, gamma=0.9, lam=0.0)
    # delta_t = r_t + 0.9 V_{t+1} - V_t: [1 + 0.9 - 0.5, 0 + 1.35 - 1, 2 + 0 - 1.5]
    torch.testing.assert_close(advantages, t64(1.4, 0.35, 0.5)[None], rtol=0, atol=1e-14)
    torch.testing.assert_close(returns, t64(1.9, 1.35, 2.0)[None], rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------------
# masked_whiten
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def whiten_inputs():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3 + 2
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    x[mask == 0] = 1e6  # far-off padded values must not matter
    return x, mask


def test_masked_whiten(whiten_inputs):
    x, mask = whiten_inputs
    out = adv.masked_whiten(x, mask)
    sel = x[mask.bool()]
    expected = (sel - sel.mean()) / torch.sqrt(sel.var(unbiased=False) + 1e-8)
    torch.testing.assert_close(out[mask.bool()], expected, rtol=1e-12, atol=1e-12)
    w = out[mask.bool()]
    assert abs(w.mean().item()) < 1e-12
    assert w.var(unbiased=False).item() == pytest.approx(1.0, rel=1e-8)
    assert (out[mask == 0] == 0).all()


@pytest.mark.parametrize("fn", ["gae", "masked_whiten"])
def test_padded_non_finite_values_do_not_leak(fn):
    x = t64(1.0, 0.0, 2.0, float("nan"), float("inf")).view(1, 5)
    clean = t64(1.0, 0.0, 2.0, 0.0, 0.0).view(1, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    if fn == "gae":
        values = t64(0.5, 1.0, 1.5, 0.0, 0.0).view(1, 5)
        torch.testing.assert_close(adv.gae(x, values, mask, 0.9, 0.5), adv.gae(clean, values, mask, 0.9, 0.5))
    else:
        torch.testing.assert_close(adv.masked_whiten(x, mask), adv.masked_whiten(clean, mask))


# ---------------------------------------------------------------------------------------------------
# effective_sample_size
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 64])
def test_ess_equal_weights_is_one(n):
    out = adv.effective_sample_size(torch.full((n,), 0.7))
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(1.0, abs=1e-6)


def test_ess_one_dominant_weight():
    assert adv.effective_sample_size(torch.tensor([0.0, 0.0, 100.0])).item() == pytest.approx(1 / 3, abs=1e-7)


def test_ess_closed_form():
    # w = [1, 2, 3]: (sum w)^2 / (n sum w^2) = 36 / (3 * 14) = 6/7.
    out = adv.effective_sample_size(torch.log(t64(1.0, 2.0, 3.0)))
    assert out.dtype == torch.float64
    assert out.item() == pytest.approx(36 / 42, rel=1e-14)


def test_ess_random_matches_direct_formula():
    g = torch.Generator().manual_seed(9)
    lw = torch.randn(3, 7, generator=g, dtype=torch.float64)  # any shape: flattened
    w = lw.exp().reshape(-1)
    assert adv.effective_sample_size(lw).item() == pytest.approx((w.sum() ** 2 / (w.numel() * (w**2).sum())).item(),
                                                                 rel=1e-12)


def test_ess_extreme_log_weights_finite():
    out = adv.effective_sample_size(torch.tensor([1e3, -1e3, 0.0]))
    assert torch.isfinite(out)
    assert out.item() == pytest.approx(1 / 3, abs=1e-7)
    assert adv.effective_sample_size(torch.tensor([1e3, 1e3])).item() == pytest.approx(1.0, abs=1e-6)
    assert adv.effective_sample_size(torch.tensor([-1e3, -1e3, -1e3])).item() == pytest.approx(1.0, abs=1e-6)
    bf = adv.effective_sample_size(torch.tensor([1e3, -1e3, 0.0], dtype=torch.bfloat16))
    assert bf.dtype == torch.bfloat16 and torch.isfinite(bf)


def test_ess_empty_is_one():
    assert adv.effective_sample_size(torch.empty(0)).item() == 1.0
