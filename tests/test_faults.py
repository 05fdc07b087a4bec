"""Faults end in a clear error, a documented skip, or an exact resume (docs/reliability.md, sections 5 and 8).

Fast: the pure functions of trl_kl.guards, trl_kl.checkpoints and trl_kl.preflight; short in-process runs
(non-finite rewards train exactly like None, NaN gradients stop or skip the step, resume refusals); the bad-config
matrix is tests/test_bad_configs.py. Slow: kill -9 inside a save and at random times (tests/fault_injection.py),
2-process resume and a stalled rank under torchrun, and ``python tools/fault_matrix.py --quick``.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from distributed_run import torchrun

import fault_injection as fi
from trl_kl import checkpoints, guards, preflight
from trl_kl.checkpoints import CheckpointError
from trl_kl.ppo import token_rewards

HERE = Path(__file__).parent
ROOT = HERE.parent


# ---- rewards: one rule for values that are not finite numbers ---------------------------------------------------


@pytest.mark.parametrize(
    "values, expected, nonfinite",
    [
        ([0.5, 1, True], [0.5, 1.0, 1.0], 0),
        ([None, 2.0, None], [None, 2.0, None], 0),  # None: TRL's "does not apply", not counted
        ([math.inf, -math.inf, math.nan], [None, None, None], 3),
        ([np.float32(0.25), np.float64(np.inf), torch.tensor(3.0)], [0.25, None, 3.0], 1),
        (torch.tensor([1.0, float("nan"), 2.0]), [1.0, None, 2.0], 1),
    ],
    ids=["numbers", "none", "nonfinite", "numpy-and-tensors", "tensor-output"],
)
def test_checked_rewards_maps_nonfinite_to_none_and_counts_it(values, expected, nonfinite):
    assert guards.checked_rewards(values, 3, "f") == (expected, nonfinite)


@pytest.mark.parametrize(
    "values, error, message",
    [
        ([1.0, 2.0], ValueError, "'my_reward' returned 2 rewards for 3 completions"),
        ([1.0, "0.5", 2.0], TypeError, r"'my_reward' returned '0.5' \(str\) at row 1"),
        ([1.0, 2.0, [3.0]], TypeError, r"'my_reward' returned \[3.0\] \(list\) at row 2"),
        ([torch.tensor([1.0, 2.0]), 1.0, 1.0], TypeError, r"'my_reward' returned a Tensor of shape \(2,\) at row 0"),
        (1.0, TypeError, "'my_reward' returned float: it must return a list"),
        ("1.0", TypeError, "'my_reward' returned str"),
        ({"a": 1.0}, TypeError, "'my_reward' returned dict"),
        ((v for v in [1.0, 1.0, 1.0]), TypeError, "'my_reward' returned generator"),
        ([1.0, 2.0, 3 + 1j], TypeError, "at row 2"),
    ],
    ids=["wrong-length", "string", "nested-list", "vector-tensor", "scalar", "string-output", "dict", "generator", "complex"],
)
def test_checked_rewards_names_the_function_and_row_of_a_bad_value(values, error, message):
    with pytest.raises(error, match=message):
        guards.checked_rewards(values, 3, "my_reward")


def test_reward_functions_are_checked_inside_the_block_and_restored_after():
    import asyncio

    def sync_reward(prompts, **kwargs):
        return [math.inf, 1.0]

    async def async_reward(prompts, **kwargs):
        return [None, math.nan]

    module = torch.nn.Linear(1, 1)
    funcs = [sync_reward, async_reward, module]
    with guards.checked_reward_funcs(funcs, ["sync_reward", "async_reward", "model"]) as check:
        assert funcs[2] is module and funcs[0] is not sync_reward  # reward models are left alone
        assert funcs[0](prompts=["a", "b"]) == [None, 1.0]
        assert asyncio.run(funcs[1](prompts=["a", "b"])) == [None, None]
        with pytest.raises(ValueError, match="'sync_reward' returned 2 rewards for 3 completions"):
            funcs[0](prompts=["a", "b", "c"])
    assert check.nonfinite == 2 and funcs == [sync_reward, async_reward, module]


def test_nonfinite_to_nan_counts_infinities():
    rewards, count = guards.nonfinite_to_nan(torch.tensor([[1.0, math.inf], [math.nan, -math.inf]]))
    assert count == 2 and torch.isnan(rewards).tolist() == [[False, True], [True, True]] and rewards[0, 0] == 1.0


def test_ppo_token_rewards_refuse_an_infinite_score():
    mask = torch.ones(1, 2)
    with pytest.raises(ValueError, match="finite or NaN"):
        token_rewards(torch.tensor([math.inf]), None, mask, beta=0.1)
    assert token_rewards(torch.tensor([math.nan]), None, mask, 0.1).tolist() == [[0.0, 0.0]]  # no score, row excluded


def test_nonfinite_step_message_names_the_step_the_cause_and_the_option():
    grad = guards.nonfinite_step_message(3, "gradient norm", math.nan, loss_was_finite=True)
    assert "optimizer step 4" in grad and "weights are those of step 3" in grad and "backward pass overflowed" in grad
    assert "skip_nonfinite_steps=True" in grad
    assert "loss itself was not finite" in guards.nonfinite_step_message(0, "loss", math.inf, loss_was_finite=False)


# ---- checkpoints: complete, rotation, resume choice ------------------------------------------------------------


def _checkpoint(run_dir: Path, step: int, complete: bool = True, **info) -> Path:
    folder = run_dir / f"checkpoint-{step}"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * (10 + step))
    (folder / "sub" / "state.json").write_text("{}")
    if complete:
        checkpoints.write_manifest(str(folder), {"settings": {"per_device_train_batch_size": 4}, **info}, sync=False)
    return folder


def test_a_checkpoint_is_complete_only_with_its_manifest_and_every_file_intact(tmp_path):
    folder = _checkpoint(tmp_path, 2)
    assert checkpoints.checkpoint_problems(str(folder)) == []
    assert checkpoints.read_manifest(str(folder))["files"] == {"model.safetensors": 12, "sub/state.json": 2}
    assert checkpoints.checkpoint_problems(str(folder), required=["sub/", "model.safetensors"]) == []
    assert checkpoints.checkpoint_problems(str(folder), required=["value_model/"]) == [
        "it holds no value_model/, which this trainer's state needs (saved by None)"
    ]
    (folder / "model.safetensors").write_bytes(b"w" * 5)  # torn after the manifest (a disk fault)
    (folder / "sub" / "state.json").unlink()
    assert checkpoints.checkpoint_problems(str(folder)) == [
        "model.safetensors has 5 bytes, 12 when it was saved",
        "sub/state.json is missing",
    ]
    partial = _checkpoint(tmp_path, 4, complete=False)
    assert "has no trl_kl_checkpoint.json" in checkpoints.checkpoint_problems(str(partial))[0]
    (partial / checkpoints.MANIFEST).write_text("{not json")
    assert "has no trl_kl_checkpoint.json" in checkpoints.checkpoint_problems(str(partial))[0]
    model_only = _checkpoint(tmp_path, 6, model_only=True)
    assert "save_only_model" in checkpoints.checkpoint_problems(str(model_only))[0]


def test_newest_complete_checkpoint_skips_newer_partial_ones(tmp_path):
    _checkpoint(tmp_path, 2)
    good = _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 12, complete=False)
    _checkpoint(tmp_path, 14, model_only=True)
    (tmp_path / "checkpoint-x").mkdir()
    path, skipped = checkpoints.newest_complete_checkpoint(str(tmp_path))
    assert path == str(good)  # by step, not by name (10 > 2 although "10" < "2")
    assert [os.path.basename(p) for p, _ in skipped] == ["checkpoint-14", "checkpoint-12"]
    assert checkpoints.newest_complete_checkpoint(str(tmp_path / "none")) == (None, [])


@pytest.mark.parametrize("limit, kept", [(1, [8]), (2, [6, 8]), (None, [2, 4, 5, 6, 8, 9])])
def test_rotation_keeps_the_newest_complete_checkpoints_and_the_one_just_written(tmp_path, limit, kept):
    for step in (2, 4, 6, 8):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 5, complete=False)
    _checkpoint(tmp_path, 9, complete=False)  # left by a run that went further, then crashed
    just_written = str(tmp_path / "checkpoint-8")
    checkpoints.rotate_checkpoints(str(tmp_path), limit, keep={just_written, None})
    assert [checkpoints.checkpoint_step(p) for p in checkpoints.list_checkpoints(str(tmp_path))] == kept


def test_rotation_never_deletes_the_checkpoint_just_written_nor_the_best(tmp_path):
    for step in (2, 4, 6):
        _checkpoint(tmp_path, step)
    # resumed from checkpoint-2 and saving step 3: checkpoint-4 and -6 are from the run that crashed
    written = _checkpoint(tmp_path, 3)
    checkpoints.rotate_checkpoints(str(tmp_path), 1, keep={str(written)})
    assert checkpoints.list_checkpoints(str(tmp_path)) == [str(written)]
    for step in (4, 6):
        _checkpoint(tmp_path, step)
    best = str(tmp_path / "checkpoint-3")
    checkpoints.rotate_checkpoints(str(tmp_path), 1, keep={str(tmp_path / "checkpoint-6"), best})
    assert [checkpoints.checkpoint_step(p) for p in checkpoints.list_checkpoints(str(tmp_path))] == [3, 6]


def test_an_interrupted_deletion_leaves_an_incomplete_checkpoint(tmp_path, monkeypatch):
    folder = _checkpoint(tmp_path, 2)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", lambda *a, **k: None)  # killed before any file went
    checkpoints.remove_checkpoint(str(folder))
    assert folder.is_dir() and checkpoints.checkpoint_problems(str(folder))  # never "complete" with files missing


def test_settings_mismatch_names_each_setting():
    saved = {"per_device_train_batch_size": 4, "num_processes": 2, "num_generations": 2}
    current = {"per_device_train_batch_size": 8, "num_processes": 2, "steps_per_generation": 1}
    assert checkpoints.settings_mismatch(saved, current) == ["per_device_train_batch_size: 4 in the checkpoint, 8 now"]


def test_mark_complete_makes_an_older_checkpoint_resumable(tmp_path):
    folder = _checkpoint(tmp_path, 2, complete=False)
    checkpoints.mark_complete(str(folder))
    assert checkpoints.checkpoint_problems(str(folder)) == []
    with pytest.raises(CheckpointError, match="already has a manifest"):
        checkpoints.mark_complete(str(folder))


# ---- preflight: runs that would train nothing -------------------------------------------------------------------


def test_empty_prompt_rows_reads_selections_and_conversations():
    text = Dataset.from_dict({"prompt": ["1+1=", "", "2+2=", ""]})
    assert preflight.empty_prompt_rows(text) == [1, 3]
    assert preflight.empty_prompt_rows(text.select([3, 0, 1])) == [0, 2]
    chat = Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}], []]})
    assert preflight.empty_prompt_rows(chat) == [1]
    with pytest.raises(ValueError, match=r"empty at rows \[1, 3\]"):
        preflight.check_prompts(text)


class _Args:
    max_steps, num_train_epochs, num_iterations = 10, 1.0, 1
    generation_batch_size, num_generations = 8, 2
    per_device_train_batch_size, dataloader_drop_last = 4, False


@pytest.mark.parametrize(
    "change, rows, message",
    [
        (dict(max_steps=-1, num_train_epochs=0), 16, "would train nothing"),
        ({}, 0, "train_dataset is empty"),
        ({}, 3, "train_dataset has 3 rows, fewer than one generation batch of prompts .*takes \\(4\\)"),
    ],
    ids=["no-steps-no-epochs", "empty", "fewer-than-a-generation-batch"],
)
def test_grpo_runs_that_would_train_nothing_raise(change, rows, message):
    args = _Args()
    vars(args).update(change)
    dataset = Dataset.from_dict({"prompt": ["1+1="] * rows})
    with pytest.raises(ValueError, match=message):
        preflight.check_grpo_run(args, dataset, 1)


def test_dpo_runs_that_would_train_nothing_raise():
    args = _Args()
    with pytest.raises(ValueError, match="empty"):
        preflight.check_dpo_run(args, Dataset.from_dict({"prompt": []}), 1)
    args.dataloader_drop_last = True
    with pytest.raises(ValueError, match="fewer than one global batch"):
        preflight.check_dpo_run(args, Dataset.from_dict({"prompt": ["a"] * 7}), 2)
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        preflight.check_dpo_run(_Args(), Dataset.from_dict({"prompt": ["a"]}), 1, Dataset.from_dict({"prompt": [""]}))


# ---- in-process runs ---------------------------------------------------------------------------------------------


def _train(trainer, resume=None):
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _faulty(case):
    from trl_kl.toy import closeness_reward

    def faulty_reward(completions, answer, **kwargs):
        return fi._corrupt(case, closeness_reward(completions, answer))

    return faulty_reward


@pytest.mark.parametrize("kind", ["grpo", "ppo", "dpo"])
def test_a_nonfinite_reward_trains_exactly_like_none_and_is_counted(kind, tmp_path):
    """+inf on row 0 of every reward call: finite weights equal to returning None there, and
    reward/nonfinite_frac = 1 / completions per call. (About 1 s per trainer.)"""
    runs = {}
    for case in ("none", "inf"):
        trainer = fi.build(kind, tmp_path / case, reward_funcs=[_faulty(case)], max_steps=2, save_strategy="no")
        runs[case] = (_train(trainer), fi.weights(trainer))
    assert fi.all_finite(runs["inf"][1]) and fi.weight_difference(runs["inf"][1], runs["none"][1]) == 0.0
    counted = fi.logged(runs["inf"][0], guards.REWARD_METRIC)
    per_call = {"grpo": 8, "ppo": 8, "dpo": 16 * 4}[kind]  # generation batch (DPO: 16 prompts x 4 completions)
    assert counted and counted == [pytest.approx(1 / per_call)] * len(counted)
    assert set(fi.logged(runs["none"][0], guards.REWARD_METRIC)) == {0.0}


def test_ppo_excludes_an_unscorable_completion(tmp_path):
    """PPO as GRPO: a None reward is not scored 0; that completion's advantages are 0 and it has no value loss;
    the others are whitened among themselves."""
    from trl_kl.advantages import gae, masked_whiten

    calls = []

    def reward(completions, answer, **kwargs):
        values = [0.3 * len(c) for c in completions]
        values[1] = None
        calls.append(values)
        return values

    trainer = fi.build("ppo", tmp_path, reward_funcs=[reward], max_steps=1, save_strategy="no")
    trainer.model.train()
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([{"prompt": p, "answer": "0"} for p in ["12+34=", "7+8=", "5+5=", "60+1="]])
    mask = out["completion_mask"].float()
    scored = torch.tensor([[1.0], [0.0], [1.0], [1.0]]) * mask
    assert torch.equal(out["value_mask"], scored) and torch.all(out["advantages"][1] == 0)
    scores = torch.tensor([0.0 if v is None else v for v in calls[-1]])
    rewards = -trainer.kl_coef * (out["old_per_token_logps"] - out["ref_per_token_logps"]) * mask
    rewards[torch.arange(4), mask.sum(1).long() - 1] += scores
    advantages, _ = gae(rewards, out["old_values"], mask, trainer.args.gamma, trainer.args.lam)
    torch.testing.assert_close(out["advantages"], masked_whiten(advantages, scored), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["grpo", "ppo", "dpo"])
def test_a_nan_gradient_stops_training_before_the_optimizer_step(kind, tmp_path):
    """A NaN gradient at the second step: NonFiniteError naming optimizer step 2, the weights those of step 1."""
    trainer = fi.build(kind, tmp_path, max_steps=3, save_strategy="no")
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    snapshots = []
    param.register_hook(lambda g: g * math.nan if trainer.state.global_step == 1 else g)
    trainer.add_callback(_Snapshot(snapshots, trainer))
    with pytest.raises(guards.NonFiniteError, match="Non-finite gradient norm \\(nan\\) at optimizer step 2"):
        trainer.train()
    assert trainer.state.global_step == 1 and fi.weight_difference(fi.weights(trainer), snapshots[-1]) == 0.0


@pytest.mark.parametrize("kind", ["grpo", "ppo", "dpo"])
def test_skip_nonfinite_steps_skips_the_step_and_counts_it(kind, tmp_path):
    """PPOConfig lost the field when it stopped inheriting GRPOConfig's: all three configs carry it."""
    trainer = fi.build(kind, tmp_path, max_steps=3, save_strategy="no", skip_nonfinite_steps=True)
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    param.register_hook(lambda g: g * math.nan if trainer.state.global_step == 1 else g)
    snapshots = []
    trainer.add_callback(_Snapshot(snapshots, trainer))
    _train(trainer)
    assert trainer.state.global_step == 3 and fi.all_finite(fi.weights(trainer))
    assert fi.weight_difference(snapshots[1], snapshots[0]) == 0.0  # step 2 changed nothing
    assert fi.logged(trainer, guards.SKIPPED_METRIC) == [0.0, 1.0, 0.0]


def _Snapshot(store, trainer):
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            store.append(fi.weights(trainer))

    return Snapshot()


def test_runs_that_would_train_nothing_raise_before_training(tmp_path):
    with pytest.raises(ValueError, match="num_iterations must be an integer >= 1"):  # at construction now
        fi.build("grpo", tmp_path / "a", num_iterations=0)
    trainer = fi.build("grpo", tmp_path / "b")
    trainer.train_dataset = Dataset.from_dict({"prompt": ["1+2=", "", "3+4=", "5+6="] * 4, "answer": ["3", "0", "7", "11"] * 4})
    with pytest.raises(ValueError, match=r"empty at rows \[1, 5, 9, 13\]"):
        trainer.train()
    trainer.train_dataset = trainer.train_dataset.select(range(3))
    with pytest.raises(ValueError, match="has 3 rows, fewer than one generation batch"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_resume_refuses_a_partial_checkpoint_and_true_falls_back_to_a_complete_one(tmp_path):
    """checkpoint-6 without its manifest (the save was killed): a path is refused, True takes checkpoint-3 and
    says why; trl_kl's state missing and other batch settings are refused, naming them. (About 1.5 s.)"""
    run = tmp_path / "out"
    _train(fi.build("grpo", run, max_steps=6))
    (run / "checkpoint-6" / checkpoints.MANIFEST).unlink()
    refusal = "checkpoint-6: it has no trl_kl_checkpoint.json.*newest complete checkpoint there is .*checkpoint-3"
    with pytest.raises(CheckpointError, match=refusal):
        fi.build("grpo", run).train(resume_from_checkpoint=str(run / "checkpoint-6"))
    resumed = fi.build("grpo", run, max_steps=4)
    fallback = "(?s)resuming from .*checkpoint-3, the newest complete checkpoint. Skipped newer.*checkpoint-6"
    with pytest.warns(UserWarning, match=fallback):
        _train(resumed, resume=True)
    assert [row["step"] for row in resumed.state.log_history if "loss" in row] == [1, 2, 3, 4]
    with pytest.raises(CheckpointError, match="num_iterations: 2 in the checkpoint, 1 now"):
        fi.build("grpo", run, num_iterations=1).train(resume_from_checkpoint=str(run / "checkpoint-3"))
    with pytest.raises(CheckpointError, match="holds no value_model/.*saved by GRPOTrainer"):
        fi.build("ppo", run).train(resume_from_checkpoint=str(run / "checkpoint-3"))
    (run / "checkpoint-3" / "trl_kl_rollout_state_rank0.pt").unlink()
    with pytest.raises(CheckpointError, match="trl_kl_rollout_state_rank0.pt is missing"):
        fi.build("grpo", run).train(resume_from_checkpoint=str(run / "checkpoint-3"))


def test_resuming_a_finished_run_is_refused(tmp_path):
    """transformers 5.24 trains one step past max_steps when resumed from the final checkpoint (step 9 of 8)."""
    _train(fi.build("grpo", tmp_path, max_steps=3))
    with pytest.raises(CheckpointError, match="is at step 3 and the run ends at step 3 .*Raise max_steps"):
        fi.build("grpo", tmp_path, max_steps=3).train(resume_from_checkpoint=True)
    resumed = _train(fi.build("grpo", tmp_path, max_steps=4), resume=True)  # a longer run goes on from there
    assert resumed.state.global_step == 4


def test_save_total_limit_one_keeps_a_complete_checkpoint(tmp_path):
    trainer = _train(fi.build("dpo", tmp_path, max_steps=6, save_total_limit=1))
    assert [os.path.basename(p) for p in checkpoints.list_checkpoints(str(tmp_path))] == ["checkpoint-6"]
    manifest = checkpoints.read_manifest(str(tmp_path / "checkpoint-6"))
    assert manifest["trainer"] == "DPOTrainer" and "trl_kl_dpo_window.json" in manifest["files"]
    assert manifest["settings"]["resample_every"] == 4 == trainer.args.resample_every


# ---- kill -9 (slow) ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    fi.preload()
    return tmp_path_factory.mktemp("faults")


@pytest.mark.slow
@pytest.mark.parametrize("kind", fi.KINDS)
def test_kill_inside_a_save_resumes_exactly_or_is_refused(kind, harness):
    """The save at step 6 (save_total_limit=1): kill -9 after trl_kl's own state (before the manifest), after the
    manifest (before rotation), after rotation deleted checkpoint-3, and with a torn weights file (no limit). Resume
    with True is exact every time; the path of the killed save is refused without its manifest, exact with it.
    (About 10 s per trainer.)"""
    work = harness / kind
    events = [tuple(e) for e in fi.reference(kind, work)["events"]]
    manifest = events.index(("rename", f"checkpoint-{fi.TARGET_STEP}/{checkpoints.MANIFEST}")) + 1
    assert events[manifest:] == [("delete", f"checkpoint-{fi.SAVE_STEPS}")]  # rotation comes after the manifest
    weights_file = next(i for i, (_, path) in enumerate(events, 1) if path.endswith("model.safetensors"))
    cases = [(manifest - 2, False, 1, "refused"), (manifest, False, 1, "exact"), (manifest + 1, False, 1, "exact"),
             (weights_file, True, None, "refused")]
    for event, torn, limit, explicit in cases:
        out = fi.kill_at_event(kind, work, event, torn=torn, limit=limit)
        assert out["killed"], out
        assert out["resume_true"]["outcome"] == "exact", (events[event - 1], out)
        assert out["resume_path"]["outcome"] == explicit, (events[event - 1], out)


@pytest.mark.slow
def test_random_kills_resume_exactly(harness):
    """Two kill -9 at random times of a GRPO run that checkpoints every step. (About 6 s.)"""
    import random

    work = harness / "random"
    seconds = fi.reference("grpo", work, save_steps=1, record=False)["after_first_save"]
    rng = random.Random(7)
    for _ in range(2):
        out = fi.random_kill("grpo", work, rng, seconds)
        assert not out["killed"] or out["resume_true"]["outcome"] == "exact", out


@pytest.mark.slow
def test_fault_matrix_quick():
    """The command of docs/reliability.md, as written there. (About 30 s.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "tools/fault_matrix.py", "--quick"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| bad reward function | grpo | 3 | " in done.stdout


# ---- two processes (slow, torchrun) ------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_resume_is_exact(tmp_path):
    """GRPO, PPO and DPO on 2 CPU processes: resumed from checkpoint-3, step 8's weights equal the uninterrupted
    run's (GRPO and PPO crashed on loading before: map_location 'cpu:0'). (About 20 s.)"""
    kinds = ["grpo", "ppo", "dpo"]
    done = lambda: all((tmp_path / f"resume_{k}.json").exists() for k in kinds)  # noqa: E731
    torchrun([HERE / "dist_resume.py", tmp_path, ",".join(kinds)], tmp_path / "torchrun.log", finished=done, timeout=600)
    for kind in kinds:
        result = json.loads((tmp_path / f"resume_{kind}.json").read_text())
        assert result["world"] == 2 and result["steps"] == fi.STEPS, (kind, result)
        assert result["max_weight_difference"] <= 1e-6, (kind, result)
        assert result["loss_resumed"][fi.SAVE_STEPS:] == pytest.approx(result["loss_full"][fi.SAVE_STEPS:], rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_stops_or_skips_on_both(tmp_path):
    """Rank 1's loss is NaN at optimizer step 2, rank 0's is finite. Stopping (the default): both ranks raise
    NonFiniteError naming step 2 (rank 0 learns of it through the all-reduced flag), no rank hangs, the weights are
    step 1's. skip_nonfinite_steps: both skip step 2, train on to step 3 with finite weights, and agree. (About 30 s.)"""
    files = [tmp_path / f"{mode}_rank{rank}.json" for mode in ("stop", "skip") for rank in (0, 1)]
    torchrun([HERE / "dist_nonfinite.py", tmp_path], tmp_path / "torchrun.log", finished=lambda: all(map(Path.exists, files)),
             timeout=600)
    stop = [json.loads((tmp_path / f"stop_rank{rank}.json").read_text()) for rank in (0, 1)]
    skip = [json.loads((tmp_path / f"skip_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["world"] == 2 for r in stop + skip)
    assert "Non-finite loss (non-finite on another process) at optimizer step 2" in stop[0]["error"], stop[0]
    assert "Non-finite loss (nan) at optimizer step 2" in stop[1]["error"], stop[1]
    assert [r["global_step"] for r in stop] == [1, 1] and all(r["finite"] for r in stop)
    assert stop[0]["fingerprint"] == stop[1]["fingerprint"]
    assert [r["error"] for r in skip] == [None, None] and [r["global_step"] for r in skip] == [3, 3]
    assert [r["step2_change"] for r in skip] == [0.0, 0.0] and all(r["finite"] for r in skip)
    assert skip[0]["fingerprint"] == skip[1]["fingerprint"] and skip[0]["skipped"] == [0.0, 1.0, 0.0]


@pytest.mark.slow
def test_the_peer_of_a_stalled_rank_errors_after_ddp_timeout(tmp_path):
    """Rank 1 stalls inside a reward function; rank 0, waiting in the gather, gets gloo's timeout error after
    ddp_timeout (10 s here) instead of gloo's default 30 minutes. (About 20 s.)"""
    timeout = 10
    with pytest.raises(AssertionError, match="exited with"):
        torchrun([HERE / "dist_stall.py", tmp_path, timeout], tmp_path / "torchrun.log", finished=lambda: False,
                 timeout=240)
    began = float((tmp_path / "stall_began").read_text())
    error = json.loads((tmp_path / "peer_error.json").read_text())
    waited = error["time"] - began
    print(f"stalled rank: its peer errored {waited:.1f} s after the stall (ddp_timeout={timeout})")
    assert timeout - 1 <= waited <= timeout + 20, (waited, error)
    assert "timed out" in error["error"].lower() or "timeout" in error["error"].lower(), error
