"""The offline toy policy (trl_kl.toy): tokenizer, task, rewards, warm start and the on-disk cache."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_kl import toy
from trl_kl.toy import (
    build_model,
    build_tokenizer,
    build_toy,
    closeness_reward,
    correctness_reward,
    evaluate,
    make_dataset,
    resolve_model_name,
    toy_model_path,
    warm_start,
)

TASK_STRINGS = ["23+45=68", "0+0=0", "64+64=128", "7+58=65", "1 + 2 = 3"]


@pytest.fixture(scope="module")
def warm():
    """The default toy policy and tokenizer, warm-started once for the module."""
    return build_toy(seed=0)


@pytest.fixture(scope="module")
def test_set():
    return make_dataset(500, seed=0, split="test")


def test_tokenizer_is_character_level_and_round_trips():
    tokenizer = build_tokenizer()
    for text in TASK_STRINGS:
        ids = tokenizer(text).input_ids
        assert len(ids) == len(text)  # one token per character, no special token added
        assert tokenizer.decode(ids) == text
    assert tokenizer.padding_side == "left"
    assert {tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token} == {"<pad>", "<eos>", "<bos>"}


def test_tokenizer_handles_trl_calls():
    tokenizer = build_tokenizer()
    batch = tokenizer(
        text=["1+2=", "23+45="], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    assert batch.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert batch.input_ids[0, :2].tolist() == [tokenizer.pad_token_id] * 2
    completion = tokenizer("68").input_ids + [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.batch_decode([completion], skip_special_tokens=True) == ["68"]


def test_dataset_is_correct_deterministic_and_splits_are_disjoint():
    train = make_dataset(len(toy._split_pairs("train")), seed=0, split="train")
    test = make_dataset(len(toy._split_pairs("test")), seed=0, split="test")
    assert set(train["prompt"]).isdisjoint(test["prompt"])
    assert len(set(train["prompt"]) | set(test["prompt"])) == (toy.MAX_OPERAND + 1) ** 2
    for row in [*train, *test]:
        a, b = row["prompt"].removesuffix("=").split("+")
        assert int(a) + int(b) == int(row["answer"]) and 1 <= len(row["answer"]) <= 3
    assert make_dataset(20, seed=3).to_dict() == make_dataset(20, seed=3).to_dict()
    assert make_dataset(20, seed=3).to_dict() != make_dataset(20, seed=4).to_dict()
    with pytest.raises(ValueError):
        make_dataset(2, split="validation")


def test_correctness_reward():
    completions = ["68", " 68 ", "86", "", "6 8", "680"]
    assert correctness_reward(completions, answer=["68"] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_closeness_reward():
    completions = ["68", " 70", "58", "", "6 8", "+68", "128"]
    expected = [1.0, 1 / 3, 1 / 11, 0.0, 0.0, 0.0, 1 / 61]
    assert closeness_reward(completions, answer=["68"] * 7) == pytest.approx(expected)


def test_untrained_model_is_near_zero(test_set):
    model, tokenizer = build_toy(seed=0, sft_steps=0)
    assert evaluate(model, tokenizer, test_set)["correctness"] < 0.02


def test_warm_start_is_better_than_chance_but_far_from_solved(warm, test_set):
    model, tokenizer = warm
    greedy = evaluate(model, tokenizer, test_set)
    sampled = evaluate(model, tokenizer, test_set, num_samples=2, temperature=1.0)
    # Measured with seed 0: greedy 0.32 (closeness 0.53), sampled 0.19 (closeness 0.38).
    assert 0.15 < greedy["correctness"] < 0.6
    assert 0.05 < sampled["correctness"] < greedy["correctness"]
    assert greedy["closeness"] > greedy["correctness"]


def test_evaluate_restores_rng_and_mode(warm, test_set):
    model, tokenizer = warm
    model.train()
    state = torch.get_rng_state()
    first = evaluate(model, tokenizer, test_set.select(range(50)), num_samples=2, temperature=1.0, seed=5)
    assert model.training and torch.equal(torch.get_rng_state(), state)
    model.eval()
    assert evaluate(model, tokenizer, test_set.select(range(50)), num_samples=2, temperature=1.0, seed=5) == first


def test_warm_start_lowers_the_loss():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0)
    losses = warm_start(model, tokenizer, steps=20, seed=0)
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5])
    assert not model.training


def test_builds_are_deterministic():
    first, _ = build_toy(seed=1, sft_steps=10)
    second, _ = build_toy(seed=1, sft_steps=10)
    other, _ = build_toy(seed=2, sft_steps=10)
    for name, weight in first.state_dict().items():
        assert torch.equal(weight, second.state_dict()[name]), name
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_toy_model_path_reloads_the_same_model(warm, test_set, toy_path, monkeypatch):
    """The session's cached toy (built by toy_model_path, see conftest) reloads offline with exactly the
    in-memory model's logits and tokenization, and is reused without rebuilding."""
    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached folder must be reused")

    monkeypatch.setattr(toy, "build_toy", no_rebuild)
    root = Path(toy_path).parent
    monkeypatch.setenv("TRL_KL_CACHE", str(root))
    assert resolve_model_name("toy") == toy_path == str(root / toy.CACHE_NAME)
    assert toy_model_path(root) == toy_path
    assert resolve_model_name("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B"

    model, tokenizer = warm
    loaded = AutoModelForCausalLM.from_pretrained(toy_path)
    loaded_tokenizer = AutoTokenizer.from_pretrained(toy_path)
    for text in TASK_STRINGS:
        assert loaded_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert loaded_tokenizer.padding_side == "left"
    assert loaded.generation_config.eos_token_id == loaded_tokenizer.eos_token_id
    assert loaded.generation_config.pad_token_id == loaded_tokenizer.pad_token_id
    assert loaded.dtype == torch.float32
    batch = loaded_tokenizer(
        text=test_set[:32]["prompt"], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_toy_model_path_builds_once_for_concurrent_callers(tmp_path, monkeypatch):
    real_build = toy.build_toy
    builds = []

    def slow_untrained_build():
        builds.append(threading.get_ident())
        time.sleep(0.5)  # the other caller reaches the lock meanwhile
        return real_build(sft_steps=0)

    monkeypatch.setattr(toy, "build_toy", slow_untrained_build)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(toy_model_path, [tmp_path, tmp_path]))
    assert paths == [str(tmp_path / toy.CACHE_NAME)] * 2
    assert len(builds) == 1


def test_toy_model_path_keeps_the_winner_of_a_race(tmp_path, monkeypatch):
    """Should another process rename its folder into place first (a lock that does not hold, e.g. on
    some network filesystems), ours is dropped, not mixed in."""
    final = tmp_path / toy.CACHE_NAME
    real_build = toy.build_toy

    def build_while_another_process_wins():
        final.mkdir()
        (final / "winner").touch()
        return real_build(sft_steps=0)

    monkeypatch.setattr(toy, "build_toy", build_while_another_process_wins)
    assert toy_model_path(tmp_path) == str(final)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [f".{toy.CACHE_NAME}.lock", toy.CACHE_NAME]
    assert [entry.name for entry in final.iterdir()] == ["winner"]
