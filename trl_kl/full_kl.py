"""Exact per-state KL over the full vocabulary: a thin wrapper over TRL 1.16's chunked divergence kernel.

The paper names three ways to get GRPO's KL right (section 4; docs/theory.md#full-kl): (1) "exact KL over the full
vocabulary" (costly in memory), (2) strictly on-policy with a large batch, (3) off-policy GRPO with the KL in the
reward. This module is way (1). At every visited state s_t it computes

    KL_t = KL(pi_theta(.|s_t) || pi_ref(.|s_t)) = sum_v p_v (log p_v - log q_v)
    with p = pi_theta(.|s_t), q = pi_ref(.|s_t)

summed over the whole vocabulary (eq. 42-43, appendix A.1) instead of estimated from the one sampled token
(k1/k2/k3, docs/theory.md#estimators). As a loss (``kl_placement='loss'``, docs/theory.md#placement; the only sound
placement for 'full', see ``kl.SOUNDNESS``) its gradient is the exact per-state KL gradient, sum_a grad pi(a)
log(pi/pi_ref)(a) (appendix A.2, eq. 44-49; eq. 22 of section 3.1, "full vocabulary"): even with one sample it is
the expectation itself, not a Monte-Carlo estimate of it. It is still the gradient of the *per-state* KL, not of the
whole-sequence KL (docs/theory.md#sequence-kl).

Gradient with respect to the policy logits z of one row (p = softmax(z), log q fixed)::

    dKL/dz_v = sum_u p_u (delta_uv - p_v) (log p_u - log q_u) + sum_u p_u (delta_uv - p_v)
             = p_v (log p_v - log q_v - KL)

(appendix A.2's result, eq. 22 at pi_old = pi_theta, in logit space: E_{a~p}[(log p/q)(a) grad_z log p(a)] with
grad_z log p(a) = e_a - p). With z = s * (h W^T + b) / T it reaches h, W and b through the projection; the reference
is a constant.

The computation is TRL's, not ours. ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` with ``beta=1.0``
is KL(student || teacher) = KL(pi || pi_ref) per token (TRL's "reverse KL"), from both models' hidden states and LM
heads, in tiles of ``TOKEN_CHUNK_SIZE`` rows x ``VOCAB_CHUNK_SIZE`` vocabulary columns with an online log-sum-exp;
the backward recomputes the tiles and applies exactly the gradient above (its ``MODE == 1``). It also handles
``logit_scale`` (Cohere, Granite, ...), final-logit softcapping (Gemma), ZeRO-3 sharded heads
(``maybe_gather_lm_head_ctx``) and Triton kernels on GPU. This wrapper only adds what a GRPO KL term needs around
it: leading batch dimensions, a mask that *selects* rows (padding is never projected, so even NaN there cannot
leak), a float32 ``(B, T)`` result, and the tile size as an argument. The arithmetic is always float32 (float64
inputs are accepted but computed in float32, so results agree with a float64 reference to ~1e-6 relative, not
1e-12).

Tile size and memory. TRL 1.16 fixes the tile at 4096 x 32768 (module constants, read when its forward and its
backward run). Its working set is two float32 tile buffers plus, in the torch fallback that runs on CPU (and on GPU
without Triton), the temporaries of ``_stats_tile`` / ``_backward_tile``: about 11 tile-sized tensors live at once
(``benchmarks/full_kl_memory.py``, docs/performance.md). With Triton only the two buffers remain. Either way the
working set is independent of N once N >= the tile's rows, but relative to one chunk's logits (rows x V) it is 11 x
32768 / V on CPU: above the naive computation for V = 32000. ``token_chunk_size`` / ``vocab_chunk_size`` choose the
tile: ``trl_kl._trl.chunked_divergence`` runs TRL's autograd function with the module constants set to them while
its forward and its backward run (under a lock, restored after), so a vocabulary chunk of about V / 12 keeps the CPU
working set within 1.2 x one chunk's logits (docs/performance.md); None keeps TRL's values, the right choice on a
GPU with Triton and a large vocabulary.

References: the paper (Liu, Liu & Liu 2025, "Rethinking KL Divergence in RLHF: From Single Sample to Mini-Batch to
Expectation"; docs/theory.md#references): section 4's way (1), eq. 22 (section 3.1), appendix A.
"""

from __future__ import annotations

import math

import torch

from . import _trl

__all__ = ["REVERSE_KL_BETA", "chunked_full_kl", "validate_tile_size"]

REVERSE_KL_BETA = 1.0
"""``beta`` of TRL's ``ChunkedDivergenceFunction`` that selects KL(student || teacher) = KL(pi || pi_ref), which TRL
calls the reverse KL (0.0 selects KL(teacher || student), anything in between the generalized JSD)."""


def validate_tile_size(token_chunk_size: int | None, vocab_chunk_size: int | None) -> None:
    """Both None (TRL's tile) or ints >= 1."""
    for name, value in (("token_chunk_size", token_chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name} must be None (TRL's default tile) or an int >= 1, got {value!r}.")


def _selected_rows(mask: torch.Tensor | None, lead: torch.Size, device: torch.device) -> torch.Tensor | None:
    """Flat indices of the rows to score, or None for all of them."""
    if mask is None:
        return None
    if mask.shape != lead:
        raise ValueError(f"mask must have the positions' shape {tuple(lead)}, got {tuple(mask.shape)}.")
    return mask.reshape(-1).to(device=device).bool().nonzero().squeeze(-1)


def _select(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``x`` flattened to ``(N, last)`` and, with a selection, only those rows (a gather: the others are never read,
    and their gradient is exactly 0)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if rows is None else flat.index_select(0, rows)


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor | None, lead: torch.Size) -> torch.Tensor:
    """Per-row values back to the positions' shape, exactly 0 on unselected rows (by selection, not a product)."""
    if rows is None:
        return values.reshape(lead)
    return values.new_zeros(lead.numel()).index_copy(0, rows, values).reshape(lead)


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")


def chunked_full_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    ref_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    ref_logit_scale: float = 1.0,
    ref_final_logit_softcapping: float | None = None,
    token_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
) -> torch.Tensor:
    """Exact per-position KL(pi_theta(.|s_t) || pi_ref(.|s_t)) over the full vocabulary, from both models' final
    hidden states and LM heads, without materialising (N, V) logits (the paper's way (1) of section 4, eq. 22,
    appendix A; docs/theory.md#full-kl). Computed by TRL's ``ChunkedDivergenceFunction`` with ``beta=1.0`` (module
    docstring).

    Args:
        hidden: policy final hidden states ``(..., H)`` (e.g. ``(B, T, H)``: the states that predict the completion
            tokens). ``weight``: policy LM head ``(V, H)``; ``bias``: optional ``(V,)``. Gradients flow to these.
        ref_hidden, ref_weight, ref_bias: the reference's hidden states ``(..., H_ref)`` (same leading shape; the
            width may differ), head ``(V, H_ref)`` and bias. Constants: TRL's kernel gives the teacher no gradient,
            even when ``ref_weight`` is the policy's own head parameter (a PEFT reference with the adapter disabled).
        mask: optional ``(...)`` bool/float: rows where it is 0 are not computed at all (their hidden states are
            not even read); they get exactly 0 and zero gradient, so padding may hold anything, even NaN.
        temperature: both models' logits are divided by it (as TRL's fused LM head does), after scale/softcap.
        logit_scale, final_logit_softcapping (and ``ref_*``): each model's logit post-processing from its config,
            ``z = softcap * tanh(scale * logits / softcap)`` (Gemma, Cohere, Granite, ...), applied by TRL's kernel.
        token_chunk_size, vocab_chunk_size: the tile, rows x vocabulary columns (None: TRL's 4096 x 32768). The
            working set is a fixed number of tiles whatever N is (module docstring): about V / 12 columns keeps it
            within 1.2 x one chunk's logits on CPU.

    Returns:
        ``(...)`` float32 KL per position. Differentiable in ``hidden``, ``weight`` and ``bias``, with
        dKL/dz = p (log p - log q - KL) per row (module docstring); not twice.
    """
    _check_temperature(temperature)
    validate_tile_size(token_chunk_size, vocab_chunk_size)
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden (..., H) and weight (V, H) do not match: {tuple(hidden.shape)}, {tuple(weight.shape)}."
        )
    vocab, lead = weight.shape[0], hidden.shape[:-1]
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}.")
    if ref_hidden.shape[:-1] != lead:
        raise ValueError(f"ref_hidden must have hidden's leading shape {tuple(lead)}, got {tuple(ref_hidden.shape)}.")
    if ref_weight.shape != (vocab, ref_hidden.shape[-1]):
        raise ValueError(
            f"ref_weight must have shape ({vocab}, {ref_hidden.shape[-1]}) (same vocabulary as the policy), "
            f"got {tuple(ref_weight.shape)}."
        )
    if ref_bias is not None and ref_bias.shape != (vocab,):
        raise ValueError(f"ref_bias must have shape ({vocab},), got {tuple(ref_bias.shape)}.")

    rows = _selected_rows(mask, lead, hidden.device)
    # ref_weight / ref_bias go in as they are (not detached): under ZeRO-3 TRL's kernel must see the Parameter to
    # gather it, and it returns no gradient for the teacher anyway.
    kl, _entropy = _trl.chunked_divergence(
        _select(hidden, rows),
        weight,
        bias,
        _select(ref_hidden.detach(), rows),
        ref_weight,
        ref_bias,
        beta=REVERSE_KL_BETA,
        temperature=float(temperature),
        logit_scale=logit_scale,
        final_logit_softcapping=final_logit_softcapping,
        ref_logit_scale=ref_logit_scale,
        ref_final_logit_softcapping=ref_final_logit_softcapping,
        token_chunk_size=token_chunk_size,
        vocab_chunk_size=vocab_chunk_size,
    )
    return _scatter_rows(kl.float(), rows, lead)
