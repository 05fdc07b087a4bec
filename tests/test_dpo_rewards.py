"""DPO resampling takes what GRPO's reward_funcs take: reward models (object, local path), reward_weights,
async reward functions, conversational prompts; and refuses the rest with a clear error."""

import math
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from test_dpo import logged, make_config, make_trainer, train
from trl_kl.toy import closeness_reward, correctness_reward, make_dataset

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
"""Renders a conversation as its contents joined: a toy prompt as messages reads exactly as the plain prompt."""


@pytest.fixture(scope="module")
def reward_model_path(toy_path, tmp_path_factory):
    """A tiny reward model made offline: the toy checkpoint with a seeded one-label sequence-classification head
    (and the chat template, for conversations)."""
    path = tmp_path_factory.mktemp("reward_model")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(toy_path, num_labels=1)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(toy_path)
    tokenizer.chat_template = CHAT_TEMPLATE  # for conversations; plain text does not use it
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def chat_toy_path(toy_path, tmp_path_factory):
    """The toy policy with a chat template."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("chat_toy")
    AutoModelForCausalLM.from_pretrained(toy_path).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(toy_path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return str(path)


def _resampling_trainer(model_path, tmp_path, reward_funcs, dataset=None, **overrides):
    args = make_config(tmp_path, resample_every=2, resample_num_completions=3, **overrides)
    return make_trainer(model_path, args, dataset if dataset is not None else make_dataset(8, 0), reward_funcs=reward_funcs)


def _one_by_one(model, tokenizer, texts):
    """Each text scored alone (no padding): the head's logit at its last token."""
    with torch.no_grad():
        return [model(input_ids=torch.tensor([tokenizer(t, add_special_tokens=False).input_ids])).logits[0, 0].item() for t in texts]


def test_reward_model_path_scores_prompt_plus_completion(toy_path, reward_model_path, tmp_path):
    """A local path is loaded as GRPO loads it; the label is the head's logit on prompt + completion, whatever the
    padding of the batch; the same model passed as an object scores the same."""
    by_path = _resampling_trainer(toy_path, tmp_path, reward_model_path)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_path, num_labels=1)
    by_object = _resampling_trainer(toy_path, tmp_path, [model])
    rows = [0, 1]
    completions = [["46", "47", "9"], ["15", "1", "150"]]
    ids = [[[0]] * 3] * 2
    prompts = [by_path._prompt_source[r]["prompt"] for r in rows]
    expected = _one_by_one(model, AutoTokenizer.from_pretrained(reward_model_path),
                           [p + c for p, group in zip(prompts, completions) for c in group])
    for trainer in (by_path, by_object):
        scores = [s for group in trainer._score(rows, completions, ids) for s in group]
        assert scores == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert len(set(round(s, 4) for s in expected)) == 6  # the head tells the completions apart


def test_reward_model_labels_the_refresh_pairs(toy_path, reward_model_path, tmp_path):
    """After a refresh each pair's chosen answer is the reward model's best completion, rejected its worst."""
    trainer = _resampling_trainer(toy_path, tmp_path, reward_model_path)
    trainer._refresh()
    window = trainer._window
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model_path, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(reward_model_path)
    eos = trainer.processing_class.eos_token
    assert len(window) > 0
    for prompt, chosen, rejected, chosen_reward, rejected_reward in zip(
        *(window[k] for k in ("prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"))
    ):
        scores = _one_by_one(rm, tokenizer, [prompt + chosen.removesuffix(eos), prompt + rejected.removesuffix(eos)])
        assert scores == pytest.approx([chosen_reward, rejected_reward], rel=1e-5, abs=1e-5)
        assert chosen_reward > rejected_reward


def test_reward_weights_weigh_the_rewards_and_skip_none(toy_path, tmp_path):
    def sometimes_none(completions, answer, **kwargs):  # unscorable: the wrong answer one above the sum
        return [None if c == str(int(a) + 1) else 0.5 for c, a in zip(completions, answer)]

    def never(completions, **kwargs):
        return [None] * len(completions)

    trainer = _resampling_trainer(
        toy_path, tmp_path, [correctness_reward, closeness_reward, sometimes_none], reward_weights=[2.0, -1.0, 4.0]
    )
    answer = trainer._prompt_source[0]["answer"]
    completions = [answer, str(int(answer) + 1), "x"]
    scores = trainer._score([0], [completions], [[[0]] * 3])[0]
    expected = [2.0 * 1 - 1.0 * 1 + 4.0 * 0.5, 2.0 * 0 - 1.0 * 0.5, 2.0 * 0 - 1.0 * 0 + 4.0 * 0.5]  # None left out
    assert scores == pytest.approx(expected)
    all_none = _resampling_trainer(toy_path, tmp_path, [never])
    assert all(math.isnan(s) for s in all_none._score([0], [["1", "2", "3"]], [[[0]] * 3])[0])


def test_async_reward_function_is_awaited(toy_path, tmp_path):
    async def async_closeness(completions, answer, **kwargs):
        return closeness_reward(completions, answer)

    sync = _resampling_trainer(toy_path, tmp_path, [closeness_reward, correctness_reward])
    mixed = _resampling_trainer(toy_path, tmp_path, [async_closeness, correctness_reward])
    completions, ids = [["46", "47", "1"], ["15", "16", "150"]], [[[0]] * 3] * 2
    assert mixed._score([0, 1], completions, ids) == sync._score([0, 1], completions, ids)


def test_conversational_prompts_are_generated_with_the_chat_template(chat_toy_path, reward_model_path, tmp_path):
    """Prompts given as messages are sampled from as TRL's DPO tokenizes them (chat template + generation prompt);
    the reward functions get GRPO's conversational completions, the reward model the templated conversation."""
    seen = []

    def recording(prompts, completions, answer, **kwargs):
        seen.extend(zip(prompts, completions))
        return closeness_reward([c[0]["content"] for c in completions], answer)

    plain = make_dataset(8, 0)
    chat = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": p}] for p in plain["prompt"]], "answer": plain["answer"]}
    )
    chat_trainer = _resampling_trainer(chat_toy_path, tmp_path, [recording, reward_model_path], dataset=chat)
    plain_trainer = _resampling_trainer(chat_toy_path, tmp_path, [closeness_reward, reward_model_path], dataset=plain)
    completions, _ = chat_trainer._generate(chat["prompt"][:2], seed=3)
    plain_completions, _ = plain_trainer._generate(plain["prompt"][:2], seed=3)
    # the template renders the messages as the plain prompt: same tokens in, same samples out
    assert completions == [[[{"role": "assistant", "content": c}] for c in group] for group in plain_completions]
    chat_trainer._refresh()
    assert seen and all(isinstance(p, list) and c[0]["role"] == "assistant" for p, c in seen)
    window = chat_trainer._window
    assert len(window) > 0 and isinstance(window["chosen"][0], list)
    for prompt, prompt_ids in zip(window["prompt"], window["prompt_ids"]):
        rendered = chat_trainer.processing_class.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)
        assert prompt_ids == rendered["input_ids"] == chat_trainer.processing_class(prompt[0]["content"]).input_ids
    # same completions, same labels: the reward model scored the templated conversation, which is the plain text
    rows = [0, 1]
    ids = [[[0]] * 3] * 2
    flat = lambda groups: [s for group in groups for s in group]  # noqa: E731
    assert flat(chat_trainer._score(rows, completions, ids)) == pytest.approx(
        flat(plain_trainer._score(rows, plain_completions, ids)), rel=1e-6
    )
    assert math.isfinite(logged(train(chat_trainer), "loss")[1])  # and DPO trains on the conversational window


@pytest.mark.parametrize(
    "reward_funcs, overrides, error, message",
    [
        ([torch.nn.Linear(2, 1)], {}, TypeError, "not a transformers PreTrainedModel"),
        ([42], {}, TypeError, "expected a reward function"),
        ([closeness_reward], {"reward_weights": [1.0, 2.0]}, ValueError, "reward_weights has 2 weights for 1"),
    ],
)
def test_bad_rewards_are_refused(toy_path, tmp_path, reward_funcs, overrides, error, message):
    with pytest.raises(error, match=message):
        _resampling_trainer(toy_path, tmp_path, reward_funcs, **overrides)


def test_reward_weights_need_resampling_and_finite_values(tmp_path):
    with pytest.raises(ValueError, match="reward_weights=\\[1.0\\] only acts at a refresh"):
        make_config(tmp_path, reward_weights=[1.0])
    with pytest.raises(ValueError, match="reward_weights must be a list of finite numbers"):
        make_config(tmp_path, resample_every=2, reward_weights=[float("nan")])
