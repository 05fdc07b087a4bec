"""trl_kl.full_kl: exact per-state KL over the vocabulary in bounded memory (paper section 4, way (1); NOTES §3).

Checked against the naive ``trl_kl.kl.full_kl`` on materialised logits (value and gradient), by gradcheck, on
extreme logits, with masks, against TRL 1.16's own distillation kernel, and for the memory bound itself: no tensor
bigger than one tile is created (besides the gradients), while the naive version creates (N, V) ones.
"""

from __future__ import annotations

import math

import pytest
import torch

from trl_kl import kl
from trl_kl.full_kl import TensorMemoryTracker, chunked_full_kl, full_kl_from_logits

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def make_problem(n_lead=(3, 11), hidden=8, ref_hidden=6, vocab=50, dtype=torch.float32, seed=0, scale=1.0):
    """Policy (h, W, b) with gradients, a reference (h_ref, W_ref, b_ref) with a different width, logits ~ O(scale)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    h = rnd(*n_lead, hidden).requires_grad_()
    w = rnd(vocab, hidden, s=scale / math.sqrt(hidden)).requires_grad_()
    b = rnd(vocab, s=0.5 * scale).requires_grad_()
    rh = rnd(*n_lead, ref_hidden)
    rw = rnd(vocab, ref_hidden, s=scale / math.sqrt(ref_hidden))
    rb = rnd(vocab, s=0.5 * scale)
    upstream = rnd(*n_lead)  # a non-uniform upstream gradient, so every row's weight matters
    return h, w, b, rh, rw, rb, upstream


def naive(h, w, b, rh, rw, rb, temperature=1.0):
    return kl.full_kl((h @ w.T + b) / temperature, (rh @ rw.T + rb) / temperature)


def grads(out, upstream, params):
    return torch.autograd.grad((out * upstream).sum(), params)


def assert_close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------
# Value and gradient against the naive computation
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "chunk_size, vocab_chunk_size",
    [(1, None), (4, None), (7, 13), (10, 50), (16, 8), (33, None), (33, 49), (100, 1), (1000, 64)],
)
def test_chunked_full_kl_matches_naive(dtype, chunk_size, vocab_chunk_size):
    # N = 3 * 11 = 33 positions: 4, 7, 10, 16 do not divide it, 33 and up are one chunk; vocabulary tiles of 13, 8,
    # 49 do not divide V = 50, 64 exceeds it.
    h, w, b, rh, rw, rb, up = make_problem(dtype=dtype)
    expected = naive(h, w, b, rh, rw, rb)
    expected_grads = grads(expected, up, (h, w, b))

    out = chunked_full_kl(
        h, w, b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size
    )
    assert out.shape == (3, 11) and out.dtype == dtype
    assert_close(out, expected, TOL[dtype])
    for got, want in zip(grads(out, up, (h, w, b)), expected_grads):
        assert_close(got, want, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 33, 64])
def test_full_kl_from_logits_matches_naive(dtype, chunk_size):
    h, w, b, rh, rw, rb, up = make_problem(dtype=dtype, scale=2.0)
    logits = (h @ w.T + b).detach().requires_grad_()
    ref_logits = (rh @ rw.T + rb).detach()
    expected = kl.full_kl(logits, ref_logits)
    (expected_grad,) = grads(expected, up, (logits,))

    out = full_kl_from_logits(logits, ref_logits, chunk_size=chunk_size)
    assert out.shape == (3, 11) and out.dtype == dtype
    assert_close(out, expected, TOL[dtype])
    assert_close(grads(out, up, (logits,))[0], expected_grad, TOL[dtype])


def test_bf16_logits_are_computed_in_float32():
    h, w, b, rh, rw, rb, up = make_problem()
    logits = (h @ w.T + b).detach().bfloat16().requires_grad_()
    ref_logits = (rh @ rw.T + rb).detach().bfloat16()
    expected = kl.full_kl(logits, ref_logits)  # kl.full_kl also upcasts to float32
    out = full_kl_from_logits(logits, ref_logits, chunk_size=5)
    assert out.dtype == torch.float32
    assert_close(out, expected, 1e-5)
    got, want = grads(out, up, (logits,))[0], grads(expected, up, (logits,))[0]
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), want.float(), 1e-2)


def test_gradient_formula_in_logit_space():
    """dKL/dz = p (log p - log q - KL) per row (module docstring), against autograd of the naive KL."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    zq = torch.randn(4, 9, generator=g, dtype=torch.float64)
    (auto,) = torch.autograd.grad(kl.full_kl(z, zq).sum(), z)
    logp, logq = torch.log_softmax(z.detach(), -1), torch.log_softmax(zq, -1)
    value = (logp.exp() * (logp - logq)).sum(-1, keepdim=True)
    formula = logp.exp() * (logp - logq - value)
    assert_close(auto, formula, 1e-12)
    (ours,) = torch.autograd.grad(full_kl_from_logits(z, zq, chunk_size=3).sum(), z)
    assert_close(ours, formula, 1e-12)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_temperature_divides_both_models(temperature):
    h, w, b, rh, rw, rb, up = make_problem(dtype=torch.float64)
    expected = naive(h, w, b, rh, rw, rb, temperature)
    out = chunked_full_kl(
        h, w, b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, temperature=temperature, chunk_size=4, vocab_chunk_size=16
    )
    assert_close(out, expected, 1e-10)
    for got, want in zip(grads(out, up, (h, w, b)), grads(expected, up, (h, w, b))):
        assert_close(got, want, 1e-10)
    logits = (h @ w.T + b).detach().requires_grad_()
    ref_logits = (rh @ rw.T + rb).detach()
    out = full_kl_from_logits(logits, ref_logits, temperature=temperature, chunk_size=4)
    expected = kl.full_kl(logits / temperature, ref_logits / temperature)
    assert_close(out, expected, 1e-10)
    assert_close(grads(out, up, (logits,))[0], grads(expected, up, (logits,))[0], 1e-10)


def test_ref_logits_fn_matches_ref_hidden_and_sees_each_row_once_per_pass():
    h, w, b, rh, rw, rb, up = make_problem(dtype=torch.float64)
    ref_logits = (rh @ rw.T + rb).reshape(-1, rw.shape[0])
    calls = []

    def ref_fn(rows):
        calls.append(rows.clone())
        return ref_logits[rows]

    expected = chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, chunk_size=5)
    out = chunked_full_kl(h, w, b, ref_logits_fn=ref_fn, chunk_size=5, vocab_chunk_size=7)
    assert_close(out, expected, 1e-12)
    assert torch.equal(torch.cat(calls), torch.arange(33))  # forward: every row once, in chunks of <= 5
    assert max(len(c) for c in calls) == 5
    for got, want in zip(grads(out, up, (h, w, b)), grads(expected, up, (h, w, b))):
        assert_close(got, want, 1e-12)
    assert torch.equal(torch.cat(calls), torch.cat([torch.arange(33)] * 2))  # backward recomputes each chunk once


def test_reference_gets_no_gradient_even_when_it_shares_the_policy_head():
    """A PEFT reference (adapter disabled) shares the policy's lm_head parameter: only the policy side gets a
    gradient."""
    h, w, b, rh, _, _, up = make_problem(ref_hidden=8, dtype=torch.float64)
    expected = kl.full_kl(h @ w.T + b, (rh @ w.T + b).detach())
    out = chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=w, ref_bias=b, chunk_size=4, vocab_chunk_size=16)
    assert_close(out, expected, 1e-10)
    for got, want in zip(grads(out, up, (h, w, b)), grads(expected, up, (h, w, b))):
        assert_close(got, want, 1e-10)
    rh.requires_grad_()
    out = chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=w, ref_bias=b, chunk_size=4)
    assert torch.autograd.grad(out.sum(), rh, allow_unused=True)[0] is None


def test_agrees_with_trl_distillation_kernel():
    """TRL 1.16's ChunkedDivergenceFunction with beta=1 is KL(student || teacher): an independent implementation."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    h, w, b, rh, rw, rb, up = make_problem(n_lead=(40,), scale=2.0)
    theirs, _ = ChunkedDivergenceFunction.apply(h, w, b, rh, rw, rb, 1.0, 0.8)
    ours = chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, temperature=0.8, chunk_size=7)
    assert_close(ours, theirs, 1e-5)
    for got, want in zip(grads(ours, up, (h, w, b)), grads(theirs, up, (h, w, b))):
        assert_close(got, want, 1e-5)


# ---------------------------------------------------------------------------------------------------
# gradcheck, extreme logits
# ---------------------------------------------------------------------------------------------------


def test_gradcheck_hidden_interface():
    h, w, b, rh, rw, rb, _ = make_problem(n_lead=(5,), hidden=3, ref_hidden=2, vocab=7, dtype=torch.float64)
    mask = torch.tensor([1, 0, 1, 1, 1])

    def fn(h, w, b):
        return chunked_full_kl(
            h, w, b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, mask=mask, temperature=0.9, chunk_size=2,
            vocab_chunk_size=3,
        )

    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_gradcheck_logits_interface():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    zq = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert torch.autograd.gradcheck(lambda z: full_kl_from_logits(z, zq, mask, temperature=1.3, chunk_size=2), (z,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_stay_finite_and_exact(dtype):
    """Logits differing by +-1e4 inside a row and between the two models: no overflow in exp (online max)."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 40, generator=g, dtype=torch.float64) * 1e4
    zq = torch.randn(6, 40, generator=g, dtype=torch.float64) * 1e4
    z[0], zq[0] = 0.0, 0.0  # a uniform row next to extreme ones: KL exactly 0
    z[1, 3] = 1e4  # p one-hot-like where q is tiny: KL ~ 1e4
    expected = kl.full_kl(z, zq)  # float64 reference (log_softmax is stable)
    logits = z.to(dtype).requires_grad_()
    out = full_kl_from_logits(logits, zq.to(dtype), chunk_size=4)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    # KL values reach ~3e4; float32 carries ~7 digits of logits of size 1e4, so the error bound is relative to the
    # logit scale (the naive float32 computation is off by ~1e-3 here too)
    tol = (1e-12 if dtype == torch.float64 else 1e-6) * 2e4
    assert (out.double() - expected).abs().max().item() <= tol
    assert out[0].abs().item() <= 1e-12

    # the hidden-state interface: h of size 3e3 through a unit-variance head gives logits of ~1e4
    h, w, b, rh, rw, rb, up = make_problem(n_lead=(6,), dtype=dtype, seed=7)
    with torch.no_grad():
        h.mul_(3e3), rh.mul_(-3e3)
    out = chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, chunk_size=4, vocab_chunk_size=16)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(x).all() for x in grads(out, up, (h, w, b)))
    assert (out.double() - naive(*(x.double() for x in (h, w, b, rh, rw, rb)))).abs().max().item() <= tol


# ---------------------------------------------------------------------------------------------------
# Masks and padding
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_mask_skips_rows_exactly(mask_dtype):
    h, w, b, rh, rw, rb, up = make_problem(dtype=torch.float64)
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(2)) > 0.4
    mask[1] = False  # a fully padded sequence
    clean_h = h.detach().clone().requires_grad_()
    expected = torch.where(mask, naive(clean_h, w, b, rh, rw, rb), 0.0)
    expected_grads = grads(expected, up, (clean_h, w, b))
    clean_ref_logits = (rh @ rw.T + rb).reshape(-1, rw.shape[0])
    with torch.no_grad():  # padding may hold anything: it must not leak into values or gradients
        h[~mask] = math.nan
        rh[~mask] = math.inf
    seen = []

    def ref_fn(rows):
        seen.append(rows)
        return clean_ref_logits[rows]

    m = mask.to(mask_dtype)
    for out in (
        chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, mask=m, chunk_size=4, vocab_chunk_size=9),
        chunked_full_kl(h, w, b, ref_logits_fn=ref_fn, mask=m, chunk_size=4),
    ):
        assert torch.isfinite(out).all() and (out[~mask] == 0).all()
        assert_close(out, expected, 1e-10)
        got = grads(out, up, (h, w, b))
        assert all(torch.isfinite(x).all() for x in got)
        assert (got[0][~mask] == 0).all()
        for g_, want in zip(got, expected_grads):
            assert_close(g_, want, 1e-10)
    assert set(torch.cat(seen).tolist()) == set(mask.reshape(-1).nonzero().squeeze(-1).tolist())

    logits = (clean_h @ w.T + b).detach()
    logits[~mask] = math.nan
    logits.requires_grad_()
    ref_logits = clean_ref_logits.reshape(3, 11, -1).clone()
    ref_logits[~mask] = -math.inf
    out = full_kl_from_logits(logits, ref_logits, m, chunk_size=4)
    assert_close(out, expected, 1e-10)
    (g_,) = grads(out, up, (logits,))
    assert torch.isfinite(g_).all() and (g_[~mask] == 0).all()


def test_all_masked_gives_zeros_and_a_zero_gradient():
    h, w, b, rh, rw, rb, _ = make_problem()
    mask = torch.zeros(3, 11)
    out = chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, mask=mask)
    assert torch.equal(out, torch.zeros(3, 11))
    gh, gw, gb = torch.autograd.grad(out.sum(), (h, w, b), allow_unused=True)
    assert (gh is None or (gh == 0).all()) and (gw is None or (gw == 0).all()) and (gb is None or (gb == 0).all())
    logits = (h @ w.T).detach().requires_grad_()
    out = full_kl_from_logits(logits, logits.detach(), mask)
    assert torch.equal(out, torch.zeros(3, 11))
    out.sum().backward()
    assert logits.grad is None or (logits.grad == 0).all()


def test_non_contiguous_hidden_states():
    """TRL's hidden states arrive as ``last_hidden_state[:, :-1]`` slices."""
    h, w, b, rh, rw, rb, up = make_problem(n_lead=(3, 12), dtype=torch.float64)
    hs, rhs, ups = h[:, :-1], rh[:, 1:], up[:, :-1]
    out = chunked_full_kl(hs, w, b, ref_hidden=rhs, ref_weight=rw, ref_bias=rb, chunk_size=5)
    expected = naive(hs, w, b, rhs, rw, rb)
    assert_close(out, expected, 1e-10)
    for got, want in zip(grads(out, ups, (h, w, b)), grads(expected, ups, (h, w, b))):
        assert_close(got, want, 1e-10)


def test_validation_errors():
    h, w, b, rh, rw, rb, _ = make_problem()
    with pytest.raises(ValueError, match="either as ref_hidden"):
        chunked_full_kl(h, w, b)
    with pytest.raises(ValueError, match="either as ref_hidden"):
        chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=rw, ref_logits_fn=lambda r: None)
    with pytest.raises(ValueError, match="needs ref_weight"):
        chunked_full_kl(h, w, b, ref_hidden=rh)
    with pytest.raises(ValueError, match="same vocabulary"):
        chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=rw[:-1])
    with pytest.raises(ValueError, match="do not match"):
        chunked_full_kl(h[..., :-1], w, b, ref_hidden=rh, ref_weight=rw)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=rw, chunk_size=0)
    with pytest.raises(ValueError, match="vocab_chunk_size"):
        chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=rw, vocab_chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=rw, temperature=0.0)
    with pytest.raises(ValueError, match="mask"):
        chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=rw, mask=torch.ones(3, 10))
    with pytest.raises(ValueError, match="ref_logits_fn returned"):
        chunked_full_kl(h, w, b, ref_logits_fn=lambda rows: torch.zeros(len(rows), 49))
    with pytest.raises(ValueError, match="same"):
        full_kl_from_logits(torch.zeros(2, 5), torch.zeros(2, 6))


# ---------------------------------------------------------------------------------------------------
# The memory bound
# ---------------------------------------------------------------------------------------------------


def test_tracker_counts_live_tensors():
    x = torch.randn(1000, requires_grad=True)
    with TensorMemoryTracker() as tracker:
        y = x * 2  # 4000 bytes
        z = y.exp()  # 4000, saved for backward
        del y  # freed
        w = torch.ones(3000)  # 12000: peak 16000 with z
        del w
        z.sum().backward()
        x.view(10, 100)  # a view of an existing tensor: no new memory
    assert tracker.largest_bytes == 12000
    assert 16000 <= tracker.peak_bytes < 16000 + 3 * 4000 + 64  # + backward's grad buffers
    assert tracker.current_bytes >= 4000  # x.grad is still alive


def _measure(fn):
    with TensorMemoryTracker() as tracker:
        fn()
    return tracker


@pytest.mark.parametrize("vocab_chunk_size", [None, 250])
def test_chunked_never_creates_an_n_by_v_tensor(vocab_chunk_size):
    n, hdim, vocab, chunk = 512, 16, 1000, 64
    h, w, b, rh, rw, rb, up = make_problem(n_lead=(n,), hidden=hdim, ref_hidden=hdim, vocab=vocab)
    cols = vocab if vocab_chunk_size is None else vocab_chunk_size
    tile = chunk * cols * 4
    grads_bytes = (n * hdim + vocab * hdim + vocab) * 4  # what autograd must hand back anyway

    def chunked():
        out = chunked_full_kl(
            h, w, b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, chunk_size=chunk, vocab_chunk_size=vocab_chunk_size
        )
        torch.autograd.grad((out * up).sum(), (h, w, b))

    def naive_run():
        torch.autograd.grad((naive(h, w, b, rh, rw, rb) * up).sum(), (h, w, b))

    c, nv = _measure(chunked), _measure(naive_run)
    assert c.largest_bytes <= max(tile, vocab * hdim * 4, n * hdim * 4)
    assert c.peak_bytes <= 3 * tile + grads_bytes + 64 * n  # 3 tiles + gradients + a few floats per row
    assert nv.largest_bytes >= n * vocab * 4  # the naive version materialises (N, V) logits
    assert nv.peak_bytes >= 4 * n * vocab * 4
    assert c.peak_bytes * 4 < nv.peak_bytes


def test_chunked_peak_does_not_grow_with_sequence_length():
    hdim, vocab, chunk = 16, 1000, 128
    peaks = {}
    for n in (256, 1024):
        h, w, b, rh, rw, rb, up = make_problem(n_lead=(n,), hidden=hdim, ref_hidden=hdim, vocab=vocab)

        def run():
            out = chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, chunk_size=chunk)
            torch.autograd.grad((out * up).sum(), (h, w, b))

        peaks[n] = _measure(run).peak_bytes
    # only per-row quantities grow (grad of h: hdim floats; lse/KL/indices: a few floats per row): not V per row
    assert peaks[1024] - peaks[256] <= (1024 - 256) * (hdim + 16) * 8
    assert peaks[256] >= 3 * chunk * vocab * 4


def test_from_logits_allocates_only_chunks_and_the_gradient():
    n, vocab, chunk = 512, 1000, 64
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, vocab, generator=g).requires_grad_()
    ref_logits = torch.randn(n, vocab, generator=g)
    full = n * vocab * 4

    c = _measure(lambda: full_kl_from_logits(logits, ref_logits, chunk_size=chunk).sum().backward())
    logits.grad = None
    nv = _measure(lambda: kl.full_kl(logits, ref_logits).sum().backward())
    logits.grad = None
    # chunked: the (N, V) gradient autograd needs, plus 3 chunk buffers; naive: 4 or more (N, V) intermediates
    assert c.peak_bytes <= full + 3 * chunk * vocab * 4 + 64 * n
    assert nv.peak_bytes >= 4 * full
