"""Checks before ``train()``: refuse a run that would train nothing or crash later on its data
(docs/reliability.md#before-training).

transformers returns normally from a run whose sampler yields no batch (an empty dataset, fewer prompts than one
GRPO generation batch: 0 steps, exit code 0; ``num_iterations=0`` too, which the configs refuse at construction),
and an empty prompt crashes deep inside ``generate`` with an unrelated error. These functions raise first, naming
the fix.
"""

from __future__ import annotations


def empty_prompt_rows(dataset, column: str = "prompt", limit: int = 5) -> list[int]:
    """The first ``limit`` rows of ``dataset[column]`` whose prompt is empty (``""`` or a conversation with no
    message): nothing to generate from. Reads the Arrow column directly (fast on large datasets)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if hasattr(dataset, "with_format"):  # a datasets.Dataset: the column as Arrow, selections applied
        values = dataset.with_format("arrow")[column]
        values = values.column(0) if isinstance(values, pa.Table) else values
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            empty = pc.equal(pc.utf8_length(values), 0)
        elif pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            empty = pc.equal(pc.list_value_length(values), 0)
        else:
            return []
        return pc.indices_nonzero(pc.fill_null(empty, False)).to_pylist()[:limit]
    rows = []
    for row, prompt in enumerate(dataset[column]):
        if isinstance(prompt, (str, list)) and len(prompt) == 0:
            rows.append(row)
            if len(rows) == limit:
                break
    return rows


def check_prompts(dataset, column: str = "prompt") -> None:
    """Raise ``ValueError`` naming the rows with an empty prompt (a ``datasets.Dataset``; others pass)."""
    if not hasattr(dataset, "column_names") or column not in (dataset.column_names or []) or not hasattr(dataset, "__len__"):
        return
    rows = empty_prompt_rows(dataset, column)
    if rows:
        raise ValueError(
            f"train_dataset has empty prompts (the '{column}' column is empty at rows {rows}"
            f"{' and maybe more' if len(rows) == 5 else ''}): nothing to generate a completion from. Remove them "
            "first, e.g. dataset.filter(lambda row: len(row['prompt']) > 0)."
        )


def check_training_length(args) -> None:
    """Neither steps nor epochs: transformers would return at once."""
    if (args.max_steps is None or args.max_steps <= 0) and args.num_train_epochs <= 0:
        raise ValueError(
            f"max_steps={args.max_steps} and num_train_epochs={args.num_train_epochs}: the run would train nothing. "
            "Set max_steps > 0 or num_train_epochs > 0."
        )


def check_dataset_size(dataset, needed: int, unit: str, fix: str) -> None:
    """A sized ``dataset`` must hold at least ``needed`` rows (one batch of ``unit``), else no batch is drawn."""
    if dataset is None or not hasattr(dataset, "__len__"):
        return
    if len(dataset) == 0:
        raise ValueError("train_dataset is empty: there is nothing to train on.")
    if len(dataset) < needed:
        raise ValueError(
            f"train_dataset has {len(dataset)} rows, fewer than one {unit} takes ({needed}), so the run would train "
            f"nothing (transformers returns after 0 steps). {fix}"
        )


def check_grpo_run(args, dataset, num_processes: int) -> None:
    """GRPO and PPO: at least one generation batch of prompts, no empty prompt (``num_iterations`` >= 1 is the
    config's own check)."""
    check_training_length(args)
    prompts = args.generation_batch_size // args.num_generations
    check_dataset_size(
        dataset,
        prompts,
        f"generation batch of prompts (generation_batch_size {args.generation_batch_size} / num_generations "
        f"{args.num_generations}, over {num_processes} process(es))",
        "Add prompts, or lower per_device_train_batch_size, steps_per_generation or generation_batch_size.",
    )
    check_prompts(dataset)


def check_dpo_run(args, dataset, num_processes: int, prompt_source=None) -> None:
    """DPO: a non-empty dataset (one global batch with ``dataloader_drop_last``); with resampling, prompts to
    sample from, none empty."""
    check_training_length(args)
    needed = args.per_device_train_batch_size * num_processes if args.dataloader_drop_last else 1
    check_dataset_size(dataset, needed, "global batch (dataloader_drop_last=True)", "Add rows or lower the batch size.")
    if prompt_source is not None:
        check_prompts(prompt_source)
