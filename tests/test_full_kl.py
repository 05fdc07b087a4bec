"""trl_kl.full_kl: exact per-state KL over the vocabulary (paper section 4, way (1); docs/theory.md#full-kl), a
wrapper over TRL 1.16's ``ChunkedDivergenceFunction``.

Checked against the naive ``trl_kl.kl.full_kl`` on materialised logits (value and gradient), on extreme logits, with
masks (padding never read), for the reference getting no gradient, and for the memory bound itself with TRL's tile
constants shrunk: no tensor bigger than a few tiles is created (besides the gradients), and the peak does not grow
with N, while the naive version creates (N, V) ones.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import trl.kernels.chunked_divergence as trl_divergence

from trl_kl import kl
from trl_kl.full_kl import chunked_full_kl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from memory_tracker import TensorMemoryTracker  # noqa: E402

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


@pytest.fixture
def tiles(monkeypatch):
    """Shrink TRL's tile constants (``TOKEN_CHUNK_SIZE`` rows x ``VOCAB_CHUNK_SIZE`` columns, read at call time) so
    that small problems cross several row chunks and vocabulary tiles."""

    def set_tiles(rows: int, cols: int):
        monkeypatch.setattr(trl_divergence, "TOKEN_CHUNK_SIZE", rows)
        monkeypatch.setattr(trl_divergence, "VOCAB_CHUNK_SIZE", cols)

    return set_tiles


def hidden_kl(h, w, b, rh, rw, rb, **kwargs):
    return chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Value and gradient against the naive computation
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols", [(4096, 32768), (1, 64), (4, 50), (7, 13), (33, 8), (10, 1)])
def test_chunked_full_kl_matches_naive(tiles, rows, cols):
    # N = 3 * 11 = 33 positions, V = 50: TRL's defaults (one tile), 4, 7, 10 rows do not divide N, 13, 8 columns do
    # not divide V, 64 exceeds it.
    tiles(rows, cols)
    h, w, b, rh, rw, rb, up = make_problem()
    expected = naive(h, w, b, rh, rw, rb)
    out = hidden_kl(h, w, b, rh, rw, rb)
    assert out.shape == (3, 11) and out.dtype == torch.float32
    assert_close(out, expected, 1e-5)
    for got, want in zip(grads(out, up, (h, w, b)), grads(expected, up, (h, w, b))):
        assert_close(got, want, 1e-5)


def test_float64_inputs_are_computed_in_float32(tiles):
    """TRL's kernel projects into float32 tiles: float64 is accepted, the result is float32 and float32-accurate."""
    tiles(8, 16)
    h, w, b, rh, rw, rb, up = make_problem(dtype=torch.float64)
    expected = naive(h, w, b, rh, rw, rb)
    out = hidden_kl(h, w, b, rh, rw, rb)
    assert out.dtype == torch.float32
    assert_close(out.double(), expected, 1e-5)
    got = grads(out, up.float(), (h, w, b))
    assert all(g.dtype == torch.float64 for g in got)
    for g_, want in zip(got, grads(expected, up, (h, w, b))):
        assert_close(g_, want, 1e-5)


def test_gradient_formula_in_logit_space(tiles):
    """dKL/dz = p (log p - log q - KL) per row (module docstring): autograd of the naive KL, and TRL's backward
    through an identity head (h = z, so dKL/dh = dKL/dz)."""
    tiles(3, 4)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    zq = torch.randn(4, 9, generator=g, dtype=torch.float64)
    (auto,) = torch.autograd.grad(kl.full_kl(z, zq).sum(), z)
    logp, logq = torch.log_softmax(z.detach(), -1), torch.log_softmax(zq, -1)
    value = (logp.exp() * (logp - logq)).sum(-1, keepdim=True)
    formula = logp.exp() * (logp - logq - value)
    assert_close(auto, formula, 1e-12)
    z32 = z.detach().float().requires_grad_()
    eye = torch.eye(9)
    (trl_grad,) = torch.autograd.grad(chunked_full_kl(z32, eye, ref_hidden=zq.float(), ref_weight=eye).sum(), z32)
    assert_close(trl_grad.double(), formula, 1e-6)


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature_divides_both_models(tiles, temperature):
    tiles(4, 16)
    h, w, b, rh, rw, rb, up = make_problem()
    expected = naive(h, w, b, rh, rw, rb, temperature)
    out = hidden_kl(h, w, b, rh, rw, rb, temperature=temperature)
    assert_close(out, expected, 1e-5)
    for got, want in zip(grads(out, up, (h, w, b)), grads(expected, up, (h, w, b))):
        assert_close(got, want, 1e-5)


def test_logit_scale_and_softcapping_are_passed_to_trl(tiles):
    """z = softcap * tanh(scale * logits / softcap) / T for each model, with its own scale and cap (Gemma, Cohere)."""
    tiles(5, 16)
    h, w, b, rh, rw, rb, up = make_problem(scale=3.0)

    def post(logits, scale, cap):
        y = logits * scale
        return (y if cap is None else cap * torch.tanh(y / cap)) / 0.9

    expected = kl.full_kl(post(h @ w.T + b, 0.7, 2.5), post(rh @ rw.T + rb, 1.3, None))
    out = hidden_kl(
        h, w, b, rh, rw, rb, temperature=0.9, logit_scale=0.7, final_logit_softcapping=2.5, ref_logit_scale=1.3
    )
    assert_close(out, expected, 1e-5)
    for got, want in zip(grads(out, up, (h, w, b)), grads(expected, up, (h, w, b))):
        assert_close(got, want, 1e-5)


def test_reference_gets_no_gradient_even_when_it_shares_the_policy_head(tiles):
    """A PEFT reference (adapter disabled) shares the policy's lm_head parameter: only the policy side gets a
    gradient."""
    tiles(4, 16)
    h, w, b, rh, _, _, up = make_problem(ref_hidden=8)
    expected = kl.full_kl(h @ w.T + b, (rh @ w.T + b).detach())
    out = hidden_kl(h, w, b, rh, w, b)
    assert_close(out, expected, 1e-5)
    for got, want in zip(grads(out, up, (h, w, b)), grads(expected, up, (h, w, b))):
        assert_close(got, want, 1e-5)
    rh.requires_grad_()
    rw, rb = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    out = hidden_kl(h, w, b, rh, rw, rb)
    assert torch.autograd.grad(out.sum(), (rh, rw, rb), allow_unused=True) == (None, None, None)


def test_extreme_logits_stay_finite_and_exact(tiles):
    """Logits differing by +-1e4 inside a row and between the two models: no overflow in exp (online max)."""
    tiles(4, 16)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 40, generator=g, dtype=torch.float64) * 1e4
    zq = torch.randn(6, 40, generator=g, dtype=torch.float64) * 1e4
    z[0], zq[0] = 0.0, 0.0  # a uniform row next to extreme ones: KL exactly 0
    z[1, 3] = 1e4  # p one-hot-like where q is tiny: KL ~ 1e4
    expected = kl.full_kl(z, zq)  # float64 reference (log_softmax is stable)
    # KL values reach ~3e4; float32 carries ~7 digits of logits of size 1e4, so the error bound is relative to the
    # logit scale (the naive float32 computation is off by ~1e-3 here too)
    tol = 1e-6 * 2e4

    # TRL's kernel through an identity head (h = logits), and through a real head with h of size 3e3
    eye = torch.eye(40)
    h = z.float().requires_grad_()
    out = chunked_full_kl(h, eye, ref_hidden=zq.float(), ref_weight=eye)
    (grad,) = torch.autograd.grad(out.sum(), h)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert (out.double() - expected).abs().max().item() <= tol and out[0].abs().item() <= 1e-6
    h, w, b, rh, rw, rb, up = make_problem(n_lead=(6,), seed=7)
    with torch.no_grad():
        h.mul_(3e3), rh.mul_(-3e3)
    out = hidden_kl(h, w, b, rh, rw, rb)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(x).all() for x in grads(out, up, (h, w, b)))
    assert (out.double() - naive(*(x.double() for x in (h, w, b, rh, rw, rb)))).abs().max().item() <= tol


# ---------------------------------------------------------------------------------------------------
# Masks and padding
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_mask_skips_rows_exactly(tiles, mask_dtype):
    tiles(4, 9)
    h, w, b, rh, rw, rb, up = make_problem()
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(2)) > 0.4
    mask[1] = False  # a fully padded sequence
    clean_h = h.detach().clone().requires_grad_()
    expected = torch.where(mask, naive(clean_h, w, b, rh, rw, rb), 0.0)
    expected_grads = grads(expected, up, (clean_h, w, b))
    with torch.no_grad():  # padding may hold anything: it must not leak into values or gradients
        h[~mask] = math.nan
        rh[~mask] = math.inf
    m = mask.to(mask_dtype)
    out = hidden_kl(h, w, b, rh, rw, rb, mask=m)
    assert torch.isfinite(out).all() and (out[~mask] == 0).all()
    assert_close(out, expected, 1e-5)
    got = grads(out, up, (h, w, b))
    assert all(torch.isfinite(x).all() for x in got)
    assert (got[0][~mask] == 0).all()
    for g_, want in zip(got, expected_grads):
        assert_close(g_, want, 1e-5)


def test_all_masked_gives_zeros_and_a_zero_gradient():
    h, w, b, rh, rw, rb, _ = make_problem()
    mask = torch.zeros(3, 11)
    out = hidden_kl(h, w, b, rh, rw, rb, mask=mask)
    assert torch.equal(out, torch.zeros(3, 11))
    gh, gw, gb = torch.autograd.grad(out.sum(), (h, w, b), allow_unused=True)
    assert (gh is None or (gh == 0).all()) and (gw is None or (gw == 0).all()) and (gb is None or (gb == 0).all())


def test_non_contiguous_hidden_states(tiles):
    """TRL's hidden states arrive as ``last_hidden_state[:, -K-1:-1]`` slices."""
    tiles(5, 32)
    h, w, b, rh, rw, rb, up = make_problem(n_lead=(3, 12))
    hs, rhs, ups = h[:, :-1], rh[:, 1:], up[:, :-1]
    out = hidden_kl(hs, w, b, rhs, rw, rb)
    expected = naive(hs, w, b, rhs, rw, rb)
    assert_close(out, expected, 1e-5)
    for got, want in zip(grads(out, ups, (h, w, b)), grads(expected, ups, (h, w, b))):
        assert_close(got, want, 1e-5)


def test_validation_errors():
    h, w, b, rh, rw, rb, _ = make_problem()
    with pytest.raises(TypeError):
        chunked_full_kl(h, w, b)  # the reference is required (keyword-only)
    with pytest.raises(ValueError, match="same vocabulary"):
        chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=rw[:-1])
    with pytest.raises(ValueError, match="do not match"):
        chunked_full_kl(h[..., :-1], w, b, ref_hidden=rh, ref_weight=rw)
    with pytest.raises(ValueError, match="leading shape"):
        chunked_full_kl(h, w, b, ref_hidden=rh[:, :-1], ref_weight=rw)
    with pytest.raises(ValueError, match="temperature"):
        chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=rw, temperature=0.0)
    with pytest.raises(ValueError, match="mask"):
        chunked_full_kl(h, w, b, ref_hidden=rh, ref_weight=rw, mask=torch.ones(3, 10))


# ---------------------------------------------------------------------------------------------------
# The memory bound (TRL's tiles shrunk so that a small problem spans many of them)
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


TILE_ROWS, TILE_COLS = 64, 256
TILES_LIVE = 12
"""Bound on tile-sized tensors live at once in TRL's CPU path: its two tile buffers plus the temporaries of
``_stats_tile`` / ``_backward_tile`` (transformed logits, their gap, exps and products); measured: about 10.6,
with the backward."""


def _run_chunked(n, hdim=16, vocab=1000):
    h, w, b, rh, rw, rb, up = make_problem(n_lead=(n,), hidden=hdim, ref_hidden=hdim, vocab=vocab)

    def run():
        torch.autograd.grad((hidden_kl(h, w, b, rh, rw, rb) * up).sum(), (h, w, b))

    def naive_run():
        torch.autograd.grad((naive(h, w, b, rh, rw, rb) * up).sum(), (h, w, b))

    return run, naive_run


def test_chunked_never_creates_an_n_by_v_tensor(tiles):
    tiles(TILE_ROWS, TILE_COLS)
    n, hdim, vocab = 512, 16, 1000
    tile = TILE_ROWS * TILE_COLS * 4
    grads_bytes = (n * hdim + vocab * hdim + vocab) * 4  # what autograd must hand back anyway
    run, naive_run = _run_chunked(n, hdim, vocab)
    c, nv = _measure(run), _measure(naive_run)
    assert c.largest_bytes <= max(tile, vocab * hdim * 4, n * hdim * 4), c.largest_op
    assert c.peak_bytes <= TILES_LIVE * tile + grads_bytes + 64 * n
    assert nv.largest_bytes >= n * vocab * 4  # the naive version materialises (N, V) logits
    assert nv.peak_bytes >= 4 * n * vocab * 4
    assert c.peak_bytes * 2 < nv.peak_bytes


def test_chunked_peak_does_not_grow_with_sequence_length(tiles):
    tiles(TILE_ROWS, TILE_COLS)
    hdim = 16
    peaks = {n: _measure(_run_chunked(n, hdim)[0]).peak_bytes for n in (128, 512)}  # 2 and 8 row chunks
    # only per-row quantities grow (grad of h: hdim floats; indices, normalisers, KL: a few floats per row)
    assert peaks[512] - peaks[128] <= (512 - 128) * (hdim + 16) * 8
    assert peaks[128] >= 2 * TILE_ROWS * TILE_COLS * 4  # TRL's two tile buffers


# ---------------------------------------------------------------------------------------------------
# The tile as an argument (token_chunk_size, vocab_chunk_size): TRL's constants set for its forward *and* backward
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols", [(7, 13), (1, 1), (5000, 40000)])
def test_tile_arguments_match_naive_and_restore_trls_constants(rows, cols):
    h, w, b, rh, rw, rb, up = make_problem()
    out = hidden_kl(h, w, b, rh, rw, rb, token_chunk_size=rows, vocab_chunk_size=cols)
    expected = naive(h, w, b, rh, rw, rb)
    assert_close(out, expected, 1e-5)
    for got, want in zip(grads(out, up, (h, w, b)), grads(expected, up, (h, w, b)), strict=True):
        assert_close(got, want, 1e-5)
    assert (trl_divergence.TOKEN_CHUNK_SIZE, trl_divergence.VOCAB_CHUNK_SIZE) == (4096, 32768)


def test_tile_arguments_hold_in_the_backward():
    """With TRL's own tile the backward would allocate two 512 x 32768 buffers (128 MiB): the bound below fails
    unless the backward runs with the tile given to the forward."""
    n, hdim, vocab = 512, 16, 1000
    tile = TILE_ROWS * TILE_COLS * 4
    h, w, b, rh, rw, rb, up = make_problem(n_lead=(n,), hidden=hdim, ref_hidden=hdim, vocab=vocab)
    out = hidden_kl(h, w, b, rh, rw, rb, token_chunk_size=TILE_ROWS, vocab_chunk_size=TILE_COLS)
    with TensorMemoryTracker() as backward:
        torch.autograd.grad((out * up).sum(), (h, w, b))
    grads_bytes = (n * hdim + vocab * hdim + vocab) * 4
    assert backward.peak_bytes <= TILES_LIVE * tile + grads_bytes + 64 * n
    assert backward.largest_bytes <= max(tile, vocab * hdim * 4, n * hdim * 4), backward.largest_op


def test_a_twelfth_of_the_vocabulary_meets_the_memory_target():
    """The issue's target: working set (what is allocated besides the gradients every method returns) <= 1.2 x one
    chunk's logits (rows x V float32), with vocabulary tiles of V / 12 on TRL's CPU path; TRL's own tile (32768
    columns) is far above it at this V."""
    n, hdim, vocab, rows = 512, 16, 2400, 128
    chunk_logits = rows * vocab * 4
    grads_bytes = (n * hdim + vocab * hdim + vocab) * 4
    h, w, b, rh, rw, rb, up = make_problem(n_lead=(n,), hidden=hdim, ref_hidden=hdim, vocab=vocab)

    def working(**tile):
        with TensorMemoryTracker() as tracker:
            out = hidden_kl(h, w, b, rh, rw, rb, **tile)
            forward = tracker.peak_bytes
            torch.autograd.grad((out * up).sum(), (h, w, b))
            del out
        return max(forward, tracker.peak_bytes - grads_bytes) / chunk_logits

    assert working(token_chunk_size=rows, vocab_chunk_size=vocab // 12) <= 1.2
    assert working(token_chunk_size=rows) > 10  # TRL's 32768-column tile: ~11 x 32768 / 2400 chunks' logits


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_tile_arguments_are_validated(bad):
    h, w, b, rh, rw, rb, _ = make_problem()
    for name in ("token_chunk_size", "vocab_chunk_size"):
        with pytest.raises(ValueError, match=name):
            hidden_kl(h, w, b, rh, rw, rb, **{name: bad})
