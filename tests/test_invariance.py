"""Batch-layout invariance of trl_kl's GRPO gradient (issue #9, docs/reliability.md).

For one fixed global batch of 8 rollouts (4 prompts x 2 completions, old/ref log-probs at seeded offsets from
the policy's), the gradient accumulated over one optimizer step must not depend on how TRL cuts that batch:

* gradient_accumulation_steps 1 vs 4 (steps_per_generation = gradient_accumulation_steps, TRL's default;
  num_iterations=2 so that TRL keeps the old log-probs: the off-policy ratio and clip are exercised);
* steps_per_generation 1 vs 2 at gradient_accumulation_steps=2, num_iterations=1 (TRL then keeps no old
  log-probs: on-policy);
* 1 vs 2 processes: tests/test_grpo_distributed.py::test_two_processes_match_one (torchrun, not repeated here).

for each KL placement (k1 in the reward with the return_to_go and token scopes, k2 as a loss) and each TRL
loss_type that takes a per-token KL (vespo is refused by the config). The micro-batches are made with TRL's
own ``shuffle_sequence_dict`` + ``split_tensor_dict``, as ``GRPOTrainer._prepare_inputs`` does, and each is fed
to ``_compute_loss`` with ``current_gradient_accumulation_steps`` and ``num_items_in_batch`` set as in training.
The model and the batch are float64, so that a difference is the normalisation's, not float32 summation
order's; TRL 1.16's chunked log-prob kernel (trl/kernels/chunked_logprob.py) still forms the logits and the
log-softmax in float32 and returns float32 log-probs, which leaves a residual of ~1e-7 relative (measured
max|diff| <= 1.2e-7 for gradients of max ~1), far below TOL.

Where TRL's own normaliser is not a function of the whole step's batch, the gradient is *not* invariant and the
tests assert that it differs (NOT_GA_INVARIANT, NOT_SPG_INVARIANT): the guarantee is tested both ways.
Run with ``-s`` to print the measured maximum differences quoted in docs/reliability.md.
"""

import warnings

import pytest
import torch
from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

from grpo_batch import fixed_batch, make_config, make_trainer

ROWS = 8  # the global batch: 4 prompts x 2 completions, completion lengths 3,3,3,2,3,2,4,3 tokens
TOL = 1e-5  # max abs gradient difference allowed for an invariant layout (measured <= 1.2e-7, see above)
DIFFERS = 1e-3  # a non-invariant layout must move the gradient by more than this, relative to its max (measured
# 5.7e-2 to 3.2e-1)

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"]
PLACEMENTS = {
    "reward-return_to_go": dict(kl_estimator="k1", kl_placement="reward", kl_reward_scope="return_to_go"),
    "reward-token": dict(kl_estimator="k1", kl_placement="reward", kl_reward_scope="token"),
    "loss-k2": dict(kl_estimator="k2", kl_placement="loss"),
}
# bnpo: a token mean per micro-batch, then a mean over micro-batches; micro-batches with different token counts
# weigh their tokens differently than one batch does.
NOT_GA_INVARIANT = {"bnpo"}
# dapo, cispo: normalised by num_items_in_batch, the token count of the *generation* batch. With
# steps_per_generation=1 < gradient_accumulation_steps each micro-batch is its own generation batch, so the step's
# gradient is a mean of per-generation token means instead of one token mean over the step.
# bnpo: with steps_per_generation=2 TRL shuffles the generation batch before cutting it, so the micro-batches (and
# their token counts, hence bnpo's per-micro-batch token means) are not the two generation batches of spg=1.
NOT_SPG_INVARIANT = {"bnpo", "dapo", "cispo"}

# layout name -> (config overrides, gradient_accumulation_steps)
LAYOUTS = {
    "ga1": (dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, num_iterations=2), 1),
    "ga4": (dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, num_iterations=2), 4),
    "spg1": (dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=1), 2),
    "spg2": (dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=2), 2),
}


def _config(tmp_path, layout, loss_type, placement):
    overrides, _ = LAYOUTS[layout]
    extra = dict(epsilon_high=4.0) if loss_type == "cispo" else {}  # cispo's epsilon_high is its IS-ratio cap
    return make_config(tmp_path, loss_type=loss_type, **PLACEMENTS[placement], **overrides, **extra)


@pytest.fixture(scope="module")
def trainers(toy_path, tmp_path_factory):
    """One float64 trainer per layout, and every (layout, loss_type, placement) config, all built up front:
    building a TrainingArguments resets accelerate's shared state, which a live trainer's forward needs."""
    tmp = tmp_path_factory.mktemp("invariance")
    configs = {
        (layout, loss_type, placement): _config(tmp, layout, loss_type, placement)
        for layout in LAYOUTS for loss_type in LOSS_TYPES for placement in PLACEMENTS
    }
    by_layout = {}
    for layout, (_, accumulation) in LAYOUTS.items():
        trainer = make_trainer(toy_path, configs[layout, "dapo", "reward-return_to_go"])
        trainer.model.double()
        trainer.current_gradient_accumulation_steps = accumulation
        by_layout[layout] = trainer
    return configs, by_layout


def _configure(trainer, args):
    """What ``GRPOTrainer.__init__`` reads from ``args`` for the loss (the rest is equal across these configs)."""
    trainer.args = args
    trainer.loss_type = args.loss_type
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer.beta = args.beta
    trainer.kl_settings, trainer.kl_coef = args.kl_settings(), args.beta
    return trainer


@pytest.fixture(scope="module")
def global_batch(trainers):
    """The fixed global batch, in float64, with and without old log-probs (off- and on-policy)."""
    _, by_layout = trainers
    batch, _ = fixed_batch(by_layout["ga1"], rows=ROWS)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    on_policy = {k: v for k, v in batch.items() if k != "old_per_token_logps"}
    return batch, on_policy


def _generation_batches(batch, rows_per_generation):
    """Consecutive generation batches of whole prompt groups, each with its own token count."""
    out = []
    for start in range(0, ROWS, rows_per_generation):
        part = {k: v[start : start + rows_per_generation] for k, v in batch.items() if k != "num_items_in_batch"}
        part["num_items_in_batch"] = part["completion_mask"].sum()
        out.append(part)
    return out


def _step_gradient(trainer, generation_batches, seed=0):
    """Gradient accumulated over one optimizer step, TRL's way: each generation batch is shuffled and split into
    steps_per_generation micro-batches (``_prepare_inputs``); every micro-batch's loss is back-propagated."""
    trainer.model.zero_grad()
    micro_batches = 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for generation in generation_batches:
            for micro in split_tensor_dict(shuffle_sequence_dict(generation), trainer.args.steps_per_generation):
                trainer._compute_loss(trainer.model, micro).backward()
                micro_batches += 1
    assert micro_batches == trainer.current_gradient_accumulation_steps
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])


def _compare(a, b, invariant, label):
    diff = (a - b).abs().max().item()
    scale = a.abs().max().item()
    print(f"\n{label}: max|grad diff| = {diff:.2e} (max|grad| = {scale:.2e}, relative {diff / scale:.2e})")
    if invariant:
        assert diff <= TOL, f"{label}: gradient changed by {diff:.3e}"
    else:
        assert diff > DIFFERS * scale, f"{label}: expected TRL's normaliser to break invariance, diff {diff:.3e}"


def _layout_pair(trainers, first, second, loss_type, placement):
    configs, by_layout = trainers
    return [_configure(by_layout[name], configs[name, loss_type, placement]) for name in (first, second)]


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_accumulation_1_vs_4(trainers, global_batch, loss_type, placement):
    """One micro-batch of 8 vs four of 2 (off-policy): same step gradient, except bnpo."""
    batch, _ = global_batch
    one, four = _layout_pair(trainers, "ga1", "ga4", loss_type, placement)
    assert (one.args.steps_per_generation, four.args.steps_per_generation) == (1, 4)  # TRL's default: = GA
    whole = _generation_batches(batch, ROWS)  # one generation batch of 8 in both layouts
    _compare(
        _step_gradient(one, whole), _step_gradient(four, whole), loss_type not in NOT_GA_INVARIANT,
        f"GA 1 vs 4 [{loss_type}, {placement}]",
    )


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_steps_per_generation_1_vs_2(trainers, global_batch, loss_type, placement):
    """GA=2, num_iterations=1 (on-policy): two generation batches of 4 vs one of 8 cut in two; same step
    gradient, except dapo and cispo (normalised by the generation batch's token count) and bnpo (TRL shuffles the
    generation batch before cutting it, so the micro-batches differ)."""
    _, batch = global_batch
    spg1, spg2 = _layout_pair(trainers, "spg1", "spg2", loss_type, placement)
    _compare(
        _step_gradient(spg1, _generation_batches(batch, 4)), _step_gradient(spg2, _generation_batches(batch, ROWS)),
        loss_type not in NOT_SPG_INVARIANT, f"spg 1 vs 2 [{loss_type}, {placement}]",
    )


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize(
    "loss_type, first, second",
    [("bnpo", "ga1", "ga4"), ("bnpo", "spg1", "spg2"), ("dapo", "spg1", "spg2"), ("cispo", "spg1", "spg2")],
)
def test_non_invariance_is_only_the_token_counts(trainers, global_batch, loss_type, first, second, placement):
    """Where a layout changes the gradient, it is only through the token counts of the micro-/generation batches:
    with every completion cut to 2 loss tokens (all those counts equal) the two layouts agree again."""
    batch = global_batch[0] if first == "ga1" else global_batch[1]
    mask = batch["completion_mask"].clone()
    mask[:, 2:] = 0
    batch = {**batch, "completion_mask": mask}
    rows = {"ga1": ROWS, "ga4": ROWS, "spg1": 4, "spg2": ROWS}
    a, b = _layout_pair(trainers, first, second, loss_type, placement)
    _compare(
        _step_gradient(a, _generation_batches(batch, rows[first])),
        _step_gradient(b, _generation_batches(batch, rows[second])),
        True, f"{first} vs {second} [{loss_type}, {placement}, equal token counts]",
    )


def test_reconfigured_trainer_equals_a_fresh_one(trainers, global_batch, toy_path, tmp_path):
    """``_configure`` (reusing one trainer across parametrizations) computes what a freshly built trainer does."""
    configs, by_layout = trainers
    batch, _ = global_batch
    reused = _configure(by_layout["ga4"], configs["ga4", "cispo", "loss-k2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = make_trainer(toy_path, _config(tmp_path, "ga4", "cispo", "loss-k2"))
    fresh.model.double()
    fresh.current_gradient_accumulation_steps = 4
    whole = _generation_batches(batch, ROWS)
    assert torch.equal(_step_gradient(reused, whole), _step_gradient(fresh, whole))


def test_the_default_loss_type_is_invariant_to_every_layout():
    """trl_kl's default loss_type is dr_grpo (TRL's is dapo): invariant to gradient accumulation, processes and
    steps_per_generation (the table above), while dapo is not invariant to steps_per_generation."""
    import trl

    from trl_kl import GRPOConfig

    assert GRPOConfig.__dataclass_fields__["loss_type"].default == "dr_grpo"
    assert trl.GRPOConfig.__dataclass_fields__["loss_type"].default == "dapo"
    assert "dr_grpo" not in NOT_GA_INVARIANT and "dr_grpo" not in NOT_SPG_INVARIANT
    assert "dapo" in NOT_SPG_INVARIANT
