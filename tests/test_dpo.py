"""trl_kl.DPOConfig / DPOTrainer: the SFT term, the resampling loop, staleness, checkpoint/resume (docs/theory.md#dpo)."""

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import trl
from datasets import Dataset
from distributed_run import torchrun
from peft import LoraConfig

from trl_kl import DPOConfig as LazyDPOConfig
from trl_kl import DPOTrainer as LazyDPOTrainer
from trl_kl.distributed import end_distributed
from trl_kl.dpo import DPOConfig, DPOTrainer, build_preference_pairs
from trl_kl.toy import closeness_reward, correctness_reward, make_dataset

BETA = 0.1


def offline_pairs(n: int, seed: int = 0) -> Dataset:
    """Offline preference data 'from another model': chosen = the correct sum, rejected = a wrong one."""
    problems = make_dataset(n, seed)
    return Dataset.from_dict(
        {
            "prompt": problems["prompt"],
            "chosen": problems["answer"],
            "rejected": [str(int(a) + 1 + i % 7) for i, a in enumerate(problems["answer"])],
            "answer": problems["answer"],
        }
    )


def make_config(tmp_path, cls=DPOConfig, **overrides) -> DPOConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        beta=BETA,
        max_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 autocast; these tests compare float32 numbers
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    if cls is DPOConfig:
        base.update(resample_max_new_tokens=4)
    base.update(overrides)
    return cls(**base)


def make_trainer(toy_path, args, dataset=None, cls=DPOTrainer, **kwargs):
    if cls is DPOTrainer and getattr(args, "resample_every", None) is not None:
        kwargs.setdefault("reward_funcs", [closeness_reward])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model=toy_path, args=args, train_dataset=dataset if dataset is not None else offline_pairs(16), **kwargs)


def logged(trainer, key):
    return {row["step"]: row[key] for row in trainer.state.log_history if key in row}


def train(trainer, resume=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer


# ---- imports and config -------------------------------------------------------------------------------


def test_public_imports():
    assert LazyDPOConfig is DPOConfig and LazyDPOTrainer is DPOTrainer
    assert issubclass(DPOConfig, trl.DPOConfig) and issubclass(DPOTrainer, trl.DPOTrainer)


def test_sft_weight_maps_onto_trl_loss_type_and_weights(tmp_path):
    args = make_config(tmp_path, sft_weight=0.5)
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5]
    args = make_config(tmp_path, sft_weight=0.25, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 2.0])
    assert args.loss_type == ["sigmoid", "ipo", "sft"] and args.loss_weights == [1.0, 2.0, 0.25]
    # rebuilding a config from its fields (e.g. a saved one) does not add a second SFT term
    again = make_config(tmp_path, sft_weight=0.25, loss_type=args.loss_type, loss_weights=args.loss_weights)
    assert again.loss_type == ["sigmoid", "ipo", "sft"] and again.loss_weights == [1.0, 2.0, 0.25]
    plain = make_config(tmp_path)
    assert plain.loss_type == ["sigmoid"] and plain.loss_weights is None  # sft_weight=0: stock TRL


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(resample_every=0), "resample_every must be an integer >= 1"),
        (dict(resample_every=2.5), "resample_every must be an integer >= 1"),
        (dict(resample_every=2, resample_num_completions=1), "resample_num_completions must be an integer >= 2"),
        (dict(resample_every=2, resample_mix=1.5), r"resample_mix must be in \[0, 1\]"),
        (dict(resample_every=2, resample_mix=-0.1), r"resample_mix must be in \[0, 1\]"),
        (dict(sft_weight=-1.0), "sft_weight must be a finite number >= 0"),
        (dict(sft_weight=float("nan")), "sft_weight must be a finite number >= 0"),
        (dict(resample_every=2, resample_temperature=0.0), "resample_temperature must be a finite number > 0"),
        (dict(resample_every=2, resample_max_new_tokens=0), "resample_max_new_tokens must be an integer >= 1"),
        (dict(resample_every=2, resample_num_prompts=0), "resample_num_prompts must be an integer >= 1 or None"),
        (dict(resample_mix=0.5), "only acts at a refresh: set resample_every"),
        (dict(resample_update_reference=True), "only acts at a refresh: set resample_every"),
        (dict(sft_weight=0.5, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2]), "both ask for an SFT term"),
        (dict(resample_every=2, resample_update_reference=True, sync_ref_model=True), "both move the reference"),
    ],
)
def test_config_validation(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)


def test_trainer_requires_reward_funcs_when_resampling(toy_path, tmp_path):
    with pytest.raises(ValueError, match="pass reward_funcs"):
        make_trainer(toy_path, make_config(tmp_path, resample_every=2), reward_funcs=None)
    with pytest.raises(ValueError, match="reward_funcs only label resampled completions"):
        make_trainer(toy_path, make_config(tmp_path), reward_funcs=[closeness_reward])
    with pytest.raises(TypeError, match="needs a trl_kl.DPOConfig"):
        make_trainer(toy_path, make_config(tmp_path, cls=trl.DPOConfig))
    with pytest.raises(ValueError, match="no 'chosen'/'rejected' columns"):
        prompts = make_dataset(8, 0)
        make_trainer(toy_path, make_config(tmp_path, resample_every=2, resample_mix=0.5), dataset=prompts)
    with pytest.raises(NotImplementedError, match="'tools' / 'chat_template_kwargs'"):
        chat = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1+2="}]], "answer": ["3"], "tools": ["[]"]})
        make_trainer(toy_path, make_config(tmp_path, resample_every=2), dataset=chat)


# ---- pairing ------------------------------------------------------------------------------------------


def test_build_preference_pairs_best_vs_worst_with_ties_skipped():
    prompts = ["a", "b", "c", "d", "e"]
    completions = [["x", "y", "z"], ["p", "q"], ["u", "v", "w"], ["m", "n", "o"], ["s", "s"]]
    rewards = [
        [0.2, 0.9, 0.1],  # best y, worst z
        [0.5, 0.5],  # tie
        [1.0, float("nan"), 1.0],  # the scored ones tie
        [0.3, 0.7, 0.7],  # two best: the first one (n); worst m
        [0.0, 1.0],  # different rewards but the same text: no preference either
    ]
    pairs, ties = build_preference_pairs(prompts, completions, rewards)
    assert ties == 3
    assert [(p["index"], p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [(0, "a", "y", "z"), (3, "d", "n", "m")]
    assert [(p["chosen_reward"], p["rejected_reward"]) for p in pairs] == [(0.9, 0.1), (0.7, 0.3)]
    assert build_preference_pairs(["a"], [["x", "y"]], [[None, 1.0]]) == ([], 1)  # one scored completion
    with pytest.raises(ValueError, match="one entry per prompt"):
        build_preference_pairs(["a"], [], [])


# ---- the SFT term is TRL's -----------------------------------------------------------------------------


def _hand_sequence_logps(model, batch):
    """Per-token log-probs of the completion tokens from plain logits (no fused head), and their mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    token_logps = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].float()
    return token_logps * mask, mask


def test_sft_weight_loss_is_dpo_sigmoid_plus_weighted_chosen_nll(toy_path, tmp_path):
    dataset = offline_pairs(8)
    ours = make_trainer(toy_path, make_config(tmp_path, sft_weight=0.7), dataset)
    stock = make_trainer(
        toy_path,
        make_config(tmp_path, cls=trl.DPOConfig, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7]),
        dataset,
        cls=trl.DPOTrainer,
    )
    rows = ours.train_dataset.select(range(4))
    batch = ours.data_collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows])
    # move the policy away from the reference, so the DPO term is not the trivial log 2
    with torch.no_grad():
        for trainer in (ours, stock):
            for param in trainer.model.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
            trainer.model.train()
    loss = ours.compute_loss(ours.model, dict(batch))

    with torch.no_grad():
        policy, mask = _hand_sequence_logps(ours.model, batch)
        reference, _ = _hand_sequence_logps(ours.ref_model, batch)
    chosen, rejected = policy.sum(1).chunk(2)
    ref_chosen, ref_rejected = reference.sum(1).chunk(2)
    dpo = -F.logsigmoid(BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    half = mask.size(0) // 2
    nll = -policy[:half].sum() / mask[:half].sum()  # mean NLL over the chosen answers' tokens
    assert dpo.item() != pytest.approx(math.log(2), abs=1e-3)
    torch.testing.assert_close(loss.detach(), dpo + 0.7 * nll, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, stock.compute_loss(stock.model, dict(batch)), rtol=1e-6, atol=1e-6)


# ---- the resampling loop ----------------------------------------------------------------------------------


def test_refresh_replaces_the_training_data_with_pairs_sampled_from_the_policy(toy_path, tmp_path):
    seen = {}

    def recording_reward(prompts, completions, answer, **kwargs):
        rewards = closeness_reward(completions, answer)
        for prompt, completion, reward in zip(prompts, completions, rewards):
            seen.setdefault(prompt, []).append((completion, reward))
        return rewards

    args = make_config(tmp_path, resample_every=3, resample_num_completions=3)
    trainer = make_trainer(toy_path, args, reward_funcs=[recording_reward])
    offline = set(zip(trainer.train_dataset["chosen"], trainer.train_dataset["rejected"]))
    train(trainer)

    window = trainer._window
    eos = trainer.processing_class.eos_token
    assert len(seen) == 3 * 4  # resample_every x global batch = 12 prompts sampled, 3 completions each
    assert all(len(group) == 3 for group in seen.values())
    ties = sum(len({r for _, r in group}) == 1 for group in seen.values())
    assert trainer.refresh_log == [
        {"step": 0, "pairs": float(12 - ties), "ties": float(ties), "offline_pairs": 0.0,
         "reward_mean": pytest.approx(sum(r for g in seen.values() for _, r in g) / 36),
         "margin": pytest.approx(trainer.refresh_log[0]["margin"])}
    ]
    assert len(window) == 12 - ties > 0 and all(window["resampled"])
    columns = (window["prompt"], window["chosen"], window["rejected"], window["chosen_reward"])
    for prompt, chosen, rejected, chosen_reward in zip(*columns):
        generated = dict(seen[prompt])
        assert chosen.removesuffix(eos) in generated and rejected.removesuffix(eos) in generated
        assert chosen_reward == max(generated.values())  # best vs worst
        assert generated[chosen.removesuffix(eos)] > generated[rejected.removesuffix(eos)]
        assert (chosen, rejected) not in offline
    # tokenized by TRL's own DPO preparation
    for prompt, prompt_ids, chosen, chosen_ids in zip(*(window[k] for k in ("prompt", "prompt_ids", "chosen", "chosen_ids"))):
        assert prompt_ids + chosen_ids == trainer.processing_class(prompt + chosen).input_ids
    # every logged diagnostic is there
    for key in ("reward_mean", "pairs", "ties", "margin", "staleness_logratio", "ess"):
        assert 1 in logged(trainer, f"resample/{key}")


def test_schedule_refreshes_at_0_k_2k_and_staleness_resets(toy_path, tmp_path):
    """Refreshes at steps 0, k, 2k. Right after each (before any update on the new window) the policy *is* the
    sampler: staleness 0 and ESS 1, measured from DPO's own forward; one update later they move."""
    args = make_config(tmp_path, resample_every=2, max_steps=5, learning_rate=3e-3)
    trainer = train(make_trainer(toy_path, args))
    assert [row["step"] for row in trainer.refresh_log] == [0, 2, 4]
    assert logged(trainer, "resample/age") == {1: 0, 2: 1, 3: 0, 4: 1, 5: 0}
    staleness, ess = logged(trainer, "resample/staleness_logratio"), logged(trainer, "resample/ess")
    for step in (1, 3, 5):  # first step on a fresh window
        assert staleness[step] == pytest.approx(0.0, abs=1e-5) and ess[step] == pytest.approx(1.0, abs=1e-6)
    for step in (2, 4):  # one update later
        assert abs(staleness[step]) > 1e-3 and ess[step] < 1.0


def test_resample_mix_keeps_the_stated_fraction_of_offline_pairs(toy_path, tmp_path):
    dataset = offline_pairs(20)
    args = make_config(tmp_path, resample_every=2, resample_mix=0.25)
    trainer = make_trainer(toy_path, args, dataset)
    offline = set(zip(*(trainer.train_dataset[k] for k in ("prompt", "chosen", "rejected"))))
    trainer._refresh()
    window = trainer._window
    rows = zip(*(window[k] for k in ("prompt", "chosen", "rejected", "resampled")))
    kept = [(p, c, r) for p, c, r, fresh in rows if not fresh]
    assert len(kept) == 5 == len(set(kept)) and set(kept) <= offline  # round(0.25 x 20) distinct offline pairs
    assert sum(window["resampled"]) == trainer.refresh_log[0]["pairs"] > 0
    assert trainer.refresh_log[0]["offline_pairs"] == 5
    # offline pairs have no sampler: NaN, left out of the staleness
    sampler = torch.tensor(window["sampler_chosen_logps"])
    assert torch.isnan(sampler[~torch.tensor(window["resampled"])]).all()
    assert torch.isfinite(sampler[torch.tensor(window["resampled"])]).all()


def test_prompt_only_dataset_trains_from_its_own_samples(toy_path, tmp_path):
    args = make_config(tmp_path, resample_every=2, max_steps=2, gradient_checkpointing=True)  # TRL's default
    trainer = train(make_trainer(toy_path, args, make_dataset(16, 0), reward_funcs=[correctness_reward, closeness_reward]))
    assert len(trainer._window) > 0 and all(trainer._window["resampled"])
    assert math.isfinite(logged(trainer, "loss")[2])


def test_update_reference_moves_the_reference_to_the_policy_at_each_refresh(toy_path, tmp_path):
    args = make_config(tmp_path, resample_every=2, max_steps=3, resample_update_reference=True, learning_rate=3e-3)
    trainer = train(make_trainer(toy_path, args))
    margins = logged(trainer, "rewards/margins")
    assert margins[1] == 0.0 and margins[3] == 0.0  # first step on a window: policy == reference
    assert margins[2] != 0.0
    # the reference holds the weights of the refresh at step 2, not the initial ones
    initial = make_trainer(toy_path, make_config(tmp_path)).model
    ref, init = dict(trainer.ref_model.named_parameters()), dict(initial.named_parameters())
    assert not all(torch.equal(ref[name], init[name]) for name in ref)


def test_precompute_ref_log_probs_with_resampling(toy_path, tmp_path):
    with pytest.raises(ValueError, match="keeps no reference model in memory"):
        make_trainer(toy_path, make_config(tmp_path, resample_every=2, precompute_ref_log_probs=True))
    args = make_config(tmp_path, resample_every=2, max_steps=1, precompute_ref_log_probs=True, resample_update_reference=True)
    trainer = train(make_trainer(toy_path, args))
    window = trainer._window
    # the reference is the policy at the refresh: its log-probs of the chosen answers are the sampler's
    reference, sampler = torch.tensor(window["ref_chosen_logps"]), torch.tensor(window["sampler_chosen_logps"])
    torch.testing.assert_close(reference, sampler, atol=1e-5, rtol=1e-5)
    assert logged(trainer, "rewards/margins")[1] == pytest.approx(0.0, abs=1e-5)


def test_lora_with_resampling(toy_path, tmp_path):
    """PEFT: the reference is TRL's adapter-disabled base; with resample_update_reference a frozen 'ref' adapter
    copied from the trained one at each refresh."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    trainer = train(make_trainer(toy_path, make_config(tmp_path, resample_every=2, max_steps=2), peft_config=lora))
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config
    assert logged(trainer, "resample/ess")[1] == pytest.approx(1.0, abs=1e-6)

    args = make_config(tmp_path, resample_every=2, max_steps=3, resample_update_reference=True, learning_rate=1e-2)
    trainer = train(make_trainer(toy_path, args, peft_config=lora))
    assert "ref" in trainer.model.peft_config
    margins = logged(trainer, "rewards/margins")
    assert margins[1] == pytest.approx(0.0, abs=1e-6) and margins[3] == pytest.approx(0.0, abs=1e-6)
    assert margins[2] != pytest.approx(0.0, abs=1e-6)
    params = dict(trainer.model.named_parameters())
    trainable = [name for name, p in params.items() if p.requires_grad]
    assert trainable and all(".default." in name for name in trainable)  # the reference adapter stays frozen


# ---- checkpoints ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_restores_the_window_and_the_schedule(toy_path, tmp_path):
    """A run resumed from a checkpoint taken mid-window trains on the same pairs (restored, not resampled) and
    logs the same losses as the uninterrupted run, refreshing on the same schedule."""
    common = dict(resample_every=3, max_steps=5, save_strategy="steps", save_steps=2, learning_rate=3e-3)
    full = train(make_trainer(toy_path, make_config(tmp_path, output_dir=str(tmp_path / "full"), **common)))
    checkpoint = tmp_path / "full" / "checkpoint-2"
    state = json.loads((checkpoint / "trl_kl_dpo_window.json").read_text())
    assert state["last_refresh"] == 0 and state["window_batches"] == 2
    saved = Dataset.load_from_disk(str(checkpoint / "trl_kl_dpo_window"))

    resumed = make_trainer(toy_path, make_config(tmp_path, output_dir=str(tmp_path / "resumed"), **common))
    restored = {}
    original_refresh = resumed._refresh

    def refresh():
        restored.setdefault("window", resumed._window)  # the window in use when the first refresh comes
        original_refresh()

    resumed._refresh = refresh
    train(resumed, resume=str(checkpoint))
    assert restored["window"].to_dict() == saved.to_dict()
    assert [row["step"] for row in resumed.refresh_log] == [3]  # step 0's window came from the checkpoint
    full_loss, resumed_loss = logged(full, "loss"), logged(resumed, "loss")
    for step in (3, 4, 5):
        assert resumed_loss[step] == pytest.approx(full_loss[step], rel=1e-5, abs=1e-6)
    for key in ("resample/staleness_logratio", "resample/pairs"):
        assert logged(resumed, key)[4] == pytest.approx(logged(full, key)[4], rel=1e-5, abs=1e-6)


# ---- two processes ------------------------------------------------------------------------------------------


def _distributed_worker(out_dir: str):
    """Run by ``torchrun --nproc_per_node 2 tests/test_dpo.py OUT``: each process generates for its share of the
    refresh's prompts, rewards are gathered, and every process must end up training on the same window."""
    import torch.distributed as dist

    from trl_kl.toy import toy_model_path

    out = Path(out_dir)
    scored = []

    def recording_reward(prompts, completions, answer, **kwargs):
        scored.extend(sorted(set(prompts)))
        return closeness_reward(completions, answer)

    args = make_config(out, per_device_train_batch_size=2, resample_every=2, max_steps=3, save_strategy="steps", save_steps=3)
    trainer = train(make_trainer(toy_model_path(), args, reward_funcs=[recording_reward]))
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    window = trainer._window
    result = {
        "rank": rank,
        "world": world,
        "ddp": dist.is_initialized(),
        "window": sorted(zip(window["prompt"], window["chosen"], window["rejected"], window["sampler_chosen_logps"])),
        "refresh_log": trainer.refresh_log,
        "scored": scored,
        "loss": logged(trainer, "loss"),
        "ess": logged(trainer, "resample/ess"),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    end_distributed(trainer)


@pytest.mark.slow
def test_two_processes_share_generation_and_train_on_one_window(toy_path, tmp_path):
    done = lambda: all((tmp_path / f"rank{r}.json").exists() for r in (0, 1))  # noqa: E731
    torchrun([__file__, tmp_path], tmp_path / "torchrun.log", finished=done)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and all(r["ddp"] for r in ranks)
    assert ranks[0]["window"] == ranks[1]["window"] and len(ranks[0]["window"]) > 0  # one window, gathered
    assert ranks[0]["refresh_log"] == ranks[1]["refresh_log"]
    assert [row["step"] for row in ranks[0]["refresh_log"]] == [0, 2]
    for refresh in range(2):  # each refresh: 2 steps x 2 pairs x 2 processes = 8 prompts, 4 generated by each process
        mine = [set(r["scored"][4 * refresh : 4 * refresh + 4]) for r in ranks]
        assert len(mine[0]) == len(mine[1]) == 4 and not mine[0] & mine[1]
        row = ranks[0]["refresh_log"][refresh]
        assert row["pairs"] + row["ties"] == 8
    assert ranks[0]["loss"] == ranks[1]["loss"]
    assert ranks[0]["ess"]["1"] == pytest.approx(1.0, abs=1e-6)  # (JSON made the step keys strings)
    assert (tmp_path / "out" / "checkpoint-3" / "trl_kl_dpo_window").is_dir()


if __name__ == "__main__":
    _distributed_worker(sys.argv[1])
