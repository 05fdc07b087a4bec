"""A test double of TRL 1.16's vLLM generation object (``trl.generation.vllm_generation.VLLMGeneration``), so
the ``use_vllm=True`` code path of ``GRPOTrainer._generate_and_score_completions`` runs without vLLM.

``FakeVLLMGeneration.generate`` has VLLMGeneration.generate's signature and return value
(``prompt_ids, completion_ids, logprobs, logprob_token_ids``, ``logprobs`` nested per token as vLLM's
top-k lists); it returns the completions and sampling log-probs it was given, one per prompt row, so a test
chooses a sampler that differs from the trainer's model on purpose. ``attach`` switches a trainer built
without vLLM onto it, with TRL's importance-sampling settings.
"""

from __future__ import annotations


class FakeVLLMGeneration:
    """Returns ``completion_ids[i]`` and ``logprobs[i]`` (floats, ``None`` for a token vLLM could not score)
    for the i-th prompt row of each ``generate`` call; counts the calls and the weight syncs."""

    def __init__(self, completion_ids: list[list[int]], logprobs: list[list[float | None]]):
        self.completion_ids, self.logprobs = completion_ids, logprobs
        self.generate_calls = self.sync_calls = 0

    def sync_weights(self):
        self.sync_calls += 1

    def generate(self, prompts, images, num_generations, profiler=None):
        self.generate_calls += 1
        rows = range(len(prompts))
        logprobs = [[[lp] for lp in self.logprobs[i]] for i in rows]
        token_ids = [[[t] for t in self.completion_ids[i]] for i in rows]
        return prompts, [list(self.completion_ids[i]) for i in rows], logprobs, token_ids


def attach(trainer, fake: FakeVLLMGeneration, mode: str = "sequence_mask", clip_min=None, clip_max=3.0, correction=True):
    """Make ``trainer`` generate through ``fake`` as if built with ``use_vllm=True`` and these
    ``vllm_importance_sampling_*`` settings (the attributes TRL 1.16's trainer reads)."""
    trainer.use_vllm = True
    trainer.vllm_generation = fake
    trainer._last_loaded_step = -1
    trainer.vllm_importance_sampling_correction = correction
    trainer.vllm_importance_sampling_mode = mode
    trainer.vllm_importance_sampling_clip_min = clip_min
    trainer.vllm_importance_sampling_clip_max = clip_max
    return trainer
