"""Exact per-state KL over the full vocabulary, in memory bounded independently of the sequence length.

The paper names three ways to get GRPO's KL right (section 4; NOTES §3): (1) "exact KL over the full
vocabulary" (costly in memory), (2) strictly on-policy with a large batch, (3) off-policy GRPO with the KL in the
reward. This module is way (1). At every visited state s_t it computes

    KL_t = KL(pi_theta(.|s_t) || pi_ref(.|s_t)) = sum_v p_v (log p_v - log q_v)
    with p = pi_theta(.|s_t), q = pi_ref(.|s_t)

summed over the whole vocabulary (eq. 42-43, appendix A.1) instead of estimated from the one sampled token
(k1/k2/k3, NOTES §1). As a loss (``kl_placement='loss'``, NOTES §2; the only sound placement for 'full', see
``kl.SOUNDNESS``) its gradient is the exact per-state KL gradient, sum_a grad pi(a) log(pi/pi_ref)(a) (appendix
A.2, eq. 44-49; eq. 22 of section 3.1, "full vocabulary"): even with one sample it is the expectation itself, not
a Monte-Carlo estimate of it. It is still the gradient of the *per-state* KL, not of the whole-sequence KL
(NOTES §7).

Gradient with respect to the policy logits z of one row (p = softmax(z), log q fixed)::

    d log p_u / d z_v = delta_uv - p_v,        d p_u / d z_v = p_u (delta_uv - p_v)
    dKL/dz_v = sum_u p_u (delta_uv - p_v) (log p_u - log q_u) + sum_u p_u (delta_uv - p_v)
             = p_v (log p_v - log q_v) - p_v KL + (p_v - p_v)
             = p_v (log p_v - log q_v - KL)

This is appendix A.2's result (eq. 22 at pi_old = pi_theta) in logit space: E_{a~p}[(log p/q)(a) grad_z log p(a)]
with grad_z log p(a) = e_a - p.
With z = (h W^T + b) / T (``temperature`` T) and an upstream gradient g per row, G = g p (log p - log q - KL) / T
and dKL/dh = G W, dKL/dW = G^T h, dKL/db = sum over rows of G. The reference is a constant: no gradient reaches
it, even when its head is the policy's own parameter (a PEFT reference with the adapter disabled).

Memory. The naive ``kl.full_kl`` holds (N, V) logits, both log-softmaxes and their products for all N positions,
in the forward and again in the backward. Here a custom ``torch.autograd.Function`` walks the positions in chunks
of ``chunk_size`` rows and, inside a chunk, the vocabulary in tiles of ``vocab_chunk_size`` columns, with an
online (running-max) log-sum-exp. The forward saves only the inputs and three floats per row (log-normaliser of
pi, of pi_ref, and KL); the backward recomputes each tile's logits. The working set is about three tiles of
``chunk_size x vocab_chunk_size`` floats in the forward (policy tile, reference tile, one exp temporary) and two
in the backward, plus the gradients themselves (N x H for h, V x H for W): no (N, V) tensor is ever created. With
``vocab_chunk_size=None`` a tile is a whole row chunk (chunk_size x V) and the floor is those three chunk-sized
tensors: the policy's and the reference's logits of a row are both needed, element by element.

References: the paper is ``shared/paper`` ("Rethinking KL Divergence in RLHF", 2025): section 4's way (1), eq. 22
(section 3.1), appendix A. "NOTES §N" is ``shared/NOTES.md``. TRL 1.16 has a similar kernel for distillation
(``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` with ``beta=1.0`` is KL(student || teacher)); the
tests use it as an independent cross-check.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_VOCAB_CHUNK_SIZE",
    "RefLogitsFn",
    "TensorMemoryTracker",
    "chunked_full_kl",
    "full_kl_from_logits",
]

DEFAULT_CHUNK_SIZE = 1024
"""Positions (rows) per chunk."""

DEFAULT_VOCAB_CHUNK_SIZE = 8192
"""Vocabulary columns per tile inside a chunk. With V = 32000 a tile is about a quarter of a chunk's logits, so the
three-tile working set stays below one (chunk_size, V) logits tensor."""

RefLogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""``ref_logits_fn(rows) -> (len(rows), V)``: the reference's raw logits (before temperature) at the given flattened
positions (indices into ``hidden.reshape(-1, H)``). Called once per chunk in the forward and once again in the
backward (recomputation), under ``torch.no_grad()``, so it must be deterministic."""


# ---------------------------------------------------------------------------------------------------
# Tile arithmetic shared by both interfaces. Every tile passed in is a scratch buffer of ours: it is overwritten.
# ---------------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64, everything else is computed in float32 (as in ``kl.py``)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _OnlineKL:
    """Running statistics of one row chunk over vocabulary tiles (online log-sum-exp).

    For each row: m_p = max of z seen so far, s_p = sum exp(z - m_p), d_p = sum exp(z - m_p) (z - q), and m_q, s_q
    for the reference. Then log Z_p = m_p + log s_p, log Z_q = m_q + log s_q and
    KL = sum p (log p - log q) = d_p / s_p - log Z_p + log Z_q (the p's sum to 1)."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        self.m_p = torch.full((n,), -math.inf, dtype=dtype, device=device)
        self.m_q = torch.full((n,), -math.inf, dtype=dtype, device=device)
        self.s_p = torch.zeros((n,), dtype=dtype, device=device)
        self.s_q = torch.zeros((n,), dtype=dtype, device=device)
        self.d_p = torch.zeros((n,), dtype=dtype, device=device)

    def fold(self, z: torch.Tensor, q: torch.Tensor, tmp: torch.Tensor) -> None:
        """Fold one tile of policy logits ``z`` and reference logits ``q`` (both ``(n, v)``, overwritten); ``tmp``
        is a scratch buffer of the same shape."""
        m_q = torch.maximum(self.m_q, q.amax(-1))
        self.s_q = self.s_q * torch.exp(self.m_q - m_q) + torch.sub(q, m_q.unsqueeze(-1), out=tmp).exp_().sum(-1)
        self.m_q = m_q
        torch.sub(z, q, out=q)  # q := z - q
        m_p = torch.maximum(self.m_p, z.amax(-1))
        z.sub_(m_p.unsqueeze(-1)).exp_()  # z := exp(z - m_p)
        rescale = torch.exp(self.m_p - m_p)
        self.s_p = self.s_p * rescale + z.sum(-1)
        self.d_p = self.d_p * rescale + z.mul_(q).sum(-1)
        self.m_p = m_p

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log Z_p, log Z_q, KL) per row."""
        lse_p = self.m_p + torch.log(self.s_p)
        lse_q = self.m_q + torch.log(self.s_q)
        return lse_p, lse_q, self.d_p / self.s_p - lse_p + lse_q


def _grad_tile(z: torch.Tensor, q: torch.Tensor, lse_p: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
    """Overwrite ``q`` with dKL/dz scaled per row: ``scale * p * (log p - log q - KL)`` where ``log p = z - lse_p``,
    ``log q = q - lse_q`` and ``shift = lse_p - lse_q + KL``. ``z`` is overwritten with p. Returns ``q``."""
    torch.sub(z, q, out=q)  # z - q
    z.sub_(lse_p.unsqueeze(-1)).exp_()  # p
    return q.sub_(shift.unsqueeze(-1)).mul_(z).mul_(scale.unsqueeze(-1))


def _vocab_tiles(vocab: int, vocab_chunk_size: int | None):
    step = vocab if vocab_chunk_size is None else vocab_chunk_size
    for start in range(0, vocab, max(step, 1)):
        yield start, min(start + step, vocab)


class _Scratch:
    """``k`` flat buffers of ``rows * cols`` elements, allocated once per call and reused by every tile: a tile is
    the contiguous view of the first ``n * v`` elements. (Reuse also spares the cost of faulting in fresh pages for
    every chunk, which on CPU is as slow as the exp itself.)"""

    def __init__(self, k: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        self.bufs = [torch.empty(rows * cols, dtype=dtype, device=device) for _ in range(k)]

    def __call__(self, i: int, n: int, v: int) -> torch.Tensor:
        return self.bufs[i][: n * v].view(n, v)


def _project(h, weight, bias, start: int, end: int, inv_t: float, out: torch.Tensor) -> torch.Tensor:
    """One tile of logits ``(h W[start:end]^T + b[start:end]) / T`` written into ``out`` (compute dtype)."""
    w = weight[start:end].t()
    if bias is None:
        torch.mm(h, w, out=out)
    else:
        torch.addmm(bias[start:end].to(h.dtype), h, w, out=out)
    return out if inv_t == 1.0 else out.mul_(inv_t)


# ---------------------------------------------------------------------------------------------------
# Interface 1: from hidden states and LM heads (the realistic one: no (N, V) logits ever)
# ---------------------------------------------------------------------------------------------------


class _ChunkedFullKLFunction(torch.autograd.Function):
    """Per-row KL(softmax(z) || softmax(z_ref)) with z = (h W^T + b) / T, in row chunks and vocabulary tiles.
    Gradient to h, W, b only (see the module docstring for G = g p (log p - log q - KL) / T)."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # (n, H) rows to score (already compacted by the mask)
        weight: torch.Tensor,  # (V, H)
        bias: torch.Tensor | None,  # (V,)
        ref_hidden: torch.Tensor | None,  # (n, H_ref)
        ref_weight: torch.Tensor | None,  # (V, H_ref)
        ref_bias: torch.Tensor | None,
        ref_logits_fn: RefLogitsFn | None,
        rows: torch.Tensor,  # (n,) flat position of each row, for ref_logits_fn
        temperature: float,
        chunk_size: int,
        vocab_chunk_size: int | None,
    ) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        dtype, device = _compute_dtype(hidden), hidden.device
        n, vocab, inv_t = hidden.shape[0], weight.shape[0], 1.0 / temperature
        lse_p = torch.empty((n,), dtype=dtype, device=device)
        lse_q, kl = torch.empty_like(lse_p), torch.empty_like(lse_p)
        tile_cols = vocab if vocab_chunk_size is None else min(vocab, vocab_chunk_size)
        scratch = _Scratch(3, min(n, chunk_size), tile_cols, dtype, device)
        with torch.autocast(device.type, enabled=False):
            w = weight.to(dtype)  # no copy when already in the compute dtype
            rw = None if ref_weight is None else ref_weight.to(dtype)
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                h = hidden[s:e].to(dtype)
                ref = _reference_tiles(ref_hidden, rw, ref_bias, ref_logits_fn, rows, s, e, dtype, vocab)
                stats = _OnlineKL(e - s, dtype, device)
                for vs, ve in _vocab_tiles(vocab, vocab_chunk_size):
                    z = _project(h, w, bias, vs, ve, inv_t, scratch(0, e - s, ve - vs))
                    q = ref(vs, ve, inv_t, scratch(1, e - s, ve - vs))
                    stats.fold(z, q, scratch(2, e - s, ve - vs))
                lse_p[s:e], lse_q[s:e], kl[s:e] = stats.finish()
                del ref, stats
        del scratch
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows, lse_p, lse_q, kl)
        ctx.ref_logits_fn = ref_logits_fn
        ctx.config = (temperature, chunk_size, vocab_chunk_size)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl: torch.Tensor | None):
        nones = (None,) * 8
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows, lse_p, lse_q, kl = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_kl is None or not (need_h or need_w or need_b):
            return (None, None, None, *nones)
        temperature, chunk_size, vocab_chunk_size = ctx.config
        dtype, device = _compute_dtype(hidden), hidden.device
        n, vocab, inv_t = hidden.shape[0], weight.shape[0], 1.0 / temperature
        scale = grad_kl.to(dtype) * inv_t  # dz/dlogits = 1/T
        shift = lse_p - lse_q + kl
        grad_h = torch.zeros(hidden.shape, dtype=dtype, device=device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None
        tile_cols = vocab if vocab_chunk_size is None else min(vocab, vocab_chunk_size)
        scratch = _Scratch(2, min(n, chunk_size), tile_cols, dtype, device)
        with torch.autocast(device.type, enabled=False):
            w = weight.to(dtype)
            rw = None if ref_weight is None else ref_weight.to(dtype)
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                h = hidden[s:e].to(dtype)
                ref = _reference_tiles(ref_hidden, rw, ref_bias, ctx.ref_logits_fn, rows, s, e, dtype, vocab)
                for vs, ve in _vocab_tiles(vocab, vocab_chunk_size):
                    z = _project(h, w, bias, vs, ve, inv_t, scratch(0, e - s, ve - vs))
                    q = ref(vs, ve, inv_t, scratch(1, e - s, ve - vs))
                    g = _grad_tile(z, q, lse_p[s:e], shift[s:e], scale[s:e])
                    if grad_h is not None:
                        grad_h[s:e].addmm_(g, w[vs:ve])
                    if grad_w is not None:
                        grad_w[vs:ve].addmm_(g.t(), h)
                    if grad_b is not None:
                        grad_b[vs:ve] += g.sum(0)
                del ref
        del scratch
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            *nones,
        )


def _reference_tiles(ref_hidden, ref_weight, ref_bias, ref_logits_fn, rows, s, e, dtype, vocab):
    """``tile(vs, ve, inv_t, out)``: the reference's logits for rows s:e, columns vs:ve, divided by T, in ``out``."""
    if ref_logits_fn is None:
        rh = ref_hidden[s:e].to(dtype)
        return lambda vs, ve, inv_t, out: _project(rh, ref_weight, ref_bias, vs, ve, inv_t, out)
    with torch.no_grad():
        chunk = ref_logits_fn(rows[s:e])
    if not isinstance(chunk, torch.Tensor) or chunk.shape != (e - s, vocab):
        shape = tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
        raise ValueError(
            f"ref_logits_fn returned {shape} for {e - s} rows, expected a tensor of shape {(e - s, vocab)}."
        )

    def tile(vs, ve, inv_t, out):
        out.copy_(chunk[:, vs:ve])
        return out if inv_t == 1.0 else out.mul_(inv_t)

    return tile


def _check_chunks(chunk_size: int, vocab_chunk_size: int | None, temperature: float) -> None:
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1 (positions per chunk), got {chunk_size!r}.")
    if vocab_chunk_size is not None and not (isinstance(vocab_chunk_size, int) and vocab_chunk_size >= 1):
        raise ValueError(f"vocab_chunk_size must be None (whole vocabulary) or an int >= 1, got {vocab_chunk_size!r}.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")


def _selected_rows(mask: torch.Tensor | None, lead: torch.Size, device: torch.device) -> torch.Tensor | None:
    """Flat indices of the rows to score, or None for all of them."""
    if mask is None:
        return None
    if mask.shape != lead:
        raise ValueError(f"mask must have the positions' shape {tuple(lead)}, got {tuple(mask.shape)}.")
    return mask.reshape(-1).to(device=device).bool().nonzero().squeeze(-1)


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor | None, lead: torch.Size) -> torch.Tensor:
    """Per-row values back to the positions' shape, exactly 0 on unselected rows (by selection, not a product)."""
    if rows is None:
        return values.reshape(lead)
    return values.new_zeros(lead.numel()).index_copy(0, rows, values).reshape(lead)


def chunked_full_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_logits_fn: RefLogitsFn | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int | None = DEFAULT_VOCAB_CHUNK_SIZE,
) -> torch.Tensor:
    """Exact per-position KL(pi_theta(.|s_t) || pi_ref(.|s_t)) over the full vocabulary, from the policy's final
    hidden states and LM head, without ever materialising (N, V) logits (the paper's way (1) of section 4, eq. 22,
    appendix A; NOTES §1-3).

    Args:
        hidden: policy final hidden states ``(..., H)`` (e.g. ``(B, T, H)`` at the completion positions).
        weight: policy LM head ``(V, H)``; ``bias``: optional ``(V,)``. Gradients flow to these three.
        ref_hidden, ref_weight, ref_bias: the reference as hidden states ``(..., H_ref)`` (same leading shape as
            ``hidden``) and its head ``(V, H_ref)``, ``(V,)``. Constants: no gradient reaches them, even if
            ``ref_weight`` is the policy's own head parameter (PEFT reference with the adapter disabled).
        ref_logits_fn: instead of ``ref_hidden``/``ref_weight``, a callable ``rows -> (len(rows), V)`` raw reference
            logits at the flat positions ``rows`` (see ``RefLogitsFn``). Only one chunk of them exists at a time.
        mask: optional ``(...)`` bool/float: rows where it is 0 are not computed at all; they get exactly 0 and zero
            gradient, so padding may hold anything (even NaN). Without it every row is scored.
        temperature: logits of *both* models are divided by it (as TRL's fused LM head does with ``temperature``).
        chunk_size: positions per chunk. ``vocab_chunk_size``: vocabulary columns per tile (None: the whole V).

    Returns:
        ``(...)`` KL per position, float32 (float64 for float64 ``hidden``). Differentiable in ``hidden``,
        ``weight`` and ``bias`` with dKL/dz = p (log p - log q - KL) per row (module docstring); not twice.

    Memory: besides the inputs and the gradients (N x H, V x H), about 3 tiles of chunk_size x vocab_chunk_size
    floats in the forward and 2 in the backward, plus three floats per row saved for the backward: independent of
    N. The policy logits are computed twice (forward and backward) and the reference's twice too.
    """
    _check_chunks(chunk_size, vocab_chunk_size, temperature)
    if (ref_logits_fn is None) == (ref_hidden is None):
        raise ValueError(
            "Give the reference either as ref_hidden (+ ref_weight, ref_bias) or as ref_logits_fn, not both."
        )
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden (..., H) and weight (V, H) do not match: {tuple(hidden.shape)}, {tuple(weight.shape)}."
        )
    vocab, lead = weight.shape[0], hidden.shape[:-1]
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}.")
    if ref_hidden is not None:
        if ref_weight is None:
            raise ValueError("ref_hidden needs ref_weight (the reference's LM head, (V, H_ref)).")
        if ref_hidden.shape[:-1] != lead:
            raise ValueError(
                f"ref_hidden must have hidden's leading shape {tuple(lead)}, got {tuple(ref_hidden.shape)}."
            )
        if ref_weight.shape != (vocab, ref_hidden.shape[-1]):
            raise ValueError(
                f"ref_weight must have shape ({vocab}, {ref_hidden.shape[-1]}) (same vocabulary as the policy), "
                f"got {tuple(ref_weight.shape)}."
            )
        if ref_bias is not None and ref_bias.shape != (vocab,):
            raise ValueError(f"ref_bias must have shape ({vocab},), got {tuple(ref_bias.shape)}.")
    elif ref_weight is not None or ref_bias is not None:
        raise ValueError("ref_weight/ref_bias go with ref_hidden; with ref_logits_fn the callable gives the logits.")

    selected = _selected_rows(mask, lead, hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    rh = None if ref_hidden is None else ref_hidden.detach().reshape(-1, ref_hidden.shape[-1])
    if selected is None:
        rows = torch.arange(h.shape[0], device=hidden.device)
    else:
        rows = selected
        h = h.index_select(0, rows)
        rh = None if rh is None else rh.index_select(0, rows)
    kl = _ChunkedFullKLFunction.apply(
        h,
        weight,
        bias,
        rh,
        None if ref_weight is None else ref_weight.detach(),
        None if ref_bias is None else ref_bias.detach(),
        ref_logits_fn,
        rows,
        float(temperature),
        chunk_size,
        vocab_chunk_size,
    )
    return _scatter_rows(kl, selected, lead)


# ---------------------------------------------------------------------------------------------------
# Interface 2: from logits that already exist
# ---------------------------------------------------------------------------------------------------


class _FullKLFromLogitsFunction(torch.autograd.Function):
    """Per-row KL(softmax(z / T) || softmax(z_ref / T)) over row chunks of existing logits. Saves no (N, V) tensor
    of its own (only references to the inputs and three floats per row); the backward writes
    g p (log p - log q - KL) / T chunk by chunk into the one (N, V) gradient autograd needs anyway."""

    @staticmethod
    def forward(ctx, logits, ref_logits, rows, temperature, chunk_size):
        ctx.set_materialize_grads(False)
        dtype, device = _compute_dtype(logits), logits.device
        n = logits.shape[0] if rows is None else rows.shape[0]
        inv_t = 1.0 / temperature
        lse_p = torch.empty((n,), dtype=dtype, device=device)
        lse_q, kl = torch.empty_like(lse_p), torch.empty_like(lse_p)
        scratch = _Scratch(3, min(n, chunk_size), logits.shape[1], dtype, device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            stats = _OnlineKL(e - s, dtype, device)
            z, q = _FullKLFromLogitsFunction._tiles(logits, ref_logits, rows, s, e, inv_t, scratch)
            stats.fold(z, q, scratch(2, e - s, logits.shape[1]))
            lse_p[s:e], lse_q[s:e], kl[s:e] = stats.finish()
            del stats
        del scratch
        ctx.save_for_backward(logits, ref_logits, rows, lse_p, lse_q, kl)
        ctx.config = (temperature, chunk_size)
        return kl

    @staticmethod
    def _tiles(logits, ref_logits, rows, s, e, inv_t, scratch):
        """Rows s:e (of the selection) of both logits, in the compute dtype, divided by T, in scratch buffers 0, 1."""
        out = []
        for i, x in enumerate((logits, ref_logits)):
            t = scratch(i, e - s, x.shape[1])
            if rows is None:
                t.copy_(x[s:e])
            elif x.dtype == t.dtype:
                torch.index_select(x, 0, rows[s:e], out=t)
            else:
                t.copy_(x.index_select(0, rows[s:e]))
            out.append(t if inv_t == 1.0 else t.mul_(inv_t))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl):
        logits, ref_logits, rows, lse_p, lse_q, kl = ctx.saved_tensors
        if grad_kl is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        temperature, chunk_size = ctx.config
        dtype, inv_t, n = _compute_dtype(logits), 1.0 / temperature, lse_p.shape[0]
        scale, shift = grad_kl.to(dtype) * inv_t, lse_p - lse_q + kl
        grad = torch.zeros_like(logits)  # the (N, V) gradient itself: unavoidable, the input is (N, V)
        scratch = _Scratch(2, min(n, chunk_size), logits.shape[1], dtype, logits.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z, q = _FullKLFromLogitsFunction._tiles(logits, ref_logits, rows, s, e, inv_t, scratch)
            g = _grad_tile(z, q, lse_p[s:e], shift[s:e], scale[s:e])
            if rows is None:
                grad[s:e].copy_(g)
            else:
                grad[rows[s:e]] = g.to(grad.dtype)
        del scratch
        return grad, None, None, None, None


def full_kl_from_logits(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Exact per-position KL(pi(.|s) || pi_ref(.|s)) from logits ``(..., V)`` that already exist, in row chunks
    (the paper's way (1) of section 4, eq. 22, appendix A; NOTES §1-3). Same value as ``kl.full_kl`` (with
    ``temperature=1``), but none of its four (N, V) intermediates: per chunk only.

    ``ref_logits`` (same shape) is a constant: no gradient. ``mask`` ``(...)``: rows where it is 0 are skipped,
    exactly 0 with zero gradient. Returns ``(...)`` float32 (float64 kept); gradient to ``logits`` is
    ``p (log p - log q - KL) / T`` per row (module docstring). Pass contiguous logits: a non-contiguous input is
    copied whole by the flattening reshape.
    """
    _check_chunks(chunk_size, None, temperature)
    if logits.shape != ref_logits.shape or logits.dim() < 1:
        raise ValueError(f"logits and ref_logits must have the same (..., V) shape, got {tuple(logits.shape)} and "
                         f"{tuple(ref_logits.shape)}.")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    selected = _selected_rows(mask, lead, logits.device)
    kl = _FullKLFromLogitsFunction.apply(
        logits.reshape(-1, vocab), ref_logits.detach().reshape(-1, vocab), selected, float(temperature), chunk_size
    )
    return _scatter_rows(kl, selected, lead)


# ---------------------------------------------------------------------------------------------------
# Measuring the bound (used by tests/test_full_kl.py and benchmarks/full_kl_memory.py)
# ---------------------------------------------------------------------------------------------------


class TensorMemoryTracker(TorchDispatchMode):
    """Records every tensor storage that an aten op allocates while the mode is active (forward *and* backward: the
    autograd engine runs the backward ops under the mode), and the peak of their summed live bytes.

    A storage counts from the op that returns it until it is freed (a ``weakref.finalize`` on the storage, whose
    Python object torch keeps unique). Views and in-place results of tensors that existed before (inputs, weights)
    are not new memory and are not counted. Temporaries *inside* one aten kernel are invisible, so this measures the
    live set of tensors, not the allocator's high-water mark.

    Attributes: ``peak_bytes``, ``current_bytes`` (still live at exit), ``largest_bytes`` and ``largest_op`` (the
    single biggest allocation), ``count``.
    """

    def __init__(self):
        super().__init__()
        self.current_bytes = self.peak_bytes = self.largest_bytes = self.count = 0
        self.largest_op: str | None = None
        self._live: dict[int, int] = {}

    def _free(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._live or key in inputs:
                continue
            self._live[key] = nbytes
            weakref.finalize(storage, self._free, key, nbytes)
            self.count += 1
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            if nbytes > self.largest_bytes:
                self.largest_bytes, self.largest_op = nbytes, str(func)
        return out
