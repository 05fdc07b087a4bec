"""trl_kl's one seam with TRL 1.16 and transformers: every internal it relies on, with the contract it relies on.

TRL and transformers may change any of these in a minor release: private hooks trl_kl overrides, private attributes
it reads or writes, module globals it sets, routines it mirrors. Each is an entry here, and trl_kl reaches it only
through this module (or, for an overridden hook, under the contract written here). ``tests/test_trl_contract.py``
pins every entry against the installed libraries (presence, signature, behaviour on a tiny case) and names the
entry when one breaks. Importing this module first refuses a TRL outside the tested range
(``compat.check_trl_version``); every trainer module imports it before anything else of TRL's.

Entries
=======

Hooks trl_kl overrides or calls (``HOOKS``: owner, name, leading parameters, contract):

1. ``GRPOTrainer._calculate_rewards(inputs, prompts, completions, completion_ids_list)`` (override): returns the
   rewards of every process, ``(B_global, n_reward_funcs)``, NaN where a function returned None; called once per
   rollout, before TRL's advantages.
2. ``GRPOTrainer._generate_and_score_completions(inputs)`` (override): returns the rollout dict (``prompt_ids``,
   ``prompt_mask``, ``completion_ids``, ``completion_mask``, ``advantages`` ``(B,)``, ``old_per_token_logps`` or
   None on-policy, ``ref_per_token_logps`` when ``beta != 0``, ``num_items_in_batch``; with vLLM the engine's
   ``sampling_per_token_logps`` and, with ``vllm_importance_sampling_correction``, ``importance_sampling_ratio``:
   ``sampler_logps``, ``sampler_correction``); trl_kl may replace ``advantages``.
3. ``GRPOTrainer._compute_loss(model, inputs)`` (override): TRL's surrogate. It runs the policy forward first
   (entry 4), only then reads ``inputs["advantages"]`` (``(B,)`` or ``(B, T)``), ``old_per_token_logps`` and
   ``ref_per_token_logps``, multiplies its per-token policy loss by ``inputs["importance_sampling_ratio"]`` when
   vLLM generated with the correction on (not for ``vespo``, which folds it into its weights;
   ``sampler_correction``), and adds ``beta * k3`` per token (times the ratio with ``use_bias_correction_kl``)
   whenever ``trainer.beta != 0`` (``trl_kl_term_off``).
4. ``GRPOTrainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
   batch_size=None, ...)`` (intercepted: ``on_policy_forward``; called by PPO's rollout): ``(logps (B, T),
   entropies, aux_loss)``, in micro-batches of ``batch_size``; ``_compute_loss`` calls it exactly once, for the
   policy.
5. ``GRPOTrainer.training_step(model, inputs, num_items_in_batch)`` (override): counts micro-batches in ``_step``
   (``optimizer_step_ended``).
6. ``Trainer._save_checkpoint(model, trial)``, ``Trainer._load_optimizer_and_scheduler(checkpoint)`` (overrides):
   save / restore a checkpoint in ``checkpoint_folder``, ``<_get_output_dir(trial)>/checkpoint-<global step>``
   (``run_folder``; ``PREFIX_CHECKPOINT_DIR``, which ``trl_kl.checkpoints`` also finds checkpoints by).
7. ``DPOTrainer._prepare_dataset(dataset, processing_class, args, dataset_name)`` (override, and called on a window
   of fresh pairs: ``prepare_dpo_dataset``): tokenizes ``prompt``/``chosen``/``rejected`` into ``prompt_ids``,
   ``chosen_ids``, ``rejected_ids``.
8. ``DPOTrainer._precompute_ref_logps(dataset, name, batch_size)`` (override): called by ``__init__`` with
   ``precompute_ref_log_probs``; returns the dataset with ``ref_chosen_logps`` / ``ref_rejected_logps``.
9. ``DPOTrainer.compute_loss(model, inputs, return_outputs, num_items_in_batch)`` (override): its first model forward
   is the policy's fused forward on ``[chosen; rejected]``, whose output has ``log_probs``.
10. ``Trainer.get_batch_samples(epoch_iterator, num_batches, device)`` (override): returns ``(batches,
    num_items_in_batch)``; the training loop calls it once per optimizer step, before the step.
11. ``Trainer._get_num_items_in_batch(batch_samples, device)`` (called: ``num_items_in_batch``).
12. ``Trainer._get_grad_norm(model, grad_norm=None)`` (override): called once per optimizer step, after the
    backward passes and the clipping, before ``optimizer.step()``; returns the step's gradient norm (the
    non-finite guard, PPO's critic step).
13. ``Trainer.save_model(output_dir, _internal_call)`` (override): ``_internal_call`` is True when the Trainer saves a
    checkpoint's model itself (PPO writes the critic only on a user's call).
14. ``DPOTrainer.compute_ref_log_probs(model, inputs)`` (called): the reference's summed log-probs of the chosen
    and of the rejected completions of a collated batch, ``(B,)`` each.

Private attributes and functions (accessors here):

15. ``GRPOTrainer._step``, ``GRPOTrainer._buffered_inputs``: the micro-batch counter and the rollout being trained
    on (``rollout_state``, ``restore_rollout_state``, ``optimizer_step_ended``).
16. ``_metrics`` (GRPO, DPO): ``{mode: {key: [values]}}``, each list averaged and cleared by ``log`` (``metrics``).
17. ``GRPOTrainer.beta``: TRL's KL coefficient, which TRL reads as a switch: != 0 loads a reference model, computes
    ``ref_per_token_logps`` at rollout and adds TRL's KL term in ``_compute_loss`` (``trl_kl_term_off``).
18. ``Trainer._train_batch_size`` (``train_batch_size``), ``DPOTrainer._tokenizer`` (``dpo_tokenizer``).
19. ``trl.data_utils._tokenize`` (``tokenize_prompt``).
20. ``trl.trainer.utils.use_adapter``: the PEFT reference, as TRL's rollout picks it (``reference_model``).
21. TRL's fused LM head (``add_fused_lm_head``): ``model(..., fused_lm_head=True)`` projects the
    ``last_hidden_state`` of ``model.base_model`` (``captured_hidden_states``, ``fused_head_model``).
22. ``GRPOTrainer.reward_funcs``, ``reward_func_names``: the reward functions and models, in the order of the reward
    columns, and their names; ``_calculate_rewards`` calls the items of that list, so a wrapper put in it is what is
    called (``reward_functions``).
23. ``TrainingArguments.save_total_limit`` during a save: ``Trainer._save_checkpoint`` ends by deleting the
    checkpoints beyond it; None turns that off (``rotation_off``).
24. torch's ``distributed_c10d._set_pg_timeout(timeout, group=None)``: the timeout of an existing process group's
    collectives (``set_process_group_timeout``).
25. ``trl.trainer.utils`` helpers (not exported by ``trl``), re-exported here: ``is_async_callable``,
    ``get_callable_name``, ``get_config_model_id``, ``pad``, ``start_event_loop_in_daemon``,
    ``shutdown_event_loop_in_daemon``.
26. TRL's model helpers (not exported by ``trl``): ``trl.models.unwrap_model_for_generation``,
    ``trl.models.prepare_deepspeed``, ``trl.models.utils.disable_gradient_checkpointing``,
    ``trl.distributed.DistributedBackend(...).summon_full_params`` (``full_params``),
    ``SyncRefModelCallback.sync_target_model`` (``mix_into_reference``).
27. TRL's command line internals: ``trl.cli.commands.training._subtract_subsequence`` (``subtract_subsequence``),
    ``trl.cli.accelerate_config.resolve_accelerate_config_argument`` (``resolve_accelerate_config``),
    ``trl.scripts.grpo.GRPOScriptArguments`` (``GRPOScriptArguments``: ``reward_model_name_or_path``,
    ``reward_funcs``).

Module globals:

28. ``trl.kernels.chunked_divergence.TOKEN_CHUNK_SIZE`` / ``VOCAB_CHUNK_SIZE``: the tile of
    ``ChunkedDivergenceFunction``, read in its forward and its backward (``chunked_divergence``, which also relies on
    the function's positional arguments).

Routines and values mirrored from TRL (kept in step by tests against TRL itself):

29. ``aggregate_like_trl``: the per-``loss_type`` normaliser of ``GRPOTrainer._compute_loss``.
30. ``lm_head_args``: how ``add_fused_lm_head`` reads a model's logit scale and softcapping from its config.
31. The values TRL accepts for its string fields, which trl_kl's configs check at construction (TRL refuses the
    others only inside ``train()``): ``GRPO_LOSS_TYPES``, ``MULTI_OBJECTIVE_AGGREGATIONS``, ``DPO_LOSS_TYPES``,
    ``F_DIVERGENCE_TYPES``; and, kept where they are used, ``advantages.SCALE_MODES``,
    ``importance.IMPORTANCE_SAMPLING_LEVELS``, ``importance.SAMPLER_CORRECTION_MODES``.
32. ``SCRIPT_REWARDS``, ``script_reward_registry``: the reward functions ``trl grpo`` knows by name, as its script
    (``trl/scripts/grpo.py``) makes them.
"""

from __future__ import annotations

from .compat import check_trl_version

check_trl_version()  # before any TRL internal below is imported

import inspect  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import contextmanager, nullcontext  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402
from trl.data_utils import _tokenize  # noqa: E402
from trl.distributed import DistributedBackend  # noqa: E402
from trl.kernels import chunked_divergence as _divergence_module  # noqa: E402
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: E402
from trl.models import prepare_deepspeed, unwrap_model_for_generation  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.scripts.grpo import GRPOScriptArguments  # noqa: E402
from trl.trainer.callbacks import SyncRefModelCallback  # noqa: E402
from trl.trainer.utils import (  # noqa: E402
    get_callable_name,
    get_config_model_id,
    is_async_callable,
    pad,
    shutdown_event_loop_in_daemon,
    start_event_loop_in_daemon,
    use_adapter,
)

__all__ = [
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "GRPOScriptArguments",
    "GRPO_LOSS_TYPES",
    "HOOKS",
    "Hook",
    "MULTI_OBJECTIVE_AGGREGATIONS",
    "PolicyForward",
    "PREFIX_CHECKPOINT_DIR",
    "SCRIPT_REWARDS",
    "aggregate_like_trl",
    "captured_hidden_states",
    "check_trl_version",
    "checkpoint_folder",
    "chunked_divergence",
    "disable_gradient_checkpointing",
    "dpo_tokenizer",
    "full_params",
    "fused_head_model",
    "get_callable_name",
    "get_config_model_id",
    "is_async_callable",
    "lm_head_args",
    "metrics",
    "mix_into_reference",
    "num_items_in_batch",
    "on_policy_forward",
    "optimizer_step_ended",
    "pad",
    "prepare_deepspeed",
    "prepare_dpo_dataset",
    "reference_model",
    "resolve_accelerate_config",
    "restore_rollout_state",
    "reward_functions",
    "rollout_state",
    "rotation_off",
    "run_folder",
    "sampler_correction",
    "sampler_logps",
    "script_reward_registry",
    "set_process_group_timeout",
    "shutdown_event_loop_in_daemon",
    "start_event_loop_in_daemon",
    "subtract_subsequence",
    "tokenize_prompt",
    "train_batch_size",
    "trl_kl_term_off",
    "unwrap_model_for_generation",
]


# ---------------------------------------------------------------------------------------------------
# Hooks (entries 1-14)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hook:
    """A TRL/transformers method trl_kl overrides or calls: ``parameters`` are its leading parameters after
    ``self``, in order, as trl_kl relies on them."""

    owner: type
    name: str
    parameters: tuple[str, ...]
    contract: str

    def signature_problem(self) -> str | None:
        """None while the installed method has these leading parameters, else what changed."""
        method = getattr(self.owner, self.name, None)
        if method is None:
            return f"{self.owner.__name__}.{self.name} no longer exists"
        found = tuple(list(inspect.signature(method).parameters)[1 : 1 + len(self.parameters)])
        if found != self.parameters:
            return f"{self.owner.__name__}.{self.name} now takes {found}, trl_kl relies on {self.parameters}"
        return None


HOOKS = (
    Hook(trl.GRPOTrainer, "_calculate_rewards", ("inputs", "prompts", "completions", "completion_ids_list"),
         "rewards of every process, (B_global, n_reward_funcs), NaN for None; once per rollout"),
    Hook(trl.GRPOTrainer, "_generate_and_score_completions", ("inputs",),
         "the rollout dict; ref_per_token_logps iff beta != 0; old_per_token_logps None on-policy"),
    Hook(trl.GRPOTrainer, "_compute_loss", ("model", "inputs"),
         "one policy forward, then reads the advantages; adds beta * k3 iff beta != 0"),
    Hook(trl.GRPOTrainer, "_get_per_token_logps_and_entropies",
         ("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size"),
         "(logps (B, T), entropies, aux_loss); called once by _compute_loss, for the policy"),
    Hook(trl.GRPOTrainer, "training_step", ("model", "inputs", "num_items_in_batch"),
         "increments _step after each micro-batch"),
    Hook(transformers.Trainer, "_save_checkpoint", ("model", "trial"), "writes checkpoint_folder"),
    Hook(transformers.Trainer, "_load_optimizer_and_scheduler", ("checkpoint",), "restores from a checkpoint folder"),
    Hook(transformers.Trainer, "_get_output_dir", ("trial",), "the run folder checkpoints go in"),
    Hook(trl.DPOTrainer, "_prepare_dataset", ("dataset", "processing_class", "args", "dataset_name"),
         "tokenizes prompt/chosen/rejected into prompt_ids/chosen_ids/rejected_ids"),
    Hook(trl.DPOTrainer, "_precompute_ref_logps", ("dataset", "name", "batch_size"),
         "called by __init__ with precompute_ref_log_probs; adds ref_chosen_logps/ref_rejected_logps"),
    Hook(trl.DPOTrainer, "compute_loss", ("model", "inputs", "return_outputs", "num_items_in_batch"),
         "its first model forward is the policy's fused forward on [chosen; rejected]"),
    Hook(transformers.Trainer, "get_batch_samples", ("epoch_iterator", "num_batches", "device"),
         "(batches, num_items_in_batch); called once per optimizer step"),
    Hook(transformers.Trainer, "_get_num_items_in_batch", ("batch_samples", "device"),
         "the loss normaliser of a step's batches"),
    Hook(transformers.Trainer, "_get_grad_norm", ("model", "grad_norm"),
         "the step's gradient norm, after the backward passes and clipping, before optimizer.step()"),
    Hook(transformers.Trainer, "save_model", ("output_dir", "_internal_call"),
         "_internal_call is True when the Trainer saves a checkpoint's model itself"),
    Hook(trl.DPOTrainer, "compute_ref_log_probs", ("model", "inputs"),
         "the reference's summed log-probs of the chosen and the rejected completions, (B,) each"),
)


@contextmanager
def trl_kl_term_off(trainer):
    """TRL's ``GRPOTrainer._compute_loss`` adds its own KL term, ``beta * k3`` per token, whenever ``trainer.beta !=
    0`` (entries 3, 17). trl_kl owns the KL term, so TRL's ``_compute_loss`` runs inside this context, where
    ``trainer.beta`` reads 0.0; it is restored on exit. Outside it ``beta`` keeps TRL's other use, the switch that
    loads the reference and computes ``ref_per_token_logps`` at rollout. trl_kl's coefficient is never read from
    ``beta`` (the trainers keep it in ``kl_coef``)."""
    switch = trainer.beta
    trainer.beta = 0.0
    try:
        yield
    finally:
        trainer.beta = switch


@dataclass(frozen=True)
class PolicyForward:
    """The policy forward TRL's ``_compute_loss`` just ran (entry 4): its arguments and results."""

    model: torch.nn.Module
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    logits_to_keep: int
    batch_size: int
    """The micro-batch TRL's forward ran in (rows per model call)."""
    extra: dict
    """TRL's other keyword arguments (``compute_entropy``, ``pixel_values``, ...)."""
    logps: torch.Tensor
    """Per-token log-probs ``(B, T)`` of the completion tokens, with their graph."""
    hidden_states: torch.Tensor | None
    """With ``capture_hidden_states``: the final hidden states ``(B, T, H)`` that predict the completion tokens."""


@contextmanager
def on_policy_forward(trainer, callback: Callable[[PolicyForward], None], capture_hidden_states: bool = False):
    """Run ``callback`` right after the policy forward of TRL's ``GRPOTrainer._compute_loss`` (entries 3, 4).

    TRL 1.16's ``_compute_loss`` calls ``trainer._get_per_token_logps_and_entropies`` exactly once, for the policy,
    and only then reads ``inputs["advantages"]``, ``old_per_token_logps`` and ``ref_per_token_logps``: so the
    callback sees the policy's log-probs and may still rewrite the inputs TRL's surrogate reads. Inside this context
    that first call runs TRL's method, then ``callback(PolicyForward(...))``, and returns TRL's output unchanged;
    any later call runs TRL's method alone. With ``capture_hidden_states`` the forward's final hidden states are
    collected for the callback (entry 21) and released before it runs, so a forward inside the callback (e.g. a PEFT
    reference through the same backbone) is not collected.
    """
    name = "_get_per_token_logps_and_entropies"
    shadowed = vars(trainer).get(name)  # an instance attribute already there (e.g. a profiler's wrapper) stays
    method = getattr(trainer, name)

    def restore():
        if shadowed is None:
            vars(trainer).pop(name, None)
        else:
            setattr(trainer, name, shadowed)

    def first_call(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        restore()  # later calls go to the method as it was
        context = captured_hidden_states(fused_head_model(trainer, model)) if capture_hidden_states else nullcontext()
        with context as states:
            output = method(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        extra = dict(kwargs)
        batch_size = extra.pop("batch_size", args[0] if args else None) or input_ids.size(0)
        hidden = None
        if capture_hidden_states:
            hidden = torch.cat([s[:, -logits_to_keep - 1 : -1] for s in states])  # as TRL slices its logits
        callback(PolicyForward(model, input_ids, attention_mask, logits_to_keep, batch_size, extra, output[0], hidden))
        return output

    setattr(trainer, name, first_call)
    try:
        yield
    finally:
        restore()


# ---------------------------------------------------------------------------------------------------
# Private attributes and functions (entries 15-27)
# ---------------------------------------------------------------------------------------------------


def sampler_logps(inputs: dict) -> torch.Tensor | None:
    """The sampler's log-probs of the sampled tokens ``(B, T)``: the inference engine's (vLLM's processed
    log-probs, TRL's ``sampling_per_token_logps``; NaN where it could not score a token) when it generated the
    rollout, else None (the trainer generated: the sampler is pi_old) (entry 2)."""
    return inputs.get("sampling_per_token_logps")


def sampler_correction(inputs: dict) -> torch.Tensor | None:
    """TRL's vLLM importance-sampling correction pi_old / q of the rollout, ``(B, T)`` (``token_*`` modes) or
    ``(B, 1)`` (``sequence_*``), truncated or masked at its bounds: the factor TRL's ``_compute_loss`` multiplies
    its per-token policy loss by (``importance.sampler_correction`` is the same formula). None when TRL computed
    none (no vLLM, or ``vllm_importance_sampling_correction=False``) (entries 2, 3)."""
    return inputs.get("importance_sampling_ratio")


def metrics(trainer, mode: str) -> dict[str, list[float]]:
    """TRL's metric lists of ``mode`` ("train" or "eval"), ``{key: [values]}``: append a value to log it; TRL's
    ``log`` averages each list and clears it (entry 16)."""
    return trainer._metrics[mode]


def optimizer_step_ended(trainer) -> bool:
    """Whether the micro-batch ``training_step`` just ran closed an optimizer step: TRL counts micro-batches in
    ``_step`` (incremented by its ``training_step``) and closes a step when it is a multiple of the gradient
    accumulation, as its own ``step_time`` metric does (entries 5, 15)."""
    return trainer._step % trainer.current_gradient_accumulation_steps == 0


def rollout_state(trainer) -> dict:
    """The rollout TRL is still training on: the micro-batch counter and the buffered micro-batches, which TRL's
    ``_prepare_inputs`` serves as ``_buffered_inputs[_step % steps_per_generation]`` until
    ``_step % (steps_per_generation * num_iterations) == 0`` (entry 15)."""
    return {"step": trainer._step, "buffered_inputs": trainer._buffered_inputs}


def restore_rollout_state(trainer, state: dict) -> None:
    """Undo of ``rollout_state``: a resumed run serves the same micro-batches as the uninterrupted one."""
    trainer._step, trainer._buffered_inputs = state["step"], state["buffered_inputs"]


def run_folder(trainer, trial) -> str:
    """The folder ``Trainer._save_checkpoint`` puts this run's checkpoints in (entry 6)."""
    return trainer._get_output_dir(trial=trial)


def checkpoint_folder(trainer, trial) -> str:
    """The folder ``Trainer._save_checkpoint`` writes this step's checkpoint to (entry 6)."""
    return os.path.join(run_folder(trainer, trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")


@contextmanager
def rotation_off(trainer):
    """Inside, ``Trainer._save_checkpoint`` deletes no checkpoint: it ends by deleting those beyond
    ``args.save_total_limit``, which reads None here. Yields the limit; restored on exit (entry 23)."""
    limit, trainer.args.save_total_limit = trainer.args.save_total_limit, None
    try:
        yield limit
    finally:
        trainer.args.save_total_limit = limit


def num_items_in_batch(trainer, batches: list, device: torch.device):
    """What ``Trainer.get_batch_samples`` returns next to the batches: the loss normaliser (entry 11)."""
    return trainer._get_num_items_in_batch(batches, device)


def train_batch_size(trainer) -> int:
    """The per-process batch size the Trainer builds its dataloader with (entry 18)."""
    return trainer._train_batch_size


def dpo_tokenizer(trainer):
    """The text tokenizer of a ``trl.DPOTrainer`` (its processing class, or the processor's tokenizer; entry 18)."""
    return trainer._tokenizer


def tokenize_prompt(processing_class, prompt, **template_kwargs) -> list[int]:
    """A prompt's token ids as TRL's dataset preparation makes them: the chat template for a conversation (with
    ``template_kwargs``, e.g. ``add_generation_prompt=True``), the tokenizer alone for a string, no special tokens
    added (entry 19)."""
    return _tokenize(processing_class, prompt, **template_kwargs)["input_ids"]


def prepare_dpo_dataset(trainer, dataset, dataset_name: str):
    """TRL's own DPO dataset preparation (entry 7), whatever a subclass's ``_prepare_dataset`` does."""
    return trl.DPOTrainer._prepare_dataset(trainer, dataset, trainer.processing_class, trainer.args, dataset_name)


def fused_head_model(trainer, model) -> torch.nn.Module:
    """The causal LM TRL patched with its fused LM head (``add_fused_lm_head``): ``model`` without the accelerate
    and PEFT wrappers. It owns ``base_model`` and the LM head (entry 21)."""
    unwrapped = trainer.accelerator.unwrap_model(model)
    return unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped


@contextmanager
def captured_hidden_states(causal_lm):
    """Collect the ``last_hidden_state`` of every forward of ``causal_lm.base_model`` inside: the states TRL's
    fused LM head projects (entry 21). Yields the list they are appended to, one ``(b, L, H)`` tensor per call."""
    states = []

    def hook(module, args, output):
        states.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = causal_lm.base_model.register_forward_hook(hook)
    try:
        yield states
    finally:
        handle.remove()


def reference_model(trainer) -> tuple[torch.nn.Module, object]:
    """The reference as TRL's GRPO rollout picks it (entry 20): ``(causal LM, context to run it in)``. It is
    ``ref_model`` when there is one, else the PEFT policy with its "ref" adapter, or with its adapters disabled."""
    if trainer.ref_model is not None:
        return fused_head_model(trainer, trainer.ref_model), nullcontext()
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    context = use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None)
    return peft_model.get_base_model(), context


def reward_functions(trainer) -> tuple[list, list[str]]:
    """TRL's ``GRPOTrainer.reward_funcs`` (the list itself: ``_calculate_rewards`` calls its items, so an item
    replaced in it is what is called; a reward model is a ``torch.nn.Module``) and ``reward_func_names``
    (entry 22)."""
    return trainer.reward_funcs, trainer.reward_func_names


def set_process_group_timeout(seconds: float) -> None:
    """Give the collectives of the default (existing) process group a timeout of ``seconds`` (entry 24)."""
    from datetime import timedelta

    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(timedelta(seconds=seconds))


def full_params(trainer, model):
    """Context in which an FSDP v1 ``model`` has its full parameters (a no-op otherwise), as TRL's generation uses
    it (entry 26)."""
    return DistributedBackend(trainer.accelerator).summon_full_params(model, recurse=False)


def mix_into_reference(model, reference, alpha: float) -> None:
    """``reference <- alpha * model + (1 - alpha) * reference``, parameter by parameter (TRL's TR-DPO sync, ZeRO-3
    aware; entry 26)."""
    SyncRefModelCallback.sync_target_model(model, reference, alpha)


def subtract_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """``items`` without the ordered ``subsequence``: how ``trl grpo`` keeps the training arguments of a command
    line once accelerate's are known (entry 27)."""
    from trl.cli.commands.training import _subtract_subsequence

    return _subtract_subsequence(items, subsequence)


def resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """``--accelerate_config NAME`` (a file, or a config TRL ships) as accelerate's ``--config_file PATH``, the rest
    of ``launch_args`` kept (entry 27)."""
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    return resolve_accelerate_config_argument(launch_args)


# ---------------------------------------------------------------------------------------------------
# Module globals (entry 28)
# ---------------------------------------------------------------------------------------------------

_TILE_LOCK = threading.Lock()


@contextmanager
def _tile_size(token_chunk_size: int | None, vocab_chunk_size: int | None):
    """TRL's tile constants set to the given sizes (None: left as they are) for the duration, then restored."""
    if token_chunk_size is None and vocab_chunk_size is None:
        yield
        return
    with _TILE_LOCK:
        saved = _divergence_module.TOKEN_CHUNK_SIZE, _divergence_module.VOCAB_CHUNK_SIZE
        _divergence_module.TOKEN_CHUNK_SIZE = token_chunk_size or saved[0]
        _divergence_module.VOCAB_CHUNK_SIZE = vocab_chunk_size or saved[1]
        try:
            yield
        finally:
            _divergence_module.TOKEN_CHUNK_SIZE, _divergence_module.VOCAB_CHUNK_SIZE = saved


class _TiledDivergence(ChunkedDivergenceFunction):
    """TRL's ``ChunkedDivergenceFunction`` with the tile size as two extra (last) arguments: TRL reads its tile
    constants in the forward *and* in the backward, so both run with them set (``_tile_size``)."""

    @staticmethod
    def forward(ctx, *args):
        *trl_args, token_chunk_size, vocab_chunk_size = args
        ctx.tile_size = token_chunk_size, vocab_chunk_size
        with _tile_size(token_chunk_size, vocab_chunk_size):
            return ChunkedDivergenceFunction.forward(ctx, *trl_args)

    @staticmethod
    def backward(ctx, *grads):
        with _tile_size(*ctx.tile_size):
            return (*ChunkedDivergenceFunction.backward(ctx, *grads), None, None)


def chunked_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    ref_bias: torch.Tensor | None,
    *,
    beta: float,
    temperature: float,
    logit_scale: float,
    final_logit_softcapping: float | None,
    ref_logit_scale: float,
    ref_final_logit_softcapping: float | None,
    token_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``ChunkedDivergenceFunction`` (student = the policy, teacher = the reference) on ``(N, H)`` rows, in
    tiles of ``token_chunk_size`` x ``vocab_chunk_size`` (None: TRL's module constants). Returns TRL's
    ``(divergence (N,), student entropy (N,))``; the gradient reaches the student only (entry 28)."""
    return _TiledDivergence.apply(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, beta, temperature, logit_scale,
        final_logit_softcapping, ref_logit_scale, ref_final_logit_softcapping, token_chunk_size, vocab_chunk_size,
    )


# ---------------------------------------------------------------------------------------------------
# Routines and values mirrored from TRL (entries 29-32)
# ---------------------------------------------------------------------------------------------------


def aggregate_like_trl(trainer, per_token: torch.Tensor, mask: torch.Tensor, inputs: dict) -> torch.Tensor:
    """Average a per-token loss term ``(B, T)`` with the normaliser TRL 1.16's ``GRPOTrainer._compute_loss`` applies
    for ``trainer.loss_type`` (gradient accumulation included), so a term added to TRL's loss weighs exactly as TRL's
    own KL term would (entry 29)."""
    train = trainer.model.training
    accumulation = trainer.current_gradient_accumulation_steps if train else 1.0
    masked = per_token * mask
    if trainer.loss_type in ("grpo", "sapo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if trainer.loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
    if trainer.loss_type == "dr_grpo":
        return masked.sum() / (per_token.size(0) * trainer.max_completion_length) / accumulation
    if trainer.loss_type == "luspo":
        return masked.sum(-1).mean() / accumulation
    # cispo, dapo, vespo: normalised by the number of loss tokens of the generation batch
    normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
    if train:
        normalizer = normalizer * accumulation / trainer.args.steps_per_generation
    return masked.sum() / normalizer


def lm_head_args(causal_lm, prefix: str = "") -> dict:
    """A model's LM head and logit post-processing, read from its config as TRL's ``add_fused_lm_head`` does
    (scale: ``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``, or ``logits_scaling``, which divides
    except for HyperCLOVA X; softcap: ``final_logit_softcapping``), so a computation from hidden states sees the
    distributions TRL's log-probs come from (entry 30). Keys: ``weight``, ``bias``, ``logit_scale``,
    ``final_logit_softcapping``, each with ``prefix``."""
    config = causal_lm.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    head = causal_lm.get_output_embeddings()
    return {
        f"{prefix}weight": head.weight,
        f"{prefix}bias": head.bias,
        f"{prefix}logit_scale": 1.0 if scale is None else scale,
        f"{prefix}final_logit_softcapping": getattr(config, "final_logit_softcapping", None),
    }


GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
"""``GRPOConfig.loss_type`` values TRL 1.16 implements (entry 31)."""
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
"""``GRPOConfig.multi_objective_aggregation`` values (entry 31)."""
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
"""``DPOConfig.loss_type`` values TRL 1.16 implements (entry 31)."""
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
"""``DPOConfig.f_divergence_type`` values (entry 31)."""

SCRIPT_REWARDS = {
    "accuracy_reward": None,
    "reasoning_accuracy_reward": None,
    "think_format_reward": None,
    "get_soft_overlong_punishment": {"max_completion_len": 1280, "soft_punish_cache": 256},
}
"""``trl grpo``'s reward registry (in ``main`` of ``trl/scripts/grpo.py``): each name is a function of
``trl.rewards``, with the arguments of the factory that makes the reward function, or None when the function is
the reward (entry 32)."""


def script_reward_registry() -> dict:
    """The reward functions ``trl grpo`` knows by name, made as TRL's script makes them (entry 32)."""
    import trl.rewards

    return {
        name: getattr(trl.rewards, name) if factory is None else getattr(trl.rewards, name)(**factory)
        for name, factory in SCRIPT_REWARDS.items()
    }
