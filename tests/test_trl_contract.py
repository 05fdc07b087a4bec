"""The contract of every entry of ``trl_kl._trl`` with the installed TRL and transformers.

Each test pins one entry (numbered as in ``trl_kl/_trl.py``'s docstring): its presence and signature, and its
behaviour on a tiny case, mostly on stock ``trl.GRPOTrainer`` / ``trl.DPOTrainer`` objects (what trl_kl subclasses),
so a TRL release that changes an internal fails here with a message naming the entry, before anything trains
wrongly.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_batch import B, fixed_batch, make_config, make_trainer
from trl_kl import _trl, importance, kl
from vllm_double import FakeVLLMGeneration

ROOT = Path(__file__).resolve().parent.parent


def entry(name: str) -> str:
    return f"trl_kl._trl entry {name!r} no longer holds for the installed TRL {trl.__version__}"


@pytest.fixture(scope="module")
def stock(toy_path, tmp_path_factory):
    """A stock trl.GRPOTrainer (beta 0.1, so a reference model and TRL's own KL term) on the toy policy."""
    args = make_config(tmp_path_factory.mktemp("contract"), cls=trl.GRPOConfig, num_iterations=2)
    trainer = make_trainer(toy_path, args, cls=trl.GRPOTrainer)
    with torch.no_grad():  # the reference starts as a copy of the policy: move it, so TRL's KL term is not 0
        for p in trainer.ref_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return trainer


def _on_policy_batch(trainer):
    batch, logps = fixed_batch(trainer)
    batch.pop("old_per_token_logps")
    return batch, logps


# ---------------------------------------------------------------------------------------------------
# The version check and the hook signatures
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["grpo", "ppo", "dpo"])
def test_every_trainer_module_imports_the_seam_before_trl(module):
    """Each trainer module's first import after ``__future__`` is ``from . import _trl``, which runs the version
    check before anything of TRL's is imported (next test)."""
    tree = ast.parse((ROOT / "trl_kl" / f"{module}.py").read_text())
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    first = next(node for node in imports if not (isinstance(node, ast.ImportFrom) and node.module == "__future__"))
    assert isinstance(first, ast.ImportFrom) and first.level == 1 and [a.name for a in first.names] == ["_trl"], (
        f"trl_kl/{module}.py must import _trl first (the TRL version check)"
    )


def test_the_seam_refuses_an_untested_trl_before_importing_its_internals(monkeypatch):
    source = (ROOT / "trl_kl" / "_trl.py").read_text()
    assert source.index("check_trl_version()") < source.index("import trl")
    monkeypatch.delenv("TRL_KL_SKIP_VERSION_CHECK", raising=False)
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(ImportError, match=r"trl>=1.16.0,<1.17.0"):
        importlib.reload(_trl)  # raises at the check, before the module's names are redefined


@pytest.mark.parametrize("hook", _trl.HOOKS, ids=[f"{h.owner.__name__}.{h.name}" for h in _trl.HOOKS])
def test_hook_signature(hook):
    assert hook.signature_problem() is None, f"{entry(hook.name)}: {hook.signature_problem()} ({hook.contract})"


def test_signature_problem_names_a_change():
    """The check itself can fail: a parameter renamed or a method gone is reported."""
    renamed = _trl.Hook(trl.GRPOTrainer, "_compute_loss", ("model", "batch"), "")
    gone = _trl.Hook(trl.GRPOTrainer, "_no_such_hook", (), "")
    assert "now takes ('model', 'inputs')" in renamed.signature_problem()
    assert "no longer exists" in gone.signature_problem()


# ---------------------------------------------------------------------------------------------------
# GRPO: rewards, rollout, loss, forward, micro-step counter, metrics, checkpoints (entries 1-6, 12-14)
# ---------------------------------------------------------------------------------------------------


def test_calculate_rewards_returns_every_function_with_nan_for_none(stock):
    def first(completions, **kwargs):
        return [1.0, None, 0.5, None]

    def second(completions, **kwargs):
        return [2.0, None, None, 3.0]

    funcs = stock.reward_funcs, stock.reward_func_names, stock.reward_processing_classes
    stock.reward_funcs, stock.reward_func_names = [first, second], ["a", "b"]
    stock.reward_processing_classes = [None, None]
    try:
        inputs = [{"prompt": "1+1=", "answer": "2"}] * 4
        rewards = stock._calculate_rewards(inputs, ["1+1="] * 4, ["2", "3", "4", "5"], [[1]] * 4)
    finally:
        stock.reward_funcs, stock.reward_func_names, stock.reward_processing_classes = funcs
    expected = torch.tensor([[1.0, 2.0], [math.nan, math.nan], [0.5, math.nan], [math.nan, 3.0]])
    assert torch.equal(torch.isnan(rewards), torch.isnan(expected)), entry("_calculate_rewards")
    assert torch.equal(torch.nan_to_num(rewards), torch.nan_to_num(expected)), entry("_calculate_rewards")


def test_rollout_dict(stock, monkeypatch):
    """Entry 2: the rollout's keys and shapes; _calculate_rewards runs once; reference log-probs iff beta != 0."""
    calls = []
    original = stock._calculate_rewards
    monkeypatch.setattr(stock, "_calculate_rewards", lambda *a: calls.append(1) or original(*a))
    inputs = [{"prompt": p, "answer": "0"} for p in ["12+34=", "12+34=", "7+8=", "7+8="]]
    torch.manual_seed(0)
    out = stock._generate_and_score_completions(inputs)
    T = out["completion_ids"].size(1)
    assert calls == [1], entry("_generate_and_score_completions")
    for key, shape in (("prompt_mask", out["prompt_ids"].shape), ("completion_mask", (B, T)), ("advantages", (B,)),
                       ("ref_per_token_logps", (B, T))):
        assert tuple(out[key].shape) == tuple(shape), f"{entry('_generate_and_score_completions')}: {key}"
    assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum()), entry("_generate_and_score_completions")
    stock.beta = 0.0
    try:
        torch.manual_seed(0)
        assert stock._generate_and_score_completions(inputs).get("ref_per_token_logps") is None, entry("beta")
    finally:
        stock.beta = 0.1


def test_beta_switches_trls_kl_term_and_the_context_turns_it_off(stock):
    """Entries 3, 14: TRL adds beta * k3 (times the ratio, here 1) exactly when beta != 0; inside
    ``trl_kl_term_off`` beta reads 0 and the loss is TRL's surrogate alone; beta is restored after."""
    batch, logps = _on_policy_batch(stock)
    with_term = stock._compute_loss(stock.model, dict(batch))
    with _trl.trl_kl_term_off(stock):
        assert stock.beta == 0.0
        without = stock._compute_loss(stock.model, dict(batch))
    assert stock.beta == 0.1
    mask = batch["completion_mask"].float()
    k3 = kl.k3(logps, batch["ref_per_token_logps"])
    term = 0.1 * ((k3 * mask).sum(1) / mask.sum(1)).mean()  # 'grpo' averaging
    assert with_term.item() == pytest.approx((without + term).item(), rel=1e-5, abs=1e-7), entry("_compute_loss")
    assert abs(term.item()) > 1e-4  # a real term


def test_vllm_rollout_carries_the_sampler_and_trl_multiplies_its_correction(stock, monkeypatch):
    """Entries 2, 3 (``sampler_logps``, ``sampler_correction``): a rollout generated through vLLM (the test
    double) carries the engine's per-token log-probs ``(B, T)`` (NaN where it could not score) and, with
    ``vllm_importance_sampling_correction``, TRL's correction (``importance.sampler_correction``'s formula), which
    ``_compute_loss`` multiplies its per-token policy loss by; without the correction there is none."""
    tok = stock.processing_class
    completions = [tok("46").input_ids, tok("4").input_ids, tok("15").input_ids, tok("1").input_ids]
    logprobs = [[-1.0] * len(c) for c in completions]
    logprobs[1][0] = None
    fake = FakeVLLMGeneration(completions, logprobs)
    values = dict(use_vllm=True, vllm_generation=fake, _last_loaded_step=-1, vllm_importance_sampling_correction=True,
                  vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_min=None,
                  vllm_importance_sampling_clip_max=3.0)
    for name, value in values.items():
        monkeypatch.setattr(stock, name, value, raising=False)
    inputs = [{"prompt": p, "answer": "0"} for p in ["12+34=", "12+34=", "7+8=", "7+8="]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = stock._generate_and_score_completions(inputs)
    engine, correction, mask = _trl.sampler_logps(out), _trl.sampler_correction(out), out["completion_mask"]
    assert engine.shape == mask.shape and int(torch.isnan(engine).sum()) == 1, entry("sampler_logps")
    expected = importance.sampler_correction(out["old_per_token_logps"], engine, mask, "token_truncate", None, 3.0)
    torch.testing.assert_close(correction, expected, rtol=0, atol=0, msg=entry("sampler_correction"))
    batch = {**out, "advantages": torch.tensor([1.0, 0.3, 0.5, 0.2])}
    ones = torch.ones_like(correction)
    with _trl.trl_kl_term_off(stock):
        full = stock._compute_loss(stock.model, {**batch, "importance_sampling_ratio": ones})
        half = stock._compute_loss(stock.model, {**batch, "importance_sampling_ratio": 0.5 * ones})
    assert abs(full.item()) > 1e-4 and half.item() == pytest.approx(0.5 * full.item(), rel=1e-6), entry("_compute_loss")
    monkeypatch.setattr(stock, "vllm_importance_sampling_correction", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = stock._generate_and_score_completions(inputs)
    assert _trl.sampler_correction(out) is None and _trl.sampler_logps(out) is not None, entry("sampler_correction")
    assert _trl.sampler_logps(_on_policy_batch(stock)[0]) is None, entry("sampler_logps")


def test_policy_forward_runs_once_before_the_advantages_are_read(stock):
    """Entries 3, 4: within TRL's _compute_loss the policy forward is the one call of
    _get_per_token_logps_and_entropies, and advantages ``(B, T)`` written after it are the ones the surrogate uses."""
    batch, logps = _on_policy_batch(stock)
    shaped = torch.randn(logps.shape, generator=torch.Generator().manual_seed(3))
    seen = []

    def ready(forward):
        seen.append(forward)
        inputs["advantages"] = shaped

    inputs = dict(batch)
    with _trl.trl_kl_term_off(stock), _trl.on_policy_forward(stock, ready):
        loss = stock._compute_loss(stock.model, inputs)
    assert "_get_per_token_logps_and_entropies" not in vars(stock)  # the interception is gone
    assert len(seen) == 1, entry("_get_per_token_logps_and_entropies")
    assert torch.allclose(seen[0].logps, logps, atol=1e-6), entry("_get_per_token_logps_and_entropies")
    assert seen[0].hidden_states is None and seen[0].batch_size == B
    with _trl.trl_kl_term_off(stock):
        expected = stock._compute_loss(stock.model, {**batch, "advantages": shaped})
    assert torch.equal(loss, expected), entry("_compute_loss")
    calls = []
    original = stock._get_per_token_logps_and_entropies
    stock._get_per_token_logps_and_entropies = wrapper = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        stock._compute_loss(stock.model, dict(batch))
        assert calls == [1], entry("_get_per_token_logps_and_entropies")
        # an instance wrapper already there (a profiler's, a benchmark's) is called through, and kept
        with _trl.on_policy_forward(stock, seen.append):
            stock._compute_loss(stock.model, dict(batch))
        assert calls == [1, 1] and len(seen) == 2 and vars(stock)["_get_per_token_logps_and_entropies"] is wrapper
    finally:
        del stock._get_per_token_logps_and_entropies


def test_logps_in_micro_batches_and_hidden_states(stock):
    """Entries 4, 18: the micro-batch size does not change the log-probs; the captured final hidden states,
    projected by the LM head, give them back."""
    batch, logps = _on_policy_batch(stock)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    K = batch["completion_ids"].size(1)
    seen = []
    with torch.no_grad(), _trl.on_policy_forward(stock, seen.append, capture_hidden_states=True):
        out = stock._get_per_token_logps_and_entropies(stock.model, ids, attention, K, batch_size=1)
    torch.testing.assert_close(out[0], logps, rtol=1e-5, atol=1e-6, msg=entry("_get_per_token_logps_and_entropies"))
    head = _trl.lm_head_args(_trl.fused_head_model(stock, stock.model))
    logits = (seen[0].hidden_states @ head["weight"].T) / stock.temperature
    projected = torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(projected[mask], logps[mask], rtol=1e-5, atol=1e-5, msg=entry("fused LM head"))


def test_micro_step_counter_and_buffered_rollout(stock, toy_path):
    """Entries 5, 12: TRL serves ``_buffered_inputs[_step % steps_per_generation]`` without generating while
    ``_step % (steps_per_generation * num_iterations) != 0``, and training_step counts the micro-batch in _step."""
    batch, _ = fixed_batch(stock)
    saved = _trl.rollout_state(stock)
    try:
        _trl.restore_rollout_state(stock, {"step": 1, "buffered_inputs": [batch]})  # num_iterations=2: mid-rollout
        assert stock._prepare_inputs(None) is batch, entry("_buffered_inputs")
        stock.training_step(stock.model, [{}], batch["num_items_in_batch"])
        assert _trl.rollout_state(stock)["step"] == 2, entry("_step")
        assert _trl.optimizer_step_ended(stock)  # gradient accumulation 1: every micro-batch closes a step
        stock.current_gradient_accumulation_steps = 4
        assert not _trl.optimizer_step_ended(stock)
    finally:
        stock.current_gradient_accumulation_steps = 1
        _trl.restore_rollout_state(stock, saved)
        stock.model.zero_grad()


def test_metrics_are_averaged_by_log_and_cleared(stock):
    """Entry 13: values appended to ``metrics(trainer, mode)[key]`` are logged as their mean, then cleared."""
    for values in stock._metrics["train"].values():
        values.clear()
    _trl.metrics(stock, "train")["contract/x"].extend([1.0, 3.0])
    stock.log({})
    assert stock.state.log_history[-1]["contract/x"] == 2.0, entry("_metrics")
    assert not _trl.metrics(stock, "train").get("contract/x"), entry("_metrics")


def test_checkpoint_folder_is_where_the_trainer_saves(stock):
    """Entry 6: Trainer._save_checkpoint writes <run folder>/checkpoint-<global step>."""
    stock.create_optimizer_and_scheduler(num_training_steps=1)
    stock.state.global_step = 7
    stock._save_checkpoint(stock.model, None)
    folder = _trl.checkpoint_folder(stock, None)
    assert folder == os.path.join(stock.args.output_dir, "checkpoint-7")
    assert os.path.exists(os.path.join(folder, "model.safetensors")), entry("_save_checkpoint")
    assert os.path.exists(os.path.join(folder, "trainer_state.json")), entry("_save_checkpoint")


def test_reference_model_is_trls(stock):
    """Entry 17: without PEFT the reference is TRL's ref_model, run as it is."""
    ref, context = _trl.reference_model(stock)
    assert ref is stock.ref_model, entry("reference model")
    with context:
        pass


def test_use_adapter_disables_the_adapters(toy_path):
    """Entry 17: ``use_adapter(model, None)`` runs the PEFT model with its adapters off (the base model)."""
    from peft import LoraConfig, get_peft_model

    assert list(inspect.signature(_trl.use_adapter).parameters) == ["model", "adapter_name"], entry("use_adapter")
    base = AutoModelForCausalLM.from_pretrained(toy_path)
    ids = torch.tensor([[3, 4, 13, 5, 14]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(base, lora)
        assert not torch.allclose(peft_model(input_ids=ids).logits, expected)
        with _trl.use_adapter(peft_model, adapter_name=None):
            torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, msg=entry("use_adapter"))


# ---------------------------------------------------------------------------------------------------
# The mirrored routines (entries 20, 21)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"])
def test_aggregate_like_trl_is_trls_normaliser(stock, loss_type):
    """Entry 20: TRL's KL term is beta * (TRL's normaliser of k3), for every loss_type, with gradient accumulation:
    exactly what ``aggregate_like_trl`` computes. (On-policy the ratio TRL multiplies k3 by is 1.)"""
    batch, logps = _on_policy_batch(stock)
    saved = stock.loss_type
    stock.loss_type, stock.current_gradient_accumulation_steps = loss_type, 2
    try:
        with_term = stock._compute_loss(stock.model, dict(batch)).item()
        with _trl.trl_kl_term_off(stock):
            without = stock._compute_loss(stock.model, dict(batch)).item()
        k3 = kl.k3(logps, batch["ref_per_token_logps"])
        ours = 0.1 * _trl.aggregate_like_trl(stock, k3, batch["completion_mask"].float(), batch).item()
    finally:
        stock.loss_type, stock.current_gradient_accumulation_steps = saved, 1
    assert abs(ours) > 1e-5
    assert with_term - without == pytest.approx(ours, rel=1e-4, abs=1e-7), entry(f"aggregate_like_trl ({loss_type})")


LM_HEAD_CONFIGS = {
    "plain": {},
    "logit_scale": {"logit_scale": 2.0},
    "output_multiplier": {"output_multiplier": 0.5},
    "lm_head_multiplier": {"lm_head_multiplier": 1.5},
    "logits_scaling": {"logits_scaling": 4.0},  # Granite, MiniCPM3: divides
    "logits_scaling-hyperclovax": {"logits_scaling": 4.0, "model_type": "hyperclovax"},  # multiplies
    "softcap": {"final_logit_softcapping": 0.8, "logit_scale": 3.0},
}


@pytest.mark.parametrize("overrides", list(LM_HEAD_CONFIGS.values()), ids=list(LM_HEAD_CONFIGS))
def test_lm_head_args_read_the_config_as_trls_fused_head(toy_path, overrides):
    """Entries 18, 21: TRL's fused LM head log-probs equal log_softmax(softcap(scale * h W^T) / T) at the labels, with
    the hidden states ``captured_hidden_states`` collects and the scale and cap ``lm_head_args`` reads."""
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(toy_path)
    for key, value in overrides.items():
        setattr(model.config, key, value)
    temperature = 0.7
    add_fused_lm_head(model, temperature=temperature)
    ids = torch.tensor([[3, 4, 13, 5, 14, 7, 1], [2, 8, 13, 9, 14, 10, 11]])
    with torch.no_grad(), _trl.captured_hidden_states(model) as states:
        trl_logps = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs  # (B, L - 1)
    args = _trl.lm_head_args(model)
    z = args["logit_scale"] * (states[0][:, :-1] @ args["weight"].T)
    cap = args["final_logit_softcapping"]
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    ours = torch.log_softmax(z / temperature, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours, trl_logps, rtol=1e-5, atol=1e-5, msg=entry(f"lm_head_args ({overrides})"))


# ---------------------------------------------------------------------------------------------------
# TRL's chunked divergence kernel and its tile globals (entry 19)
# ---------------------------------------------------------------------------------------------------


def test_chunked_divergence_globals_and_arguments():
    from trl.kernels import chunked_divergence as module

    assert (module.TOKEN_CHUNK_SIZE, module.VOCAB_CHUNK_SIZE) == (4096, 32768), entry("TOKEN/VOCAB_CHUNK_SIZE")
    parameters = list(inspect.signature(module.ChunkedDivergenceFunction.forward).parameters)[1:]
    assert parameters == [
        "student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias", "beta",
        "temperature", "student_logit_scale", "student_final_logit_softcapping", "teacher_logit_scale",
        "teacher_final_logit_softcapping",
    ], entry("ChunkedDivergenceFunction")
    with _trl._tile_size(3, 5):
        assert (module.TOKEN_CHUNK_SIZE, module.VOCAB_CHUNK_SIZE) == (3, 5)
    assert (module.TOKEN_CHUNK_SIZE, module.VOCAB_CHUNK_SIZE) == (4096, 32768)
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, 4, generator=g, requires_grad=True), torch.randn(9, 4, generator=g)
    rh, rw = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g)
    common = dict(beta=1.0, temperature=1.0, logit_scale=1.0, final_logit_softcapping=None, ref_logit_scale=1.0,
                  ref_final_logit_softcapping=None)
    expected = kl.full_kl(h @ w.T, rh @ rw.T)  # beta=1.0: the reverse KL(student || teacher)
    for tile in ((None, None), (4, 2)):  # TRL's tile, then many tiles: the globals are read when it runs
        divergence, _ = _trl.chunked_divergence(h, w, None, rh, rw, None, **common, token_chunk_size=tile[0],
                                                vocab_chunk_size=tile[1])
        torch.testing.assert_close(divergence, expected, rtol=1e-5, atol=1e-6, msg=entry("ChunkedDivergenceFunction"))


# ---------------------------------------------------------------------------------------------------
# DPO and the training loop (entries 7-11, 15, 16)
# ---------------------------------------------------------------------------------------------------


class _RecordingDPOTrainer(trl.DPOTrainer):
    precomputed: list = []

    def _precompute_ref_logps(self, dataset, name, batch_size):
        self.precomputed.append((name, batch_size))
        return super()._precompute_ref_logps(dataset, name, batch_size)


@pytest.fixture(scope="module")
def dpo(toy_path, tmp_path_factory):
    pairs = Dataset.from_dict({"prompt": ["12+34=", "7+8="], "chosen": ["46", "15"], "rejected": ["47", "1"]})
    args = trl.DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("dpo") / "out"), per_device_train_batch_size=2, use_cpu=True,
        bf16=False, report_to="none", precompute_ref_log_probs=True, max_steps=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _RecordingDPOTrainer(
            model=toy_path, args=args, train_dataset=pairs, processing_class=AutoTokenizer.from_pretrained(toy_path)
        )
    return trainer


def test_dpo_dataset_preparation_and_reference_precomputation(dpo):
    """Entries 7, 8, 15, 16: TRL's preparation tokenizes each column as ``tokenize_prompt`` does; __init__ calls
    _precompute_ref_logps for the train set, which adds the reference log-probs."""
    precomputed, columns = _RecordingDPOTrainer.precomputed, set(dpo.train_dataset.column_names)
    assert precomputed and precomputed[0][0] == "train", entry("_precompute_ref_logps")
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= columns, entry("_precompute_ref_logps")
    tokenizer = _trl.dpo_tokenizer(dpo)
    assert tokenizer is dpo.processing_class, entry("_tokenizer")
    fresh = Dataset.from_dict({"prompt": ["5+5="], "chosen": ["10"], "rejected": ["11"]})
    prepared = _trl.prepare_dpo_dataset(dpo, fresh, "contract")
    prompt_ids = _trl.tokenize_prompt(tokenizer, "5+5=")
    assert prompt_ids == tokenizer("5+5=")["input_ids"], entry("_tokenize")
    assert prepared[0]["prompt_ids"] == prompt_ids, entry("_prepare_dataset")
    assert prepared[0]["chosen_ids"][:2] == tokenizer("10")["input_ids"], entry("_prepare_dataset")
    assert _trl.train_batch_size(dpo) == 2, entry("_train_batch_size")


def test_dpo_loss_first_forward_is_the_policys(dpo):
    """Entry 9: the first forward of the policy module inside DPO's compute_loss is its fused forward on
    [chosen; rejected], with per-token ``log_probs``."""
    batch = dpo.data_collator([dpo.train_dataset[i] for i in range(2)])
    captured = []
    handle = dpo.model.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            dpo.compute_loss(dpo.model, dict(batch))
    finally:
        handle.remove()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        own = dpo.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                        fused_lm_head=True, use_cache=False)
    assert captured and captured[0].log_probs.shape[0] == 4, entry("DPOTrainer.compute_loss")  # 2 chosen + 2 rejected
    torch.testing.assert_close(captured[0].log_probs, own.log_probs, msg=entry("DPOTrainer.compute_loss"))


def test_get_batch_samples_takes_num_batches_and_counts_items(dpo):
    """Entries 10, 11: the Trainer's per-step draw returns the next ``num_batches`` batches and the normaliser
    ``_get_num_items_in_batch`` computes for them."""
    batches = [{"input_ids": torch.ones(2, 3, dtype=torch.long)} for _ in range(3)]
    drawn, items = dpo.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    assert drawn == batches[:2], entry("get_batch_samples")
    assert items == _trl.num_items_in_batch(dpo, batches[:2], torch.device("cpu")), entry("_get_num_items_in_batch")
