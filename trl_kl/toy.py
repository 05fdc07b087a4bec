"""An offline toy policy for tests, CI and the GRPO demo: no download, a few seconds on a CPU.

Everything here is synthetic and deterministic for a given seed:

* a character-level tokenizer (digits, ``+``, ``=``, space, ``<pad>``, ``<eos>``, ``<bos>``), a
  ``PreTrainedTokenizerFast`` that left-pads, as TRL's GRPO expects;
* a tiny Qwen2 causal LM (2 layers, width 64) sized to that vocabulary;
* a verifiable task, adding two numbers up to 64: the prompt ``"23+45="`` is answered by ``"68"``
  then ``<eos>``;
* TRL-style reward functions for it (``correctness_reward``, ``closeness_reward``);
* a short supervised warm start that leaves the policy well above chance but far from solving the
  task, so RL has something to improve;
* ``toy_model_path``, which builds that policy once into an on-disk cache that ``from_pretrained``
  loads offline, and ``resolve_model_name`` so ``trl-kl`` accepts ``--model_name_or_path toy``;
* ``offline_preferences``: toy preference pairs for DPO.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

VOCABULARY = ("<pad>", "<eos>", "<bos>", *"0123456789+=", "\u0120")
"""Special tokens, then one token per character of the task; byte-level BPE spells the space "\u0120"."""
MAX_OPERAND = 64
"""Operands are 0..64, so answers are 0..128: one to three characters."""
TEST_FRACTION = 0.2
SPLIT_SEED = 1234
"""Seeds the fixed train/test partition of all (a, b) pairs; independent of the sampling seed."""

DEFAULT_SFT_STEPS = 200
"""With seed 0: greedy test accuracy 0.32, sampled (temperature 1) 0.20; untrained 0.0, 300 steps ~0.6."""
CACHE_NAME = "toy-v1"
"""Bump the suffix whenever the tokenizer, model, task or warm-start defaults change."""


def build_tokenizer() -> Qwen2Tokenizer:
    """Character-level tokenizer (digits, ``+``, ``=``, space): pads left, adds no special token."""
    return char_tokenizer(VOCABULARY, model_max_length=32)


def char_tokenizer(vocabulary: tuple[str, ...], model_max_length: int) -> Qwen2Tokenizer:
    """One token per entry of ``vocabulary`` (``<pad>``, ``<eos>``, ``<bos>`` first): pads left, adds no special token.

    It is a ``Qwen2Tokenizer`` (a ``PreTrainedTokenizerFast``: byte-level BPE without merges, so one
    token per character; other characters are dropped) because that is the class
    ``AutoTokenizer`` rebuilds for any ``qwen2`` checkpoint, whatever pipeline was saved: built as
    one, it encodes the same before saving and after reloading.
    """
    return Qwen2Tokenizer(
        vocab={token: i for i, token in enumerate(vocabulary)},
        merges=[],
        unk_token=None,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **architecture) -> Qwen2ForCausalLM:
    """A randomly initialised 2-layer Qwen2 (float32) whose generation stops at ``<eos>``; ``architecture``
    overrides its ``Qwen2Config`` fields (``hidden_size``, ``num_hidden_layers``, ...)."""
    config = Qwen2Config(**{
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        **architecture,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": tokenizer.model_max_length,
        "tie_word_embeddings": True,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    })
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _split_pairs(split: str) -> list[tuple[int, int]]:
    """All (a, b) operand pairs of one split; the partition is fixed by ``SPLIT_SEED``."""
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    random.Random(SPLIT_SEED).shuffle(pairs)
    n_test = int(len(pairs) * TEST_FRACTION)
    if split == "test":
        return pairs[:n_test]
    if split == "train":
        return pairs[n_test:]
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _problems(pairs: list[tuple[int, int]]) -> dict[str, list[str]]:
    """Prompts ("23+45=") and answers ("68") of the operand pairs."""
    return {"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]}


def make_dataset(n: int, seed: int = 0, split: str = "train") -> Dataset:
    """``n`` distinct addition problems drawn from ``split``: columns ``prompt`` and ``answer`` (str)."""
    return Dataset.from_dict(_problems(random.Random(seed).sample(_split_pairs(split), n)))


def offline_preferences(n: int, seed: int = 0, split: str = "train") -> Dataset:
    """Toy preference pairs "from another model": ``chosen`` is the correct sum, ``rejected`` a wrong number drawn
    uniformly from 0..128 (unlike the policy's own near misses). Columns ``prompt``, ``chosen``, ``rejected`` and
    ``answer`` (the reward functions read it); the data of ``trl-kl dpo --dataset_name toy``."""
    problems = make_dataset(n, seed=seed, split=split)
    rng = random.Random(seed + 1)
    rejected = []
    for answer in problems["answer"]:
        wrong = rng.randrange(2 * MAX_OPERAND + 1)
        while wrong == int(answer):
            wrong = rng.randrange(2 * MAX_OPERAND + 1)
        rejected.append(str(wrong))
    return Dataset.from_dict(
        {"prompt": problems["prompt"], "chosen": problems["answer"], "rejected": rejected, "answer": problems["answer"]}
    )


def _parse_int(text: str) -> int | None:
    """The integer that ``text`` spells (surrounding whitespace allowed), else None."""
    text = text.strip()
    return int(text) if re.fullmatch(r"[0-9]+", text) else None


def correctness_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """TRL reward function: 1.0 where the stripped completion equals the answer, else 0.0."""
    return [float(c.strip() == a.strip()) for c, a in zip(completions, answer, strict=True)]


def closeness_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """TRL reward function: 1 / (1 + |prediction - answer|) in [0, 1], 0.0 when the completion is no integer."""
    rewards = []
    for completion, target in zip(completions, answer, strict=True):
        prediction = _parse_int(completion)
        rewards.append(0.0 if prediction is None else 1.0 / (1.0 + abs(prediction - int(target))))
    return rewards


def _sft_tensors(tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + answer + <eos>`` rows, one per pair, labelled only on ``answer + <eos>``."""
    problems = _problems(pairs)
    prompts = tokenizer(problems["prompt"], add_special_tokens=False).input_ids
    answers = tokenizer(problems["answer"], add_special_tokens=False).input_ids
    width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True)) + 1
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    labels = torch.full((len(prompts), width), -100)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        target = answer + [tokenizer.eos_token_id]
        input_ids[row, : len(prompt) + len(target)] = torch.tensor(prompt + target)
        labels[row, len(prompt) : len(prompt) + len(target)] = torch.tensor(target)
    return {"input_ids": input_ids, "attention_mask": (input_ids != tokenizer.pad_token_id).long(), "labels": labels}


def warm_start(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    steps: int = DEFAULT_SFT_STEPS,
    seed: int = 0,
    batch_size: int = 256,
    lr: float = 3e-3,
) -> list[float]:
    """Supervised fine-tuning on the train split (AdamW, loss on answer + ``<eos>`` only); returns the losses."""
    torch.manual_seed(seed)
    train = _sft_tensors(tokenizer, _split_pairs("train"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    batches = ({key: value[indices] for key, value in train.items()}
               for indices in torch.randint(len(train["input_ids"]), (steps, batch_size)))
    return supervised_steps(model, batches, optimizer)


def supervised_steps(model: PreTrainedModel, batches, optimizer, schedule=None) -> list[float]:
    """One optimizer step per batch (model inputs with ``labels``), the model in train mode, then eval mode;
    ``schedule`` (a learning-rate scheduler) steps after each. Returns the losses."""
    model.train()
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    temperature: float = 0.0,
    max_new_tokens: int = 4,
    batch_size: int = 512,
) -> list[str]:
    """Decoded completions of ``prompts`` (left-padded batches); greedy when ``temperature`` is 0."""
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    completions = []
    for start in range(0, len(prompts), batch_size):
        inputs = tokenizer(
            text=prompts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        ).to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, **sampling)
        completions += tokenizer.batch_decode(output[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    return completions


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    dataset: Dataset,
    num_samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """Mean ``correctness`` and ``closeness`` of ``num_samples`` completions per prompt of ``dataset``.

    Greedy when ``temperature`` is 0, else sampled with the RNG seeded by ``seed``. The global RNG
    state and the model's train/eval mode are restored afterwards.
    """
    prompts = [prompt for prompt in dataset["prompt"] for _ in range(num_samples)]
    answers = [answer for answer in dataset["answer"] for _ in range(num_samples)]
    training = model.training
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        completions = generate_completions(model, tokenizer, prompts, temperature, max_new_tokens)
    model.train(training)
    return {
        "correctness": sum(correctness_reward(completions, answers)) / len(completions),
        "closeness": sum(closeness_reward(completions, answers)) / len(completions),
    }


def build_toy(seed: int = 0, sft_steps: int = DEFAULT_SFT_STEPS) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """The toy policy (warm-started for ``sft_steps`` steps, in eval mode) and its tokenizer."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    warm_start(model, tokenizer, steps=sft_steps, seed=seed)
    return model, tokenizer


def _save_built(path: Path, build) -> None:
    """Save ``build()``'s (model, tokenizer) into a temporary sibling of ``path`` and rename it into place."""
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model, tokenizer = build()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(path)
    except OSError:
        if not path.is_dir():  # a failed save, not a lost race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cached_model_path(name: str, build, cache_dir: str | os.PathLike | None = None) -> str:
    """Folder ``<cache_dir>/<name>`` holding ``build()``'s (model, tokenizer), saved there on first use.

    ``cache_dir`` defaults to ``$TRL_KL_CACHE`` or ``~/.cache/trl_kl``. Concurrent callers (torchrun ranks) wait on
    a file lock while one of them builds, and the folder is renamed into place only once complete, so it is never
    seen half-written; should two builds still race (no working lock), the first rename wins and the other copy is
    dropped."""
    root = Path(cache_dir or os.environ.get("TRL_KL_CACHE", "~/.cache/trl_kl")).expanduser()
    path = root / name
    if not path.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.is_dir():
                _save_built(path, build)
    return str(path)


def toy_model_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Folder of the default ``build_toy()`` model and tokenizer, ``<cache_dir>/toy-v1``, saved there on first use
    (``cached_model_path``: file lock, atomic rename)."""
    return cached_model_path(CACHE_NAME, build_toy, cache_dir)


def resolve_model_name(name: str) -> str:
    """``toy_model_path()`` for the name ``"toy"``, any other model name or path unchanged."""
    return toy_model_path() if name == "toy" else name
