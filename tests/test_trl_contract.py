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


def test_every_private_hook_trl_kl_overrides_is_an_entry():
    """A method of a trl_kl trainer or config (its mixins included) that overrides a private method of TRL or
    transformers is one of ``HOOKS``, so its signature is pinned (``test_hook_signature``)."""
    import trl_kl

    hooks = {hook.name for hook in _trl.HOOKS}
    classes = (trl_kl.GRPOTrainer, trl_kl.PPOTrainer, trl_kl.DPOTrainer, trl_kl.GRPOConfig, trl_kl.PPOConfig,
               trl_kl.DPOConfig)
    overrides = {
        (klass.__name__, name)
        for cls in classes
        for klass in cls.__mro__
        if klass.__module__.startswith("trl_kl")
        for name in vars(klass)
        if name.startswith("_") and not name.startswith("__")
        and any(name in vars(base) for base in cls.__mro__ if not base.__module__.startswith("trl_kl"))
    }
    assert overrides and not {o for o in overrides if o[1] not in hooks}, "private overrides missing from _trl.HOOKS"


def test_trl_internals_are_reached_only_through_the_seam():
    """Outside ``trl_kl/_trl.py`` trl_kl imports from TRL's submodules only what ``trl`` itself exports, no private
    name of any library (torch's ``_set_pg_timeout``, ...), and reads no private attribute it does not define
    itself, except the hooks of ``HOOKS`` (overridden or called)."""
    sources = {path: ast.parse(path.read_text()) for path in (ROOT / "trl_kl").rglob("*.py")}
    defined = {hook.name for hook in _trl.HOOKS}
    for tree in sources.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, ast.alias):
                defined.add(node.asname or node.name.split(".")[0])
    problems = []
    for path, tree in sources.items():
        if path.name == "_trl.py":
            continue
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and node.level == 0 and not node.module.startswith("trl_kl"):
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__future__"]
                if node.module.startswith("trl."):
                    private += [a.name for a in node.names if not hasattr(trl, a.name)]
                problems += [f"{where} imports {node.module}.{name}" for name in private]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if node.attr not in defined:
                    problems.append(f"{where} reads .{node.attr}")
    assert not problems, f"TRL/transformers internals outside trl_kl/_trl.py: {problems}"


def test_signature_problem_names_a_change():
    """The check itself can fail: a parameter renamed or a method gone is reported."""
    renamed = _trl.Hook(trl.GRPOTrainer, "_compute_loss", ("model", "batch"), "")
    gone = _trl.Hook(trl.GRPOTrainer, "_no_such_hook", (), "")
    assert "now takes ('model', 'inputs')" in renamed.signature_problem()
    assert "no longer exists" in gone.signature_problem()


# ---------------------------------------------------------------------------------------------------
# GRPO: rewards, rollout, loss, forward, micro-step counter, metrics, checkpoints (entries 1-6, 15-17, 22, 23)
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


def test_calculate_rewards_calls_the_items_of_reward_funcs(stock):
    """Entry 22: ``reward_functions`` is TRL's list itself, and ``_calculate_rewards`` calls its items, so a checking
    wrapper put into it (``guards.checked_reward_funcs``) is what runs; the names are ``reward_func_names``."""
    from trl_kl import guards

    def inf_reward(completions, **kwargs):
        return [math.inf] * len(completions)

    funcs = stock.reward_funcs, stock.reward_func_names, stock.reward_processing_classes
    stock.reward_funcs, stock.reward_func_names, stock.reward_processing_classes = [inf_reward], ["inf_reward"], [None]
    try:
        listed, names = _trl.reward_functions(stock)
        assert listed is stock.reward_funcs and names == ["inf_reward"], entry("reward_funcs")
        with guards.checked_reward_funcs(listed, names) as check:
            inputs = [{"prompt": "1+1=", "answer": "2"}] * 2
            rewards = stock._calculate_rewards(inputs, ["1+1="] * 2, ["2", "3"], [[1]] * 2)
        assert check.nonfinite == 2 and torch.isnan(rewards).all(), entry("reward_funcs (items called)")
        assert stock.reward_funcs == [inf_reward]  # restored
    finally:
        stock.reward_funcs, stock.reward_func_names, stock.reward_processing_classes = funcs


def test_beta_switches_trls_kl_term_and_the_context_turns_it_off(stock):
    """Entries 3, 17: TRL adds beta * k3 (times the ratio, here 1) exactly when beta != 0; inside
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
    """Entries 4, 21: the micro-batch size does not change the log-probs; the captured final hidden states,
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
    """Entries 5, 15: TRL serves ``_buffered_inputs[_step % steps_per_generation]`` without generating while
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
    """Entry 16: values appended to ``metrics(trainer, mode)[key]`` are logged as their mean, then cleared."""
    for values in stock._metrics["train"].values():
        values.clear()
    _trl.metrics(stock, "train")["contract/x"].extend([1.0, 3.0])
    stock.log({})
    assert stock.state.log_history[-1]["contract/x"] == 2.0, entry("_metrics")
    assert not _trl.metrics(stock, "train").get("contract/x"), entry("_metrics")


def test_checkpoint_folder_is_where_the_trainer_saves(stock):
    """Entries 6, 23: Trainer._save_checkpoint writes <run folder>/checkpoint-<global step>, then deletes the
    checkpoints beyond save_total_limit, which ``rotation_off`` turns off for the duration."""
    stock.create_optimizer_and_scheduler(num_training_steps=1)
    saved_limit, saved_step = stock.args.save_total_limit, stock.state.global_step
    stock.args.save_total_limit = 1
    try:
        stock.state.global_step = 7
        stock._save_checkpoint(stock.model, None)
        folder = _trl.checkpoint_folder(stock, None)
        assert _trl.run_folder(stock, None) == stock.args.output_dir, entry("_get_output_dir")
        assert folder == os.path.join(stock.args.output_dir, "checkpoint-7")
        assert os.path.exists(os.path.join(folder, "model.safetensors")), entry("_save_checkpoint")
        assert os.path.exists(os.path.join(folder, "trainer_state.json")), entry("_save_checkpoint")
        stock.state.global_step = 8
        with _trl.rotation_off(stock) as limit:
            assert limit == 1 and stock.args.save_total_limit is None
            stock._save_checkpoint(stock.model, None)
        assert stock.args.save_total_limit == 1
        run = stock.args.output_dir
        checkpoints = lambda: sorted(n for n in os.listdir(run) if n.startswith("checkpoint-"))  # noqa: E731
        assert checkpoints() == ["checkpoint-7", "checkpoint-8"], entry("save_total_limit (rotation_off)")
        stock.state.global_step = 9
        stock._save_checkpoint(stock.model, None)
        assert checkpoints() == ["checkpoint-9"], entry("save_total_limit (rotation)")
    finally:
        stock.args.save_total_limit, stock.state.global_step = saved_limit, saved_step


def test_reference_model_is_trls(stock):
    """Entry 20: without PEFT the reference is TRL's ref_model, run as it is."""
    ref, context = _trl.reference_model(stock)
    assert ref is stock.ref_model, entry("reference model")
    with context:
        pass


def test_use_adapter_disables_the_adapters(toy_path):
    """Entry 20: ``use_adapter(model, None)`` runs the PEFT model with its adapters off (the base model)."""
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
# The mirrored routines (entries 29, 30)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"])
def test_aggregate_like_trl_is_trls_normaliser(stock, loss_type):
    """Entry 29: TRL's KL term is beta * (TRL's normaliser of k3), for every loss_type, with gradient accumulation:
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
    """Entries 21, 30: TRL's fused LM head log-probs equal log_softmax(softcap(scale * h W^T) / T) at the labels, with
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
# TRL's chunked divergence kernel and its tile globals (entry 28)
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
    expected = kl.full_kl(h @ w.T, rh @ rw.T)  # beta=1.0: KL(student || teacher)
    for tile in ((None, None), (4, 2)):  # TRL's tile, then many tiles: the globals are read when it runs
        divergence, _ = _trl.chunked_divergence(h, w, None, rh, rw, None, **common, token_chunk_size=tile[0],
                                                vocab_chunk_size=tile[1])
        torch.testing.assert_close(divergence, expected, rtol=1e-5, atol=1e-6, msg=entry("ChunkedDivergenceFunction"))


# ---------------------------------------------------------------------------------------------------
# DPO and the training loop (entries 7-14, 18, 19)
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
    """Entries 7, 8, 18, 19: TRL's preparation tokenizes each column as ``tokenize_prompt`` does; __init__ calls
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


def test_compute_ref_log_probs_are_the_precomputed_reference_log_probs(dpo):
    """Entry 14: ``compute_ref_log_probs(model, batch)`` returns the reference's summed log-probs of the chosen and
    the rejected completions, ``(B,)`` each: those ``_precompute_ref_logps`` stored (the fixture is untrained)."""
    rows = [dpo.train_dataset[i] for i in range(2)]
    chosen, rejected = dpo.compute_ref_log_probs(dpo.model, dpo.data_collator(rows))
    assert chosen.shape == rejected.shape == (2,), entry("compute_ref_log_probs")
    expected = torch.tensor([[r["ref_chosen_logps"], r["ref_rejected_logps"]] for r in rows])
    torch.testing.assert_close(torch.stack([chosen, rejected], 1).float(), expected, rtol=1e-5, atol=1e-5,
                               msg=entry("compute_ref_log_probs"))


def test_grad_norm_and_save_model_calls_in_training(toy_path, tmp_path):
    """Entries 12, 13: in a training run (2 optimizer steps of 2 micro-batches, a checkpoint at step 2)
    ``_get_grad_norm`` is called once per optimizer step, with the gradients of the step in place and before
    ``optimizer.step()``; the checkpoint's ``save_model`` call has ``_internal_call=True``, a user's call not."""
    pairs = Dataset.from_dict({"prompt": ["12+34=", "7+8="] * 4, "chosen": ["46", "15"] * 4,
                               "rejected": ["47", "1"] * 4})
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         max_steps=2, save_strategy="steps", save_steps=2, use_cpu=True, bf16=False, report_to="none",
                         learning_rate=1e-3, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(model=toy_path, args=args, train_dataset=pairs,
                                 processing_class=AutoTokenizer.from_pretrained(toy_path))
    events = []
    grad_norm, save_model = trainer._get_grad_norm, trainer.save_model

    def record_grad_norm(model, grad_norm=None):
        has_grads = any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        events.append(("grad_norm", has_grads))
        return grad_norm_call(model, grad_norm=grad_norm)

    grad_norm_call = grad_norm
    trainer._get_grad_norm = record_grad_norm
    trainer.save_model = lambda output_dir=None, _internal_call=False: (
        events.append(("save_model", _internal_call)) or save_model(output_dir, _internal_call)
    )
    trainer.create_optimizer()
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: events.append(("optimizer.step",)) or step(*a, **k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert events == [
        ("grad_norm", True), ("optimizer.step",), ("grad_norm", True), ("optimizer.step",), ("save_model", True),
        ("save_model", False),
    ], f"{entry('_get_grad_norm / save_model')}: {events}"


# ---------------------------------------------------------------------------------------------------
# torch, TRL's helpers and command line (entries 24-27)
# ---------------------------------------------------------------------------------------------------


def test_set_process_group_timeout(tmp_path):
    """Entry 24: torch's ``_set_pg_timeout(timeout, group=None)`` sets the gloo backend's timeout of the default
    group (read back from the backend's options)."""
    import datetime

    import torch.distributed as dist

    assert list(inspect.signature(dist.distributed_c10d._set_pg_timeout).parameters) == ["timeout", "group"], entry(
        "_set_pg_timeout"
    )
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        _trl.set_process_group_timeout(7)
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        assert backend.options._timeout == datetime.timedelta(seconds=7), entry("_set_pg_timeout")
    finally:
        dist.destroy_process_group()


def test_trainer_utils_helpers():
    """Entry 25: TRL's helpers from ``trl.trainer.utils`` do what trl_kl relies on."""
    import asyncio
    import functools

    async def async_reward(completions, **kwargs):
        return [1.0] * len(completions)

    def sync_reward(completions, **kwargs):
        return [1.0] * len(completions)

    class AsyncReward:
        async def __call__(self, completions, **kwargs):
            return [1.0]

    assert _trl.is_async_callable(async_reward) and _trl.is_async_callable(functools.partial(async_reward)), entry(
        "is_async_callable"
    )
    assert _trl.is_async_callable(AsyncReward()) and not _trl.is_async_callable(sync_reward), entry("is_async_callable")
    assert _trl.get_callable_name(functools.partial(sync_reward)) == "sync_reward", entry("get_callable_name")
    assert _trl.get_callable_name(AsyncReward()) == "AsyncReward", entry("get_callable_name")
    config = AutoModelForCausalLM.from_config(__import__("transformers").Qwen2Config(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1)).config
    config.name_or_path = "org/model"
    assert _trl.get_config_model_id(config) == "org/model", entry("get_config_model_id")
    padded = _trl.pad([torch.tensor([1, 2]), torch.tensor([3])], padding_value=0, padding_side="left")
    assert padded.tolist() == [[1, 2], [0, 3]], entry("pad")
    thread, loop, ready = _trl.start_event_loop_in_daemon(name="contract")
    ready.wait()
    assert asyncio.run_coroutine_threadsafe(async_reward(["a", "b"]), loop).result(timeout=10) == [1.0, 1.0]
    _trl.shutdown_event_loop_in_daemon(thread, loop)
    assert not thread.is_alive(), entry("shutdown_event_loop_in_daemon")


def test_model_helpers(dpo, toy_path):
    """Entry 26: TRL's generation unwrapping, FSDP full-parameter context, gradient-checkpointing switch, DeepSpeed
    preparation signature and TR-DPO reference mixing."""
    with _trl.unwrap_model_for_generation(
        dpo.model_wrapped, dpo.accelerator, gradient_checkpointing_kwargs=None
    ) as unwrapped, _trl.full_params(dpo, dpo.model_wrapped):
        assert unwrapped is dpo.accelerator.unwrap_model(dpo.model), entry("unwrap_model_for_generation")
    assert list(inspect.signature(_trl.prepare_deepspeed).parameters)[:2] == ["model", "accelerator"], entry(
        "prepare_deepspeed"
    )
    model = AutoModelForCausalLM.from_pretrained(toy_path)
    model.gradient_checkpointing_enable()
    with _trl.disable_gradient_checkpointing(model, None):
        assert not model.is_gradient_checkpointing, entry("disable_gradient_checkpointing")
    assert model.is_gradient_checkpointing, entry("disable_gradient_checkpointing")
    policy, reference = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = {k: 0.25 * v + 0.75 * reference.state_dict()[k] for k, v in policy.state_dict().items()}
    _trl.mix_into_reference(policy, reference, 0.25)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=entry("SyncRefModelCallback.sync_target_model"))


def test_command_line_internals():
    """Entry 27: the command line helpers ``trl-kl`` shares with ``trl grpo``."""
    import dataclasses

    argv = ["--config", "x.yaml", "--num_processes", "2", "--beta", "0.1", "--num_processes", "2"]
    assert _trl.subtract_subsequence(argv, ["--num_processes", "2"]) == [
        "--config", "x.yaml", "--beta", "0.1", "--num_processes", "2"
    ], entry("_subtract_subsequence")
    resolved = _trl.resolve_accelerate_config(["--accelerate_config", "multi_gpu", "--num_processes", "2"])
    assert resolved[0] == "--config_file" and resolved[1].endswith("multi_gpu.yaml"), entry("resolve_accelerate_config")
    assert resolved[2:] == ["--num_processes", "2"], entry("resolve_accelerate_config_argument")
    assert _trl.resolve_accelerate_config(["--num_processes", "2"]) == ["--num_processes", "2"]
    with pytest.raises(ValueError):
        _trl.resolve_accelerate_config(["--accelerate_config", "no_such_config"])
    fields = {f.name for f in dataclasses.fields(_trl.GRPOScriptArguments)}
    assert issubclass(_trl.GRPOScriptArguments, trl.ScriptArguments), entry("GRPOScriptArguments")
    assert {"reward_model_name_or_path", "reward_funcs"} <= fields, entry("GRPOScriptArguments")


# ---------------------------------------------------------------------------------------------------
# Values mirrored from TRL: its choices and its script's reward registry (entries 31, 32)
# ---------------------------------------------------------------------------------------------------


def _listed(config_class, name: str, opening: str | None = None, pattern: str = r"'([a-z_]+)'") -> set[str]:
    """The names ``pattern`` finds (by default single-quoted) in TRL's help text of the field ``name``: in the
    sentence that starts with ``opening`` (up to its full stop), or in the whole text."""
    import dataclasses
    import re

    text = {f.name: f for f in dataclasses.fields(config_class)}[name].metadata["help"]
    if opening is not None:
        start = text.index(opening)
        end = text.find(". ", start)
        text = text[start : end if end > 0 else len(text)]
    return set(re.findall(pattern, text))


def test_the_values_trl_accepts():
    """Entry 31: each value list is the one TRL's help text of the field lists; for DPO's loss types also the list
    of the error TRL raises for any other."""
    import re

    from trl_kl import advantages

    listed = {
        "GRPO_LOSS_TYPES": (_listed(trl.GRPOConfig, "loss_type", "Supported values"), _trl.GRPO_LOSS_TYPES),
        "MULTI_OBJECTIVE_AGGREGATIONS": (
            _listed(trl.GRPOConfig, "multi_objective_aggregation"), _trl.MULTI_OBJECTIVE_AGGREGATIONS
        ),
        "IMPORTANCE_SAMPLING_LEVELS": (
            _listed(trl.GRPOConfig, "importance_sampling_level"), importance.IMPORTANCE_SAMPLING_LEVELS
        ),
        "SAMPLER_CORRECTION_MODES": (
            _listed(trl.GRPOConfig, "vllm_importance_sampling_mode", "Supported options"),
            importance.SAMPLER_CORRECTION_MODES,
        ),
        "SCALE_MODES": (  # TRL's text quotes them `group'`, `'batch'`, `'none'`
            _listed(trl.GRPOConfig, "scale_rewards", pattern=r"`'?([a-z_]+)'`"), advantages.SCALE_MODES
        ),
        "F_DIVERGENCE_TYPES": (
            _listed(trl.DPOConfig, "f_divergence_type", "Possible values", pattern=r"`([a-z_]+)`"),
            _trl.F_DIVERGENCE_TYPES,
        ),
        "DPO_LOSS_TYPES": (_listed(trl.DPOConfig, "loss_type", "Possible values"), _trl.DPO_LOSS_TYPES),
    }
    for name, (trls, ours) in listed.items():
        assert trls == set(ours), f"{entry(name)}: TRL lists {sorted(trls)}"
    source = inspect.getsource(trl.DPOTrainer)
    error = source[source.index("Unknown loss type: {loss_type}. Should be one of [") :]
    assert set(re.findall(r"'([a-z_]+)'", error[: error.index("]")])) == set(_trl.DPO_LOSS_TYPES), entry(
        "DPO_LOSS_TYPES"
    )


def test_script_reward_registry_is_trls():
    """Entry 32: ``SCRIPT_REWARDS`` is the registry in ``main`` of ``trl/scripts/grpo.py`` (names, the factory's
    arguments), read from TRL's source; ``script_reward_registry`` makes the same functions."""
    import trl.rewards
    import trl.scripts.grpo

    tree = ast.parse(inspect.getsource(trl.scripts.grpo))
    registry = next(
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "reward_funcs_registry"
    )
    found = {}
    for key, value in zip(registry.keys, registry.values, strict=True):
        if isinstance(value, ast.Call):
            assert value.func.id == key.value, entry("SCRIPT_REWARDS")
            found[key.value] = {k.arg: ast.literal_eval(k.value) for k in value.keywords}
        else:
            assert value.id == key.value, entry("SCRIPT_REWARDS")
            found[key.value] = None
    assert found == _trl.SCRIPT_REWARDS, entry("SCRIPT_REWARDS")
    made = _trl.script_reward_registry()
    assert made["accuracy_reward"] is trl.rewards.accuracy_reward and callable(made["get_soft_overlong_punishment"])
