"""Unit tests for trl_kl.kl: estimator values, gradients, numerics, placements and the soundness table.

Every expected number is a closed form (docs/theory.md#estimators, #placement, #sequence-kl) or written out by hand; nothing checks only
that a call "ran".
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from trl_kl import kl

SAMPLED = ("k1", "k2", "k3", "k3_clip")  # the estimators `estimate` accepts (not "full")
REWARD_OK = ("k1", "k2", "k3", "k3_clip")  # the estimators `reward_penalty` accepts


def t64(*values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------
# Values on hand-computed pairs
# ---------------------------------------------------------------------------------------------------

# pi = 0.2, pi_ref = 0.5: r = pi_ref / pi = 2.5 (pi << pi_ref side); and the mirrored pair, r = 0.4.
P, Q = 0.2, 0.5


def test_k1_value():
    out = kl.k1(t64(math.log(P), math.log(Q)), t64(math.log(Q), math.log(P)))
    torch.testing.assert_close(out, t64(math.log(P / Q), math.log(Q / P)), rtol=0, atol=1e-14)


def test_k2_value():
    out = kl.k2(t64(math.log(P), math.log(Q)), t64(math.log(Q), math.log(P)))
    expected = 0.5 * math.log(Q / P) ** 2  # symmetric in the pair
    torch.testing.assert_close(out, t64(expected, expected), rtol=0, atol=1e-14)


def test_k3_value():
    out = kl.k3(t64(math.log(P), math.log(Q)), t64(math.log(Q), math.log(P)))
    expected = t64(Q / P - 1 - math.log(Q / P), P / Q - 1 - math.log(P / Q))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    assert out[0].item() == pytest.approx(0.5837092681258449, abs=1e-14)  # 2.5 - 1 - log 2.5


def test_k3_clip_value():
    logps, ref = t64(math.log(P), math.log(Q)), t64(math.log(Q), math.log(P))
    # r = 2.5 is clipped at 2; r = 0.4 is below the clip and matches k3.
    out = kl.k3_clip(logps, ref, max_ratio=2.0)
    expected = t64(2.0 - 1 - math.log(2.5), 0.4 - 1 - math.log(0.4))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    # The default clip (10) does not bind at r = 2.5: equal to k3.
    assert kl.DEFAULT_K3_CLIP_MAX == 10.0
    torch.testing.assert_close(kl.k3_clip(logps, ref), kl.k3(logps, ref), rtol=0, atol=1e-14)
    # r = 20 > 10: min(r, 10) - 1 - log 20.
    out20 = kl.k3_clip(t64(math.log(0.025)), t64(math.log(0.5)))
    torch.testing.assert_close(out20, t64(10 - 1 - math.log(20)), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "name, fn",
    [("k1", kl.k1), ("k2", kl.k2), ("k3", kl.k3), ("k3_clip", lambda a, b: kl.k3_clip(a, b, 2.0))],
)
def test_estimate_dispatches(name, fn):
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 4
    torch.testing.assert_close(kl.estimate(name, logps, ref, k3_clip_max=2.0), fn(logps, ref), rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["full", "k4", "K1", ""])
def test_estimate_unknown_raises(bad):
    with pytest.raises(ValueError, match="k1, k2, k3, k3_clip"):
        kl.estimate(bad, torch.zeros(2), torch.zeros(2))


def test_log_ratio_convention():
    # log r = log pi_ref - log pi; clamped form is clipped at +-LOG_RATIO_BOUND.
    logps, ref = t64(-3.0, -60.0, 0.0), t64(-1.0, 0.0, -60.0)
    torch.testing.assert_close(kl.log_ratio(logps, ref), t64(2.0, 60.0, -60.0), rtol=0, atol=0)
    torch.testing.assert_close(kl.clamped_log_ratio(logps, ref), t64(2.0, 20.0, -20.0), rtol=0, atol=0)
    assert kl.LOG_RATIO_BOUND == 20.0


# ---------------------------------------------------------------------------------------------------
# Gradients against the closed forms (docs/theory.md#estimators)
# ---------------------------------------------------------------------------------------------------


def _grad(fn, logps, ref):
    logps = logps.clone().requires_grad_(True)
    fn(logps, ref).sum().backward()
    return logps.grad


@pytest.fixture
def grad_pairs():
    # log-ratios in (-3, 3): far from every clamp.
    g = torch.Generator().manual_seed(1)
    logps = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    return logps, ref


def test_grad_k1_is_one(grad_pairs):
    logps, ref = grad_pairs
    torch.testing.assert_close(_grad(kl.k1, logps, ref), torch.ones_like(logps), rtol=0, atol=1e-14)


def test_grad_k2_is_log_ratio(grad_pairs):
    logps, ref = grad_pairs
    torch.testing.assert_close(_grad(kl.k2, logps, ref), logps - ref, rtol=0, atol=1e-14)


def test_grad_k3_is_one_minus_r(grad_pairs):
    logps, ref = grad_pairs
    r = torch.exp(ref - logps)
    torch.testing.assert_close(_grad(kl.k3, logps, ref), 1 - r, rtol=1e-12, atol=1e-12)


def test_grad_k3_clip():
    # The gradient coefficient is k3's, 1 - r, with r clamped: r = 2.5 above the clip (2) gives 1 - 2 = -1
    # (not the +1 of the clamped value's literal derivative); r = 0.4 below gives 1 - 0.4.
    logps, ref = t64(math.log(P), math.log(Q)), t64(math.log(Q), math.log(P))
    grad = _grad(lambda a, b: kl.k3_clip(a, b, 2.0), logps, ref)
    torch.testing.assert_close(grad, t64(1 - 2.0, 1 - 0.4), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grad_k3_beyond_the_exp_clamp_keeps_its_sign(dtype):
    """Beyond the +-LOG_RATIO_BOUND clamp k3's gradient is (1 - r_c) grad log pi with r_c = exp(clamp(log r)),
    as k3_clip's is at its clamp. At log pi - log pi_ref = -30 (pi << pi_ref, log r = 30) that is 1 - e^20:
    push the under-weighted token *up*. (The literal derivative of the clamped value is +1 there.) At +30
    (log r = -30) it is 1 - e^-20. The value keeps its exact linear term."""
    logps = torch.tensor([-30.0, 0.0, -1.0], dtype=dtype)
    ref = torch.tensor([0.0, -30.0, -1.5], dtype=dtype)  # log r = 30, -30, -0.5 (inside the clamp)
    grad = _grad(kl.k3, logps, ref)
    expected = torch.tensor([-math.expm1(20.0), -math.expm1(-20.0), -math.expm1(-0.5)], dtype=torch.float64)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)
    assert grad[0] < -1e8  # the sign the true coefficient 1 - e^30 has
    value = kl.k3(logps, ref).double()
    torch.testing.assert_close(value, torch.tensor([math.expm1(20.0) - 30.0, math.expm1(-20.0) + 30.0,
                                                    math.expm1(-0.5) + 0.5], dtype=torch.float64),
                               rtol=1e-6 if dtype == torch.float32 else 1e-15, atol=0)
    # In every placement the same coefficient: the loss's gradient equals the eq. 35 reward penalty (k3 moved into
    # the reward, clamped the same way), so no form of k3 flips sign beyond the clamp.
    penalty = kl.reward_penalty("k3", logps, ref).double()
    torch.testing.assert_close(_grad(lambda a, b: kl.kl_loss("k3", a, b), logps, ref).double(), penalty,
                               rtol=1e-6, atol=0)
    # With the importance ratio carrying its gradient (use_bias_correction_kl): grad(rho k3) = rho (k3 + 1 - r_c)
    # grad log pi = -log r grad log pi at rho = 1, k1's coefficient, beyond the clamp too (float64: the two
    # e^20 terms cancel).
    if dtype == torch.float64:
        lp = logps.clone().requires_grad_(True)
        kl.kl_loss("k3", lp, ref, importance_ratio=torch.exp(lp - lp.detach())).sum().backward()
        torch.testing.assert_close(lp.grad, logps - ref, rtol=0, atol=1e-6)


def _on_policy_loss_grad(estimator, theta, ref_logp):
    """E_{a ~ pi}[grad_theta k(a)] exactly: sum over the vocabulary with pi(a) detached (the expectation of
    the 'KL as a loss' gradient when tokens are sampled from the current policy)."""
    theta = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    k = kl.estimate(estimator, logp, ref_logp)
    (logp.exp().detach() * k).sum().backward()
    return theta.grad


def test_loss_gradients_match_notes_table():
    """The estimators table's last column (docs/theory.md#estimators), exactly on a tabular policy: E[grad k1] = 0, E[grad k2] = grad KL(pi||ref),
    E[grad k3] = grad KL(ref||pi)."""
    g = torch.Generator().manual_seed(2)
    theta = torch.randn(6, generator=g, dtype=torch.float64)
    ref_logp = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)

    def grad_of(f):
        th = theta.clone().requires_grad_(True)
        f(torch.log_softmax(th, -1)).backward()
        return th.grad

    grad_kl_pi_ref = grad_of(lambda lp: (lp.exp() * (lp - ref_logp)).sum())  # of KL(pi || pi_ref)
    grad_kl_ref_pi = grad_of(lambda lp: (ref_logp.exp() * (ref_logp - lp)).sum())  # of KL(pi_ref || pi)
    torch.testing.assert_close(_on_policy_loss_grad("k1", theta, ref_logp), torch.zeros(6, dtype=torch.float64),
                               rtol=0, atol=1e-14)
    torch.testing.assert_close(_on_policy_loss_grad("k2", theta, ref_logp), grad_kl_pi_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_on_policy_loss_grad("k3", theta, ref_logp), grad_kl_ref_pi, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(grad_kl_pi_ref, grad_kl_ref_pi, atol=1e-3)  # the instance separates the two


# ---------------------------------------------------------------------------------------------------
# Unbiasedness on an exact discrete distribution
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def discrete():
    g = torch.Generator().manual_seed(3)
    pi = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64), -1)
    pi_ref = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64), -1)
    true_kl = torch.distributions.kl_divergence(
        torch.distributions.Categorical(probs=pi), torch.distributions.Categorical(probs=pi_ref)
    )
    return pi, pi_ref, true_kl


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_unbiased_estimators(discrete, estimator):
    pi, pi_ref, true_kl = discrete
    expectation = (pi * kl.estimate(estimator, pi.log(), pi_ref.log())).sum()
    torch.testing.assert_close(expectation, true_kl, rtol=1e-12, atol=1e-14)


def test_k2_is_biased(discrete):
    pi, pi_ref, true_kl = discrete
    expectation = (pi * kl.k2(pi.log(), pi_ref.log())).sum()
    assert abs(expectation.item() - true_kl.item()) > 1e-3


def test_k3_clip_biased_down_when_clip_binds(discrete):
    pi, pi_ref, true_kl = discrete
    r = pi_ref / pi
    # A clip above every ratio changes nothing; one below some ratio strictly lowers the expectation.
    high = (pi * kl.k3_clip(pi.log(), pi_ref.log(), max_ratio=float(r.max()) * 2)).sum()
    torch.testing.assert_close(high, true_kl, rtol=1e-12, atol=1e-14)
    cap = float(r.median())
    low = (pi * kl.k3_clip(pi.log(), pi_ref.log(), max_ratio=cap)).sum()
    expected_gap = (pi * (r - r.clamp(max=cap))).sum()
    torch.testing.assert_close(true_kl - low, expected_gap, rtol=1e-12, atol=1e-14)
    assert expected_gap > 0


def test_full_kl_matches_closed_form(discrete):
    pi, pi_ref, true_kl = discrete
    # Shift the logits by per-row constants: log_softmax must remove them.
    logits = (pi.log() + 3.0).expand(2, 3, -1)
    ref_logits = (pi_ref.log() - 1.5).expand(2, 3, -1)
    out = kl.full_kl(logits, ref_logits)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, true_kl.expand(2, 3), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------
# Numerics: extreme log-ratios, the exp clamp, dtypes
# ---------------------------------------------------------------------------------------------------

EXTREME_LOGPS = torch.tensor([[-50.0, 0.0, -1e4, 0.0, -50.0]])
EXTREME_REF = torch.tensor([[0.0, -50.0, 0.0, -1e4, -50.0]])  # log r = 50, -50, 1e4, -1e4, 0


def _leaf(x, dtype):
    return x.detach().clone().to(dtype).requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", SAMPLED)
def test_estimators_finite_on_extreme_log_ratios(estimator, dtype):
    logps = _leaf(EXTREME_LOGPS, dtype)
    out = kl.estimate(estimator, logps, EXTREME_REF.to(dtype))
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all(), out
    out.sum().backward()
    assert torch.isfinite(logps.grad.float()).all(), logps.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", REWARD_OK)
def test_reward_penalty_finite_on_extreme_log_ratios(estimator, dtype):
    out = kl.reward_penalty(estimator, EXTREME_LOGPS.to(dtype), EXTREME_REF.to(dtype))
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all(), out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_ratio", [False, True])
@pytest.mark.parametrize("estimator", SAMPLED)
def test_kl_loss_finite_on_extreme_log_ratios(estimator, with_ratio, dtype):
    logps = _leaf(EXTREME_LOGPS, dtype)
    ratio = torch.exp(logps.float() - (logps.detach().float() + 0.1)) if with_ratio else None
    out = kl.kl_loss(estimator, logps, EXTREME_REF.to(dtype), importance_ratio=ratio)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all(), out
    out.sum().backward()
    assert torch.isfinite(logps.grad.float()).all(), logps.grad


def test_k3_exponent_clamped_exact_value():
    # log r = 50: exp sees 20, the linear term stays exact: expm1(20) - 50. log r = -50: expm1(-20) + 50.
    logps, ref = torch.tensor([-50.0, 0.0]), torch.tensor([0.0, -50.0])
    out = kl.k3(logps, ref)
    expected = torch.tensor([math.expm1(kl.LOG_RATIO_BOUND) - 50.0, math.expm1(-kl.LOG_RATIO_BOUND) + 50.0])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    # In float64 the check is tight.
    out64 = kl.k3(logps.double(), ref.double())
    torch.testing.assert_close(out64, t64(math.expm1(20) - 50, math.expm1(-20) + 50), rtol=1e-15, atol=0)


def test_k1_k2_never_clamped():
    # k1 and k2 are polynomial in log r: exact at log r = +-50 and +-1e4 (no LOG_RATIO_BOUND clamp).
    lr = EXTREME_REF - EXTREME_LOGPS
    torch.testing.assert_close(lr, torch.tensor([[50.0, -50.0, 1e4, -1e4, 0.0]]), rtol=0, atol=0)
    torch.testing.assert_close(kl.k1(EXTREME_LOGPS, EXTREME_REF), -lr, rtol=0, atol=0)
    torch.testing.assert_close(kl.k2(EXTREME_LOGPS, EXTREME_REF), torch.tensor([[1250.0, 1250.0, 5e7, 5e7, 0.0]]),
                               rtol=0, atol=0)
    torch.testing.assert_close(kl.reward_penalty("k2", EXTREME_LOGPS, EXTREME_REF),
                               torch.tensor([[1250.0, 1250.0, 5e7, 5e7, 0.0]]), rtol=0, atol=0)
    # Their gradients stay exact too: 1 and (logp - ref).
    logps = _leaf(EXTREME_LOGPS, torch.float32)
    kl.k2(logps, EXTREME_REF).sum().backward()
    torch.testing.assert_close(logps.grad, -lr, rtol=0, atol=0)


def test_k3_clip_exponent_stays_bounded_for_large_clip():
    """k3_clip with a clip above e^LOG_RATIO_BOUND (e.g. inf, 'no clip') must still only exponentiate
    log-ratios within +-LOG_RATIO_BOUND (module docstring), like k3 and reward_penalty('k3_clip')."""
    logps, ref = torch.tensor([-1e4, -50.0]), torch.tensor([0.0, 0.0])
    out = kl.k3_clip(logps, ref, max_ratio=float("inf"))
    torch.testing.assert_close(out, kl.k3(logps, ref))
    assert torch.isfinite(out).all()


def test_float64_kept():
    a, b = t64(-1.0), t64(-2.0)
    for estimator in SAMPLED:
        assert kl.estimate(estimator, a, b).dtype == torch.float64
        assert kl.reward_penalty(estimator, a, b).dtype == torch.float64


def test_bf16_values_match_float32():
    # bf16 log-probs are upcast before anything else: same result as upcasting by hand.
    logps = torch.tensor([-0.5, -3.0, -7.25], dtype=torch.bfloat16)
    ref = torch.tensor([-2.0, -1.0, -7.0], dtype=torch.bfloat16)
    for estimator in SAMPLED:
        torch.testing.assert_close(
            kl.estimate(estimator, logps, ref), kl.estimate(estimator, logps.float(), ref.float()), rtol=0, atol=0
        )


# ---------------------------------------------------------------------------------------------------
# reward_penalty (KL in the reward)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def old_ref():
    old = t64(math.log(P), math.log(Q), math.log(0.025), -1.0)
    ref = t64(math.log(Q), math.log(P), math.log(0.5), -1.0)  # r = 2.5, 0.4, 20, 1
    return old, ref


def test_reward_penalty_k1(old_ref):
    old, ref = old_ref
    torch.testing.assert_close(kl.reward_penalty("k1", old, ref), old - ref, rtol=0, atol=1e-15)


def test_reward_penalty_k3_eq35(old_ref):
    old, ref = old_ref
    torch.testing.assert_close(kl.reward_penalty("k3", old, ref), t64(1 - 2.5, 1 - 0.4, 1 - 20, 0.0),
                               rtol=1e-12, atol=1e-12)


def test_reward_penalty_k3_clip(old_ref):
    old, ref = old_ref
    torch.testing.assert_close(kl.reward_penalty("k3_clip", old, ref, k3_clip_max=2.0),
                               t64(1 - 2.0, 1 - 0.4, 1 - 2.0, 0.0), rtol=1e-12, atol=1e-12)
    # Default clip 10: r = 20 is capped, the rest are not.
    torch.testing.assert_close(kl.reward_penalty("k3_clip", old, ref), t64(1 - 2.5, 1 - 0.4, 1 - 10.0, 0.0),
                               rtol=1e-12, atol=1e-12)


def test_reward_penalty_k2_is_value(old_ref):
    old, ref = old_ref
    torch.testing.assert_close(kl.reward_penalty("k2", old, ref), 0.5 * (old - ref) ** 2, rtol=0, atol=1e-15)


def test_reward_penalty_k3_clamped_exponent():
    # log r = 50: the penalty is 1 - e^20 exactly, not -inf.
    out = kl.reward_penalty("k3", torch.tensor([-50.0, 0.0]), torch.tensor([0.0, -50.0]))
    torch.testing.assert_close(out, torch.tensor([-math.expm1(20.0), -math.expm1(-20.0)]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("estimator", REWARD_OK)
def test_reward_penalty_detached(estimator):
    old = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-2.0, -0.5], requires_grad=True)
    out = kl.reward_penalty(estimator, old, ref)
    assert not out.requires_grad
    assert out.grad_fn is None


@pytest.mark.parametrize("bad", ["full", "k4"])
def test_reward_penalty_rejects(bad):
    with pytest.raises(ValueError, match="cannot go in the reward"):
        kl.reward_penalty(bad, torch.zeros(2), torch.zeros(2))


# ---------------------------------------------------------------------------------------------------
# Scopes: return_to_go, sequence_sum, scoped_penalty, kl_shaped_advantages (docs/theory.md#sequence-kl)
# ---------------------------------------------------------------------------------------------------

# B = 2, T = 4; row 1 is right-padded (two completion tokens).
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
RTG = torch.tensor([[10.0, 9.0, 7.0, 4.0], [11.0, 6.0, 0.0, 0.0]])
SEQ = torch.tensor([10.0, 11.0])


@pytest.mark.parametrize("mask", [MASK, MASK.bool()], ids=["float", "bool"])
def test_return_to_go(mask):
    torch.testing.assert_close(kl.return_to_go(PER_TOKEN, mask), RTG, rtol=0, atol=0)


@pytest.mark.parametrize("mask", [MASK, MASK.bool()], ids=["float", "bool"])
def test_sequence_sum(mask):
    torch.testing.assert_close(kl.sequence_sum(PER_TOKEN, mask), SEQ, rtol=0, atol=0)


def test_scoped_penalty_each_scope():
    torch.testing.assert_close(kl.scoped_penalty(PER_TOKEN, MASK, "token"),
                               torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]]), rtol=0, atol=0)
    torch.testing.assert_close(kl.scoped_penalty(PER_TOKEN, MASK, "return_to_go"), RTG, rtol=0, atol=0)
    torch.testing.assert_close(kl.scoped_penalty(PER_TOKEN, MASK, "sequence"),
                               torch.tensor([[10.0, 10.0, 10.0, 10.0], [11.0, 11.0, 0.0, 0.0]]), rtol=0, atol=0)


def test_scoped_penalty_bad_scope():
    with pytest.raises(ValueError, match="kl_reward_scope must be one of"):
        kl.scoped_penalty(PER_TOKEN, MASK, "episode")


@pytest.mark.parametrize("scope", kl.REWARD_SCOPES)
def test_scoped_penalty_ignores_padded_values(scope):
    """What sits on padded positions must not change any real token's penalty (e.g. a -inf log-prob on a
    pad token, or NaN sampling log-probs, which TRL maps from vLLM's None)."""
    dirty = PER_TOKEN.clone()
    dirty[1, 2], dirty[1, 3] = float("inf"), float("nan")
    torch.testing.assert_close(kl.scoped_penalty(dirty, MASK, scope), kl.scoped_penalty(PER_TOKEN, MASK, scope))


BETA = 0.1
ADV_B = torch.tensor([1.0, -2.0])
ADV_BT = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -0.5, 9.0, 9.0]])

# A - beta * carried penalty, written out by hand (penalty PER_TOKEN, mask MASK, beta = 0.1).
SHAPED = {
    ("B", "token"): [[1 - 0.1, 1 - 0.2, 1 - 0.3, 1 - 0.4], [-2 - 0.5, -2 - 0.6, -2.0, -2.0]],
    ("B", "return_to_go"): [[1 - 1.0, 1 - 0.9, 1 - 0.7, 1 - 0.4], [-2 - 1.1, -2 - 0.6, -2.0, -2.0]],
    ("B", "sequence"): [[1 - 1.0, 1 - 1.0, 1 - 1.0, 1 - 1.0], [-2 - 1.1, -2 - 1.1, -2.0, -2.0]],
    ("BT", "token"): [[1 - 0.1, 2 - 0.2, 3 - 0.3, 4 - 0.4], [0.5 - 0.5, -0.5 - 0.6, 9.0, 9.0]],
    ("BT", "return_to_go"): [[1 - 1.0, 2 - 0.9, 3 - 0.7, 4 - 0.4], [0.5 - 1.1, -0.5 - 0.6, 9.0, 9.0]],
    ("BT", "sequence"): [[1 - 1.0, 2 - 1.0, 3 - 1.0, 4 - 1.0], [0.5 - 1.1, -0.5 - 1.1, 9.0, 9.0]],
}


@pytest.mark.parametrize("scope", kl.REWARD_SCOPES)
@pytest.mark.parametrize("adv_shape", ["B", "BT"])
def test_kl_shaped_advantages(adv_shape, scope):
    advantages = ADV_B if adv_shape == "B" else ADV_BT
    out = kl.kl_shaped_advantages(advantages, PER_TOKEN, MASK, BETA, scope)
    assert out.shape == (2, 4)
    torch.testing.assert_close(out, torch.tensor(SHAPED[(adv_shape, scope)]), rtol=1e-6, atol=1e-6)
    # The penalty never touches padded positions.
    full_adv = advantages.unsqueeze(-1).expand(2, 4) if adv_shape == "B" else advantages
    assert ((out - full_adv)[MASK == 0] == 0).all()


def test_kl_shaped_advantages_beta_zero_is_identity():
    out = kl.kl_shaped_advantages(ADV_BT, PER_TOKEN, MASK, 0.0, "return_to_go")
    torch.testing.assert_close(out, ADV_BT, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# kl_loss (KL as a loss), with and without the importance ratio
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def loss_inputs():
    g = torch.Generator().manual_seed(4)
    logps = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    old = logps + 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    return logps, ref, old


@pytest.mark.parametrize("estimator", SAMPLED)
def test_kl_loss_without_ratio_is_estimate(loss_inputs, estimator):
    logps, ref, _ = loss_inputs
    torch.testing.assert_close(kl.kl_loss(estimator, logps, ref), kl.estimate(estimator, logps, ref),
                               rtol=0, atol=0)


def _closed_form_grad(estimator, logps, ref):
    r = torch.exp(ref - logps)
    return {"k1": torch.ones_like(logps), "k2": logps - ref, "k3": 1 - r,
            "k3_clip": 1 - r.clamp(max=kl.DEFAULT_K3_CLIP_MAX)}[estimator]


@pytest.mark.parametrize("estimator", SAMPLED)
def test_kl_loss_detached_ratio_scales_gradient(loss_inputs, estimator):
    logps, ref, old = loss_inputs
    ratio = torch.exp(logps - old)  # no grad
    lp = logps.clone().requires_grad_(True)
    out = kl.kl_loss(estimator, lp, ref, importance_ratio=ratio)
    torch.testing.assert_close(out.detach(), ratio * kl.estimate(estimator, logps, ref), rtol=1e-14, atol=0)
    out.sum().backward()
    torch.testing.assert_close(lp.grad, ratio * _closed_form_grad(estimator, logps, ref), rtol=1e-12, atol=1e-12)


def test_kl_loss_k3_with_ratio_gradient_is_k1_in_reward(loss_inputs):
    """kl_loss docstring: grad(rho k3) = rho (k3 + 1 - r) = rho (log pi - log pi_ref)."""
    logps, ref, old = loss_inputs
    lp = logps.clone().requires_grad_(True)
    ratio = torch.exp(lp - old)  # carries gradient
    kl.kl_loss("k3", lp, ref, importance_ratio=ratio).sum().backward()
    torch.testing.assert_close(lp.grad, torch.exp(logps - old) * (logps - ref), rtol=1e-12, atol=1e-12)


def test_kl_loss_k1_with_ratio_gradient(loss_inputs):
    """grad(rho k1) = rho (k1 + 1): the score-function form of k1, sound in expectation."""
    logps, ref, old = loss_inputs
    lp = logps.clone().requires_grad_(True)
    kl.kl_loss("k1", lp, ref, importance_ratio=torch.exp(lp - old)).sum().backward()
    torch.testing.assert_close(lp.grad, torch.exp(logps - old) * (logps - ref + 1), rtol=1e-12, atol=1e-12)


def test_kl_loss_unknown_raises():
    with pytest.raises(ValueError):
        kl.kl_loss("full", torch.zeros(2), torch.zeros(2))


# ---------------------------------------------------------------------------------------------------
# validate_kl and the SOUNDNESS table (docs/theory.md#placement)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_warned(monkeypatch):
    """validate_kl warns once per pair per process; give each test its own memory."""
    monkeypatch.setattr(kl, "_warned", set())


EXPECTED_VERDICTS = {
    ("k1", "reward"): "sound",
    ("k1", "loss"): "unsound",
    ("k2", "reward"): "unsound",
    ("k2", "loss"): "sound",
    ("k3", "reward"): "biased",
    ("k3", "loss"): "biased",
    ("k3_clip", "reward"): "biased",
    ("k3_clip", "loss"): "biased",
    ("full", "loss"): "sound",
    ("full", "reward"): "unsound",
}


def test_soundness_table_covers_grid_exactly():
    grid = {(e, p) for e in kl.ESTIMATORS for p in kl.PLACEMENTS}
    assert set(kl.SOUNDNESS) == grid
    assert len(kl.SOUNDNESS) == len(kl.ESTIMATORS) * len(kl.PLACEMENTS)
    assert {k: v.verdict for k, v in kl.SOUNDNESS.items()} == EXPECTED_VERDICTS
    assert all(v.reason.strip() for v in kl.SOUNDNESS.values())


@pytest.mark.parametrize("pair", sorted(EXPECTED_VERDICTS))
def test_validate_kl_each_pair(fresh_warned, pair):
    estimator, placement = pair
    entry = kl.SOUNDNESS[pair]
    verdict = EXPECTED_VERDICTS[pair]
    if verdict == "unsound":
        with pytest.raises(ValueError) as exc:
            kl.validate_kl(estimator, placement)
        msg = str(exc.value)
        assert entry.reason in msg
        assert "allow_unsound_kl" in msg
        assert "unsound" in msg
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kl.validate_kl(estimator, placement, allow_unsound=True) is entry
    elif verdict == "biased":
        with pytest.warns(UserWarning) as record:
            assert kl.validate_kl(estimator, placement) is entry
        assert len(record) == 1
        assert entry.reason in str(record[0].message)
        assert "biased" in str(record[0].message)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kl.validate_kl(estimator, placement) is entry
            assert kl.validate_kl(estimator, placement, allow_unsound=True) is entry


def test_validate_kl_warns_once_per_pair(fresh_warned):
    with pytest.warns(UserWarning):
        kl.validate_kl("k3", "loss")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kl.validate_kl("k3", "loss")  # second time: silent
    with pytest.warns(UserWarning, match="k3_clip"):
        kl.validate_kl("k3_clip", "loss")  # another pair still warns


@pytest.mark.parametrize(
    "estimator, placement, listed",
    [("k4", "loss", kl.ESTIMATORS), ("kl", "reward", kl.ESTIMATORS), ("k1", "advantage", kl.PLACEMENTS)],
)
def test_validate_kl_bad_names(fresh_warned, estimator, placement, listed):
    with pytest.raises(ValueError) as exc:
        kl.validate_kl(estimator, placement, allow_unsound=True)
    msg = str(exc.value)
    assert all(repr(name) in msg for name in listed), msg
    assert repr(estimator if listed is kl.ESTIMATORS else placement) in msg
