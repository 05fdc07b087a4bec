"""kl_estimator="full" in trl_kl.GRPOTrainer: the exact per-state KL over the vocabulary as a loss term (section 4,
way (1)), from the policy's own forward and one extra reference forward, checked against full logits on the toy."""

import warnings

import pytest
import torch

from grpo_batch import B, fixed_batch, make_config, make_trainer
import trl_kl.grpo as grpo_module
from trl_kl import _trl, kl

BETA, EPS = 0.1, 0.2


def _perturb_reference(trainer, scale=0.05):
    """The reference starts as a copy of the policy (KL 0 everywhere): move it so the KL term has some size."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.ref_model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _ids(batch):
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    return input_ids, attention, batch["completion_ids"].size(1)


def _expected_loss(trainer, batch):
    """TRL's surrogate ('grpo': -min(rho A, clip(rho) A), mean over sequences of the token mean) plus
    beta * the same aggregate of the exact KL, naively from both models' full logits."""
    input_ids, attention, K = _ids(batch)
    mask = batch["completion_mask"].float()
    logps = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention, K)[0]
    rho = torch.exp(logps - batch["old_per_token_logps"])
    A = batch["advantages"][:, None]
    surrogate = -torch.min(rho * A, rho.clamp(1 - EPS, 1 + EPS) * A)
    logits = trainer.model(input_ids=input_ids, attention_mask=attention).logits[:, -K - 1 : -1]
    with torch.no_grad():
        ref_logits = trainer.ref_model(input_ids=input_ids, attention_mask=attention).logits[:, -K - 1 : -1]
    exact = kl.full_kl(logits / trainer.temperature, ref_logits / trainer.temperature)
    per_token = surrogate + BETA * exact
    return ((per_token * mask).sum(1) / mask.sum(1)).mean(), exact


@pytest.mark.parametrize("tile", [{}, dict(full_kl_token_chunk_size=3, full_kl_vocab_chunk_size=4)],
                         ids=["trl-tile", "small-tile"])
def test_full_kl_loss_matches_surrogate_plus_naive_exact_kl(toy_path, tmp_path, tile, monkeypatch):
    """TRL's tile and a tile of 3 tokens x 4 of the toy's vocabulary columns (many tiles both ways) alike."""
    trainer = make_trainer(
        toy_path, make_config(tmp_path, kl_estimator="full", kl_placement="loss", num_iterations=2, **tile)
    )
    seen, real = {}, grpo_module.chunked_full_kl
    monkeypatch.setattr(grpo_module, "chunked_full_kl", lambda **kwargs: seen.update(kwargs) or real(**kwargs))
    _perturb_reference(trainer)
    batch, _ = fixed_batch(trainer)
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    loss = trainer._compute_loss(trainer.model, batch)
    grads = torch.autograd.grad(loss, params)
    expected, exact = _expected_loss(trainer, batch)
    expected_grads = torch.autograd.grad(expected, params)

    mask = batch["completion_mask"].bool()
    assert exact[mask].min() > 1e-3  # a real KL term, not a vanishing one
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    logged = trainer._metrics["train"]["kl/loss_term"][-1]  # the masked mean of the exact KL
    assert abs(logged - exact[mask].mean().item()) < 1e-5
    assert not any(p.grad is not None for p in trainer.ref_model.parameters())
    assert (seen["token_chunk_size"], seen["vocab_chunk_size"]) == (
        tile.get("full_kl_token_chunk_size"), tile.get("full_kl_vocab_chunk_size"))


def test_hidden_states_are_concatenated_over_trl_micro_batches(toy_path, tmp_path):
    """TRL's forward in micro-batches of 1, 3 or all rows: the exact KL's inputs (the policy's hidden states from
    that forward, the reference's from its own forward in the same micro-batches) are the same."""
    trainer = make_trainer(toy_path, make_config(tmp_path, kl_estimator="full", kl_placement="loss"))
    batch, _ = fixed_batch(trainer)
    input_ids, attention, K = _ids(batch)
    captured = {}
    for batch_size in (B, 1, 3):
        def ready(forward, batch_size=batch_size):
            captured[batch_size] = trainer._full_kl_args(forward)

        with _trl.on_policy_forward(trainer, ready, capture_hidden_states=True):
            trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention, K, batch_size=batch_size)
        assert captured[batch_size]["hidden"].shape[:2] == (B, K)
        assert captured[batch_size]["ref_hidden"].shape[:2] == (B, K)
    for batch_size in (1, 3):
        for key in ("hidden", "ref_hidden"):
            torch.testing.assert_close(captured[batch_size][key], captured[B][key], rtol=1e-5, atol=1e-6)


def test_full_kl_trains_two_steps(toy_path, tmp_path):
    args = make_config(
        tmp_path, kl_estimator="full", kl_placement="loss", max_steps=2, logging_steps=1, save_strategy="no",
        learning_rate=1e-3,
    )
    trainer = make_trainer(toy_path, args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(rows) == 2
    penalties = [row["kl/loss_term"] for row in rows]
    assert all(torch.isfinite(torch.tensor(p)) and p >= 0 for p in penalties)
    assert penalties[0] == 0.0 or abs(penalties[0]) < 1e-6  # step 1: the policy is still the reference
