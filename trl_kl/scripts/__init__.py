"""The training scripts behind ``trl-kl grpo|ppo|dpo``, in the style of TRL's ``trl/scripts/grpo.py``.

Each module (``grpo``, ``ppo``, ``dpo``) has ``make_parser(prog)`` (a ``TrlParser`` over its script arguments, the
trl_kl config, TRL's ``ModelConfig`` and ``DatasetMixtureConfig``) and ``main(script_args, training_args,
model_args, dataset_args)``; ``trl_kl.cli`` parses and launches them. What they share lives here:

* ``recipe_path``: ``--config grpo_offpolicy`` names a YAML shipped with trl_kl (the repository's ``recipes/``);
* ``device_defaults``: on a machine without an accelerator the parser defaults to ``use_cpu=True, bf16=False``
  (TRL's default bf16 would stop with "Your setup doesn't support bf16/gpu"), said in one log line;
* ``load_datasets``: ``--dataset_name`` is a hub dataset, a local folder or data file, a ``save_to_disk`` folder,
  or ``toy`` (the offline task of ``trl_kl.toy``); TRL's ``--datasets`` mixtures (YAML) go to TRL's ``get_dataset``;
* ``reward_functions``: each ``--reward_funcs`` entry is a name from TRL's own script registry, a dotted import
  path (``my_lib.rewards.f``, ``trl_kl.toy.correctness_reward``) or a reward model (hub id or local path), which
  the trainers load as TRL's GRPOTrainer does.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import trl_kl
from trl_kl import _trl
from trl_kl.distributed import end_distributed

SHIPPED_RECIPES = (
    Path(trl_kl.__file__).parent / "recipes"
    if (Path(trl_kl.__file__).parent / "recipes").is_dir()
    else Path(trl_kl.__file__).parent.parent / "recipes"
)
"""The recipes' YAML files: installed as package data (``trl_kl/recipes``) or, in a source checkout, ``recipes/``."""
TOY = "toy"
"""The name that selects the offline toy model (``--model_name_or_path toy``) and task (``--dataset_name toy``)."""
TOY_TRAIN_SIZE, TOY_TEST_SIZE = 2000, 64
"""Rows of the toy task's train and test splits (distinct addition problems, ``trl_kl.toy.make_dataset``)."""
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}
"""``--dataset_name some/file.jsonl``: the ``datasets`` builder that reads a single local data file."""


def shipped_recipes() -> list[str]:
    """Names of the shipped training YAMLs (``--config NAME``)."""
    return sorted(p.stem for p in SHIPPED_RECIPES.glob("*.yaml"))


def recipe_path(name: str) -> str:
    """``name`` itself when it is a file, else the shipped recipe ``name`` (with or without ``.yaml``)."""
    if Path(name).is_file():
        return name
    shipped = SHIPPED_RECIPES / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return str(shipped)
    raise FileNotFoundError(
        f"--config {name}: no such file, and no shipped recipe of that name (shipped: {', '.join(shipped_recipes())})."
    )


def resolve_config_argument(argv: list[str]) -> list[str]:
    """``argv`` with the value of ``--config`` (TrlParser's YAML flag) replaced by the file it names."""
    argv = list(argv)
    if "--config" in argv:
        index = argv.index("--config") + 1
        if index < len(argv):
            argv[index] = recipe_path(argv[index])
    return argv


def device_defaults() -> tuple[dict, str | None]:
    """Config defaults for this machine and the log line that says so: none where bf16 runs (TRL's default),
    float32 on an accelerator without bf16, the CPU in float32 where there is no accelerator at all."""
    import torch
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    if is_torch_bf16_gpu_available() or is_torch_xla_available():
        return {}, None
    if torch.accelerator.is_available():
        return {"bf16": False}, "trl-kl: this accelerator has no bf16: training in float32 (bf16=False)."
    return (
        {"use_cpu": True, "bf16": False},
        "trl-kl: no GPU found: training on the CPU in float32 (use_cpu=True, bf16=False).",
    )


def make_trl_parser(script_arguments, config, prog: str | None = None):
    """TRL's parser over (script arguments, config, ModelConfig, DatasetMixtureConfig), with this machine's
    defaults (``device_defaults``): a YAML key or a flag still overrides them."""
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser

    parser = TrlParser((script_arguments, config, ModelConfig, DatasetMixtureConfig), prog=prog)
    defaults, _ = device_defaults()
    parser.set_defaults(**defaults)
    return parser


def announce_device(training_args) -> None:
    """The one log line of ``device_defaults``, when they are in force, from the main process."""
    defaults, line = device_defaults()
    if line and all(getattr(training_args, key) == value for key, value in defaults.items()):
        if int(os.environ.get("RANK", "0")) == 0:
            print(line, flush=True)


def set_model_init_kwargs(training_args, model_args) -> None:
    """As TRL's scripts: ModelConfig's revision / attention / dtype go to ``model_init_kwargs``, the config's own
    ``model_init_kwargs`` taking precedence."""
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = kwargs


def model_name(model_args) -> str:
    """``--model_name_or_path``: ``toy`` is the offline toy policy, anything else a hub id or a local path."""
    from trl_kl.toy import resolve_model_name

    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required (a hub id, a local path, or 'toy' for the offline toy).")
    return resolve_model_name(model_args.model_name_or_path)


def _load_named_dataset(script_args):
    import datasets

    name = script_args.dataset_name
    path = Path(name)
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"--dataset_name {name}: unknown data file type; use one of {sorted(DATA_FILE_BUILDERS)}.")
        return datasets.load_dataset(builder, data_files=str(path), streaming=script_args.dataset_streaming)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))  # a save_to_disk folder
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    return datasets.load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)


def load_datasets(script_args, dataset_args, seed: int, toy_split):
    """The dataset splits (a dict-like of ``Dataset``), as TRL's scripts load them, plus local files and the toy
    task: ``toy_split(n, seed, split)`` builds ``toy``'s splits (prompts for GRPO/PPO, preference pairs for DPO)."""
    from trl import get_dataset

    if dataset_args.datasets:
        if script_args.dataset_name:
            print("trl-kl: both --datasets and --dataset_name are given: --datasets is used, as in TRL.", flush=True)
        return get_dataset(dataset_args)
    if not script_args.dataset_name:
        raise ValueError("Either `datasets` or `dataset_name` must be provided (e.g. --dataset_name toy).")
    if script_args.dataset_name == TOY:
        return {"train": toy_split(TOY_TRAIN_SIZE, seed, "train"), "test": toy_split(TOY_TEST_SIZE, seed, "test")}
    return _load_named_dataset(script_args)


def reward_function(name: str):
    """One ``--reward_funcs`` entry: a TRL registry name, then an existing path or a hub id (``org/name``: a reward
    model, returned as the string the trainer loads), then a dotted import path (``module.function``)."""
    registry = _trl.script_reward_registry()  # TRL's registry, as its script makes it
    if name in registry:
        return registry[name]
    if os.path.exists(name) or "/" in name:
        return name  # a reward model: the trainer loads it with AutoModelForSequenceClassification (num_labels=1)
    if "." in name:
        module_path, attribute = name.rsplit(".", 1)
        sys.path.insert(0, os.getcwd())  # as TRL: a module next to where the command runs
        try:
            return getattr(importlib.import_module(module_path), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"--reward_funcs {name}: cannot import {attribute!r} from {module_path!r} ({error}).") from error
    raise ValueError(
        f"--reward_funcs {name}: not a reward function TRL knows by name ({', '.join(registry)}), an import path "
        "(module.function, e.g. trl_kl.toy.correctness_reward) or a reward model (hub id or local path)."
    )


def reward_functions(script_args) -> list:
    """``--reward_model_name_or_path`` (TRL's flag) first, then each ``--reward_funcs`` entry."""
    funcs = [script_args.reward_model_name_or_path] if script_args.reward_model_name_or_path else []
    return funcs + [reward_function(name) for name in script_args.reward_funcs or []]


def eval_split(dataset, script_args, training_args):
    """The test split when evaluation is on (TRL's scripts), else None."""
    if training_args.eval_strategy == "no":
        return None
    if script_args.dataset_test_split not in dataset:
        raise ValueError(
            f"eval_strategy={training_args.eval_strategy!r} needs a {script_args.dataset_test_split!r} split; the "
            f"dataset has {list(dataset)}: set --dataset_test_split or --eval_strategy no."
        )
    return dataset[script_args.dataset_test_split]


def train_and_save(trainer, training_args, model_args) -> None:
    """Train (resuming if asked), save, report the toy's held-out accuracy, then end the process group."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"trl-kl: model saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub()
    if model_args.model_name_or_path == TOY and trainer.accelerator.is_main_process:
        from trl_kl import toy

        held_out = toy.make_dataset(256, seed=training_args.seed, split="test")
        model = trainer.accelerator.unwrap_model(trainer.model)
        score = toy.evaluate(model, trainer.processing_class, held_out)["correctness"]
        print(f"trl-kl: toy task, held-out greedy correctness {score:.3f}", flush=True)
    end_distributed(trainer)


