"""A testbed where the KL's placement matters: long completions, real entropy, a hackable proxy reward.

The addition toy (``trl_kl.toy``) has completions of 2-4 tokens and a policy that barely leaves its reference.
Here, everything offline and deterministic for a seed:

* a synthetic *language*: a sparse first-order Markov chain over 24 letters (``a`` .. ``x``) fixed by
  ``LANGUAGE_SEED``: every letter has 6 successors with Dirichlet(1) weights (about 1.4 nats of entropy per
  token); three *keyword* letters (``KEYWORDS``) are rare: a keyword is a successor of only a third of the
  letters, with probability ``KEYWORD_PROB``, and of no keyword;
* the reference policy pi_ref: the toy's 2-layer Qwen2 (``toy.build_model``, width 64) with a character
  tokenizer, fitted by SFT on samples of the chain (``build_testbed``) until it matches the chain closely
  (``fit_report``: per-token KL(chain || model) and the entropy);
* prompts: ``PROMPT_LENGTH`` letters drawn from the chain; completions ``COMPLETION_LENGTH`` (48) tokens;
* a *proxy* reward, ``proxy_reward``: the number of keywords in the completion over ``COMPLETION_LENGTH`` (the
  fixed length, so stopping early never pays). The policy raises it by leaving pi_ref: by steering to the
  letters a keyword may follow and emitting keywords there, and, cheaper for the policy, by emitting keywords
  anywhere;
* a *gold* metric the proxy does not see, ``gold_score``: (keywords the grammar allows - transitions the grammar
  forbids) / ``COMPLETION_LENGTH``. A keyword in a forbidden place scores 0 for the gold metric, -1 for the
  transition it breaks. It rises while the policy finds grammatical keywords and falls once it buys proxy reward
  with ungrammatical text: RLHF's reward over-optimisation (a learned reward model that likes some feature,
  with the quality it was meant to measure -- here the grammar -- unseen by it), with the KL to pi_ref as the
  only thing holding the policy to the grammar;
* the exact per-state KL along sampled completions is measured by the benchmarks (``benchmarks/kl_ablation.py``'s
  ``evaluate_policy``: the vocabulary is 27 tokens, so the per-state KL is summed exactly).

``testbed_model_path`` builds pi_ref once into the cache (``$TRL_KL_CACHE``, ``toy.cached_model_path``: file
lock, atomic rename) in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen2ForCausalLM

from . import toy

LETTERS = "abcdefghijklmnopqrstuvwx"
VOCABULARY = ("<pad>", "<eos>", "<bos>", *LETTERS)
KEYWORDS = "kqx"
"""The letters the proxy reward counts."""
SUCCESSORS = 6
"""Letters each (non-keyword-only) state may be followed by, besides a keyword."""
KEYWORD_PROB = 0.04
"""The chain's probability of a keyword after a letter that allows one."""
KEYWORD_HOSTS = 8
"""How many letters allow a keyword after them (one keyword each)."""
LANGUAGE_SEED = 15
PROMPT_LENGTH = 4
COMPLETION_LENGTH = 48
SFT_STEPS = 400
SFT_BATCH = 64
SFT_LR = 3e-3
CACHE_NAME = "testbed-v1"
"""Bump the suffix whenever the language, the tokenizer, the model or the SFT defaults change."""


@dataclass(frozen=True)
class Size:
    """One size of the testbed: pi_ref's architecture (``Qwen2Config`` fields over the toy's), the completion
    length and the SFT budget."""

    completion_length: int
    sft_steps: int
    sft_batch: int
    sft_lr: float
    cache_name: str
    architecture: dict = field(default_factory=dict, hash=False)


SIZES = {
    "small": Size(COMPLETION_LENGTH, SFT_STEPS, SFT_BATCH, SFT_LR, CACHE_NAME),
    # ~100M parameters (12 layers, width 768), 256-token completions: for a GPU (docs/performance.md)
    "large": Size(256, 600, 32, 6e-4, "testbed-large-v1",
                  dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4)),
}


def transition_matrix(seed: int = LANGUAGE_SEED) -> torch.Tensor:
    """The chain's transition probabilities ``P[a, b] = P(next = b | current = a)`` over ``LETTERS`` (float64).

    Each letter gets ``SUCCESSORS`` non-keyword successors with Dirichlet(1) weights; ``KEYWORD_HOSTS`` non-keyword
    letters also allow one keyword (probability ``KEYWORD_PROB``, the rest scaled down). Deterministic in ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    n = len(LETTERS)
    keywords = [LETTERS.index(k) for k in KEYWORDS]
    plain = [i for i in range(n) if i not in keywords]
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for a in range(n):
        chosen = torch.tensor(plain)[torch.randperm(len(plain), generator=generator)[:SUCCESSORS]]
        weights = -torch.log(torch.rand(SUCCESSORS, generator=generator, dtype=torch.float64))  # Dirichlet(1)
        matrix[a, chosen] = weights / weights.sum()
    hosts = torch.tensor(plain)[torch.randperm(len(plain), generator=generator)[:KEYWORD_HOSTS]]
    for j, host in enumerate(hosts.tolist()):
        matrix[host] *= 1 - KEYWORD_PROB
        matrix[host, keywords[j % len(keywords)]] = KEYWORD_PROB
    return matrix


def stationary(matrix: torch.Tensor) -> torch.Tensor:
    """The chain's stationary distribution (power iteration)."""
    pi = torch.full((matrix.size(0),), 1.0 / matrix.size(0), dtype=matrix.dtype)
    for _ in range(2000):
        pi = pi @ matrix
    return pi / pi.sum()


def entropy_rate(matrix: torch.Tensor) -> float:
    """Per-token entropy of the chain in nats: sum_a pi(a) H(P[a, .])."""
    logs = torch.where(matrix > 0, matrix.log(), torch.zeros_like(matrix))
    return float(-(stationary(matrix) * (matrix * logs).sum(-1)).sum())


def sample_text(n: int, length: int, seed: int, matrix: torch.Tensor | None = None) -> list[str]:
    """``n`` strings of ``length`` letters from the chain, the first letter from its stationary distribution."""
    matrix = _matrix() if matrix is None else matrix
    generator = torch.Generator().manual_seed(seed)
    state = torch.multinomial(stationary(matrix).expand(n, -1), 1, generator=generator).squeeze(-1)
    rows = [state]
    for _ in range(length - 1):
        state = torch.multinomial(matrix[state], 1, generator=generator).squeeze(-1)
        rows.append(state)
    letters = torch.stack(rows, 1).tolist()
    return ["".join(LETTERS[i] for i in row) for row in letters]


def make_dataset(n: int, seed: int = 0, completion_length: int = COMPLETION_LENGTH) -> Dataset:
    """``n`` prompts of ``PROMPT_LENGTH`` letters drawn from the chain: columns ``prompt`` (str) and
    ``completion_length`` (the rewards' denominator, which TRL passes to them). Held-out sets use other seeds than
    training sets."""
    prompts = sample_text(n, PROMPT_LENGTH, seed=1_000_003 + seed)
    return Dataset.from_dict({"prompt": prompts, "completion_length": [completion_length] * n})


def build_tokenizer(completion_length: int = COMPLETION_LENGTH) -> PreTrainedTokenizerFast:
    """One token per letter (``toy.char_tokenizer``), left padding, room for prompt + completion."""
    return toy.char_tokenizer(VOCABULARY, model_max_length=max(64, PROMPT_LENGTH + completion_length))


def _counts(prompt: str, completion: str, matrix: torch.Tensor) -> tuple[int, int, int]:
    """Keywords, keywords the grammar allows where they stand, and forbidden transitions of ``completion`` (letters
    only) following ``prompt``."""
    keywords = valid_keywords = invalid = 0
    previous = prompt[-1] if prompt else None
    for letter in completion:
        if letter not in LETTERS:
            continue
        allowed = previous is None or matrix[LETTERS.index(previous), LETTERS.index(letter)] > 0
        if letter in KEYWORDS:
            keywords += 1
            valid_keywords += allowed
        invalid += not allowed
        previous = letter
    return keywords, valid_keywords, invalid


@functools.cache
def _matrix() -> torch.Tensor:
    """The language's transition matrix (``transition_matrix()``), built once."""
    return transition_matrix()


def _lengths(completions: list[str], completion_length) -> list[int]:
    """Each completion's denominator: the dataset's ``completion_length`` column, else ``COMPLETION_LENGTH``."""
    return list(completion_length) if completion_length is not None else [COMPLETION_LENGTH] * len(completions)


def proxy_reward(prompts: list[str], completions: list[str], completion_length=None, **kwargs) -> list[float]:
    """TRL reward function, the proxy: keywords in the completion / the fixed completion length (48, or the
    dataset's ``completion_length``), so stopping early never pays. Grammar-blind."""
    lengths = _lengths(completions, completion_length)
    return [sum(c in KEYWORDS for c in completion) / n for completion, n in zip(completions, lengths, strict=True)]


def gold_score(prompts: list[str], completions: list[str], completion_length=None, **kwargs) -> list[float]:
    """The gold metric (never a training reward): (keywords the grammar allows - forbidden transitions) / the
    completion length; the prompt's last letter precedes the first completion letter."""
    scores = []
    for prompt, completion, n in zip(prompts, completions, _lengths(completions, completion_length), strict=True):
        _, valid_keywords, invalid = _counts(prompt, completion, _matrix())
        scores.append((valid_keywords - invalid) / n)
    return scores


def invalid_rate(prompts: list[str], completions: list[str], completion_length=None) -> list[float]:
    """Forbidden transitions per completion token (the grammar errors the gold metric subtracts)."""
    lengths = _lengths(completions, completion_length)
    return [_counts(p, c, _matrix())[2] / n for p, c, n in zip(prompts, completions, lengths, strict=True)]


def _sft_batch(tokenizer, n: int, seed: int, completion_length: int = COMPLETION_LENGTH) -> torch.Tensor:
    texts = sample_text(n, PROMPT_LENGTH + completion_length, seed=seed, matrix=_matrix())
    return torch.tensor(tokenizer(texts, add_special_tokens=False).input_ids)


def fit_report(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, n: int = 256, seed: int = 7,
               completion_length: int = COMPLETION_LENGTH) -> dict:
    """How closely ``model`` matches the chain on ``n`` fresh samples, per completion-position token: mean
    KL(chain(.|prev) || model(.|context)), the model's entropy, the chain's, and the probability mass the model puts
    on forbidden transitions (and on ``<eos>``/specials)."""
    matrix = _matrix()
    ids = _sft_batch(tokenizer, n, seed, completion_length)
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device)).logits[:, PROMPT_LENGTH - 1 : -1].double().cpu()
    logq = torch.log_softmax(logits, -1)[..., 3:]  # letters only (specials are 0 under the chain)
    q = logq.exp()
    previous = ids[:, PROMPT_LENGTH - 1 : -1] - 3
    p = matrix[previous]
    logp = torch.where(p > 0, p.log(), torch.zeros_like(p))
    return {
        "kl_chain_model": float((p * (logp - logq)).sum(-1).mean()),
        "model_entropy": float(-(q * logq).sum(-1).mean()),
        "chain_entropy": float(-(p * logp).sum(-1).mean()),
        "forbidden_mass": float((q * (p == 0)).sum(-1).mean() + (1 - q.sum(-1)).mean()),
        "keyword_share": float(q[..., [LETTERS.index(k) for k in KEYWORDS]].sum(-1).mean()),
    }


def sft(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, steps: int = SFT_STEPS, seed: int = 0,
        batch_size: int = SFT_BATCH, lr: float = SFT_LR, completion_length: int = COMPLETION_LENGTH) -> list[float]:
    """Next-token SFT on fresh chain samples (every position after the first), AdamW with a cosine decay to 0;
    returns the losses (the chain's entropy rate is the floor)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    batches = (_sft_batch(tokenizer, batch_size, 10_000 * seed + step, completion_length).to(model.device)
               for step in range(steps))
    return toy.supervised_steps(model, ({"input_ids": ids, "labels": ids} for ids in batches), optimizer, schedule)


def build_testbed(seed: int = 0, steps: int | None = None, size: str = "small",
                  device: str = "cpu") -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """pi_ref (by default the toy's 2-layer Qwen2 on the letter vocabulary; ``size="large"``: ~100M parameters)
    SFT'd on the chain for ``steps`` steps (the size's default when None) on ``device``, back on the CPU in eval
    mode, and its tokenizer."""
    spec = SIZES[size]
    tokenizer = build_tokenizer(spec.completion_length)
    model = toy.build_model(tokenizer, seed, **spec.architecture).to(device)
    sft(model, tokenizer, steps=spec.sft_steps if steps is None else steps, seed=seed, batch_size=spec.sft_batch,
        lr=spec.sft_lr, completion_length=spec.completion_length)
    return model.cpu(), tokenizer


def testbed_model_path(cache_dir: str | os.PathLike | None = None, size: str = "small") -> str:
    """Folder of the default ``build_testbed(size=size)`` model and tokenizer, ``<cache_dir>/testbed-v1`` (small)
    or ``testbed-large-v1``, built on first use (on the GPU when there is one)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return toy.cached_model_path(SIZES[size].cache_name, lambda: build_testbed(size=size, device=device), cache_dir)
