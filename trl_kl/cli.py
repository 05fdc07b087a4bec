"""``trl-kl grpo|ppo|dpo``: TRL's command line (``trl grpo``, ``trl dpo``) for trl_kl's trainers.

    trl-kl grpo --config grpo_offpolicy                          # a shipped recipe (recipes/), the offline toy
    trl-kl grpo --help                                           # every field of trl_kl.GRPOConfig, ModelConfig, ...

As ``trl grpo`` does, the command parses its arguments (``--config`` YAML, then flags such as ``--kl_estimator k2``;
an error or ``--help`` stops here), then starts the training script through ``accelerate launch``: the arguments
no dataclass knows (``--num_processes 8``, ``--config_file x.yaml``, ``--accelerate_config NAME``) are accelerate's. ``--config`` and
``--accelerate_config`` also take the name of a YAML shipped with trl_kl (``recipes/``, ``recipes/accelerate/``);
``--accelerate_config`` then falls back to TRL's own (``multi_gpu``, ``zero2``, ...).

Under a launcher you start yourself the same arguments run in each process, with no second launch:
``accelerate launch [its flags] -m trl_kl.cli grpo ...`` or ``torchrun --nproc_per_node 8 -m trl_kl.cli grpo ...``.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from argparse import ArgumentParser
from pathlib import Path

COMMANDS = {
    "grpo": "GRPO with the KL where the theory says it belongs (trl_kl.GRPOConfig)",
    "ppo": "PPO with a critic and GAE, the KL in the per-token reward (trl_kl.PPOConfig)",
    "dpo": "DPO with an SFT term and online resampling (trl_kl.DPOConfig)",
}
LAUNCHER_VARIABLES = ("LOCAL_RANK", "ACCELERATE_MIXED_PRECISION")
"""Set in each process that torchrun or ``accelerate launch`` starts: such a process trains, it does not launch."""
LAUNCHED_BY_TRL_KL = "TRL_KL_LAUNCHED"
"""Set by ``trl-kl`` for the processes it launches: the YAML keys no dataclass knows were accelerate's."""


def under_launcher() -> bool:
    """Whether this process was started by torchrun or ``accelerate launch``."""
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def _script(command: str):
    return importlib.import_module(f"trl_kl.scripts.{command}")


def run(command: str, argv: list[str]):
    """Parse ``argv`` and train in this process (one process of a launch); returns the trainer."""
    from trl_kl.scripts import resolve_config_argument

    script = _script(command)
    parser = script.make_parser(prog=f"trl-kl {command}")
    launched_by_us = os.environ.get(LAUNCHED_BY_TRL_KL) == "1"  # else an unknown YAML key is an error
    parsed = parser.parse_args_and_config(resolve_config_argument(argv), fail_with_unknown_args=not launched_by_us)
    return script.main(*parsed)


def _accelerate_config_argument(launch_args: list[str]) -> list[str]:
    """``--accelerate_config NAME``: a file, else trl_kl's ``recipes/accelerate/NAME.yaml``, else TRL's own NAME."""
    from trl_kl._trl import resolve_accelerate_config
    from trl_kl.scripts import SHIPPED_RECIPES

    if "--accelerate_config" in launch_args[:-1]:
        index = launch_args.index("--accelerate_config") + 1
        shipped = SHIPPED_RECIPES / "accelerate" / f"{launch_args[index]}.yaml"
        if not Path(launch_args[index]).is_file() and shipped.is_file():
            launch_args = [*launch_args[:index], str(shipped), *launch_args[index + 1 :]]
    return resolve_accelerate_config(launch_args)


def _single_process_defaults() -> list[str]:
    """Without an accelerator, launch flags or ``accelerate config`` file, what accelerate would pick (one process),
    spelled out so that it does not print a warning listing them."""
    import torch
    from accelerate.commands.config import default_config_file

    if torch.accelerator.is_available() or os.path.isfile(default_config_file):
        return []
    return ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def launch(command: str, argv: list[str]) -> None:
    """``trl grpo``'s way: parse (errors and ``--help`` end here), then ``accelerate launch -m trl_kl.cli`` with the
    training arguments, the unknown ones (from the command line or the YAML) going to accelerate."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    from trl_kl._trl import subtract_subsequence
    from trl_kl.scripts import resolve_config_argument

    argv = resolve_config_argument(argv)
    parser = _script(command).make_parser(prog=f"trl-kl {command}")
    *_, config_remaining, cli_remaining = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_args = _accelerate_config_argument(config_remaining + cli_remaining) or _single_process_defaults()
    training_args = subtract_subsequence(argv, cli_remaining)
    os.environ[LAUNCHED_BY_TRL_KL] = "1"  # inherited by the launched processes
    try:
        launch_command(launch_command_parser().parse_args([*launch_args, "-m", "trl_kl.cli", command, *training_args]))
    finally:
        del os.environ[LAUNCHED_BY_TRL_KL]


def main(argv: list[str] | None = None) -> int:
    """The ``trl-kl`` console command: ``trl-kl grpo|ppo|dpo [flags]``."""
    # transformers 5 renaming gradient_checkpointing inside TRL's configs: not the user's to fix, and it is printed
    # once per process and parse
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6", category=FutureWarning)
    argv = list(sys.argv[1:] if argv is None else argv)
    description = "TRL's command line (trl grpo, trl dpo) for trl_kl's trainers."
    parser = ArgumentParser(prog="trl-kl", description=description, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", help="available commands")
    for name, help_text in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    known, _ = parser.parse_known_args(argv)
    if known.command is None:
        parser.print_help()
        return 0
    rest = argv[argv.index(known.command) + 1 :]
    if under_launcher():
        run(known.command, rest)
    else:
        launch(known.command, rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
