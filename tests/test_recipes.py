"""`trl-kl grpo|ppo|dpo` and its shipped recipes: the parser, the launch, data and reward resolution, the CPU
defaults, the package data, and the recipes run as users launch them (torchrun, 2 CPU processes)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import datasets
import pytest
import yaml
from distributed_run import torchrun
from test_dpo_rewards import reward_model_path  # noqa: F401  (a fixture: the toy with a one-label head)

from trl_kl import cli, scripts
from trl_kl.scripts import dpo as dpo_script
from trl_kl.scripts import grpo as grpo_script
from trl_kl.scripts import ppo as ppo_script

ROOT = Path(__file__).parent.parent
RECIPES = {"grpo_offpolicy": "grpo", "grpo_onpolicy_trl_default": "grpo", "ppo": "ppo", "dpo_online": "dpo"}
SCRIPTS = {"grpo": grpo_script, "ppo": ppo_script, "dpo": dpo_script}


@pytest.fixture(autouse=True)
def _not_under_a_launcher(monkeypatch):
    for name in (*cli.LAUNCHER_VARIABLES, cli.LAUNCHED_BY_TRL_KL):
        monkeypatch.delenv(name, raising=False)


def _parse(command: str, argv: list[str]):
    parser = SCRIPTS[command].make_parser(prog=f"trl-kl {command}")
    return parser.parse_args_and_config(scripts.resolve_config_argument(argv))


def test_every_recipe_is_shipped_and_checked():
    assert scripts.shipped_recipes() == sorted(RECIPES)
    assert {p.stem for p in (ROOT / "recipes").glob("*.yaml")} == set(RECIPES)
    assert not list((ROOT / "recipes").glob("*.py"))  # the scripts live in the package (trl_kl.scripts)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_parses_by_name_into_valid_configs(name, tmp_path):
    """``--config NAME`` finds the shipped YAML; the YAML, then the flags, fill TRL's dataclasses; on this
    machine (no GPU) the device defaults are the CPU in float32."""
    script_args, args, model_args, _ = _parse(RECIPES[name], ["--config", name, "--output_dir", str(tmp_path)])
    values = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    assert model_args.model_name_or_path == "toy" and script_args.dataset_name == "toy"
    assert script_args.reward_funcs == ["trl_kl.toy.correctness_reward", "trl_kl.toy.closeness_reward"]
    assert args.output_dir == str(tmp_path) and args.max_steps == values["max_steps"] and args.beta == values["beta"]
    assert (args.use_cpu, args.bf16) == (True, False)
    if RECIPES[name] != "dpo":
        assert args.kl_estimator == values["kl_estimator"]


def test_flags_override_the_yaml_and_the_device_defaults(tmp_path):
    _, args, model_args, _ = _parse(
        "grpo",
        ["--config", "grpo_offpolicy", "--output_dir", str(tmp_path), "--kl_estimator", "k2", "--kl_placement", "loss",
         "--beta", "0.1", "--use_peft", "--lora_r", "4", "--use_cpu", "true", "--bf16", "false"],
    )
    assert (args.kl_estimator, args.kl_placement, args.beta) == ("k2", "loss", 0.1)
    assert model_args.use_peft and model_args.lora_r == 4


def test_unknown_recipe_names_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="shipped: dpo_online, grpo_offpolicy"):
        scripts.recipe_path("grpo_offpolicyy")


@pytest.mark.parametrize("command, fields", [("grpo", ("kl_estimator", "kl_reward_scope", "clip_std_min")),
                                             ("ppo", ("vf_coef", "gamma")), ("dpo", ("sft_weight", "resample_every"))])
def test_help_lists_the_trl_kl_fields_with_their_help(command, fields, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    config = {"grpo": "GRPOConfig", "ppo": "PPOConfig", "dpo": "DPOConfig"}[command]
    import trl_kl

    for name in fields:
        help_text = " ".join(getattr(trl_kl, config).__dataclass_fields__[name].metadata["help"].split())
        assert f"--{name}" in text and help_text[:60] in text
    assert "--model_name_or_path" in text and "--lora_r" in text and "--dataset_name" in text  # ModelConfig, script


def test_launch_goes_through_accelerate_with_its_flags(monkeypatch, tmp_path):
    """Flags no dataclass knows (command line or YAML) go to ``accelerate launch``, the rest to the training
    processes, which run ``python -m trl_kl.cli grpo ...``; ``--accelerate_config NAME`` finds trl_kl's YAML."""
    import accelerate.commands.launch as launch

    launched = []
    monkeypatch.setattr(launch, "launch_command", lambda args: launched.append((args, os.environ.get(cli.LAUNCHED_BY_TRL_KL))))
    config = tmp_path / "mine.yaml"
    config.write_text("model_name_or_path: toy\ndataset_name: toy\nnum_machines: 1\nbeta: 0.1\n")
    argv = ["grpo", "--config", str(config), "--kl_estimator", "k2", "--kl_placement", "loss",
            "--accelerate_config", "cpu_ddp", "--num_processes", "2"]
    assert cli.main(argv) == 0
    ((args, marker),) = launched
    assert marker == "1" and cli.LAUNCHED_BY_TRL_KL not in os.environ  # set for the launched processes only
    assert args.module and args.training_script == "trl_kl.cli"
    assert args.training_script_args == ["grpo", "--config", str(config), "--kl_estimator", "k2", "--kl_placement", "loss"]
    assert args.config_file == str(scripts.SHIPPED_RECIPES / "accelerate" / "cpu_ddp.yaml")
    assert (args.num_processes, args.num_machines) == (2, 1)  # from the command line, from the YAML


def test_a_bad_flag_stops_before_launching(monkeypatch):
    import accelerate.commands.launch as launch

    monkeypatch.setattr(launch, "launch_command", lambda args: pytest.fail("launched"))
    with pytest.raises(ValueError, match="kl_reward_scope"):
        cli.main(["grpo", "--config", "grpo_offpolicy", "--kl_placement", "loss", "--kl_estimator", "k2",
                  "--kl_reward_scope", "token"])


def test_under_a_launcher_each_process_trains_without_launching(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "launch", lambda *a: pytest.fail("launched again"))
    monkeypatch.setattr(cli, "run", lambda command, argv: calls.append((command, argv)))
    monkeypatch.setenv("LOCAL_RANK", "0")
    cli.main(["ppo", "--config", "ppo"])
    assert calls == [("ppo", ["--config", "ppo"])]


def test_an_unknown_yaml_key_is_an_error_unless_trl_kl_launched_the_process(monkeypatch, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("model_name_or_path: toy\ndataset_name: toy\nnum_processes: 2\n")
    monkeypatch.setattr(grpo_script, "main", lambda *parsed: parsed)
    with pytest.raises(ValueError, match="Unknown arguments from config file"):
        cli.run("grpo", ["--config", str(config)])
    monkeypatch.setenv(cli.LAUNCHED_BY_TRL_KL, "1")  # then the key was accelerate's
    assert cli.run("grpo", ["--config", str(config)])[2].model_name_or_path == "toy"


def test_device_defaults_and_their_log_line(capsys):
    defaults, line = scripts.device_defaults()
    assert defaults == {"use_cpu": True, "bf16": False} and "no GPU found" in line  # this machine has none
    _, args, _, _ = _parse("grpo", ["--config", "grpo_offpolicy"])
    scripts.announce_device(args)
    assert capsys.readouterr().out == line + "\n"
    _, args, _, _ = _parse("grpo", ["--config", "grpo_offpolicy", "--use_cpu", "true", "--bf16", "false", "--fp16", "false"])
    args.use_cpu = False  # the user's choice (on a GPU machine): no line
    scripts.announce_device(args)
    assert capsys.readouterr().out == ""


def test_reward_funcs_resolve_like_trl_plus_models_and_import_paths(tmp_path):
    import trl.rewards

    from trl_kl import toy

    assert scripts.reward_function("accuracy_reward") is trl.rewards.accuracy_reward
    assert scripts.reward_function("trl_kl.toy.closeness_reward") is toy.closeness_reward
    assert scripts.reward_function(str(tmp_path)) == str(tmp_path)  # a local reward model
    assert scripts.reward_function("OpenAssistant/reward-model-deberta-v3-large") == "OpenAssistant/reward-model-deberta-v3-large"
    with pytest.raises(ValueError, match="cannot import 'nope' from 'trl_kl.toy'"):
        scripts.reward_function("trl_kl.toy.nope")
    with pytest.raises(ValueError, match="not a reward function TRL knows by name"):
        scripts.reward_function("accuracy")
    script_args = grpo_script.GRPOScriptArguments(reward_model_name_or_path="rm", reward_funcs=["think_format_reward"])
    assert scripts.reward_functions(script_args) == ["rm", trl.rewards.think_format_reward]


@pytest.mark.parametrize("command", ["grpo", "dpo"])
def test_a_reward_model_path_reaches_the_trainer_as_a_model(command, reward_model_path, tmp_path):  # noqa: F811
    """``--reward_funcs <reward model folder> <import path>``: the trainer gets the loaded model, then the function."""
    from transformers import PreTrainedModel

    from trl_kl import toy

    config = "grpo_offpolicy" if command == "grpo" else "dpo_online"
    argv = ["--config", config, "--output_dir", str(tmp_path), "--reward_funcs", reward_model_path,
            "trl_kl.toy.closeness_reward"]
    trainer = SCRIPTS[command].build_trainer(*_parse(command, argv))
    first, second = trainer.reward_funcs
    assert isinstance(trainer.accelerator.unwrap_model(first), PreTrainedModel) and first.config.num_labels == 1
    assert second is toy.closeness_reward


def test_dataset_name_takes_local_files_folders_and_the_toy(tmp_path):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(tmp_path / "data.jsonl", folder / "train.jsonl")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    mixture = grpo_script.make_parser().parse_args_and_config([])[3]
    for name in ("data.jsonl", "folder", "saved"):
        script_args = grpo_script.GRPOScriptArguments(dataset_name=str(tmp_path / name))
        loaded = scripts.load_datasets(script_args, mixture, 0, grpo_script.toy_split)
        assert loaded["train"].to_list() == rows, name
    toy = scripts.load_datasets(grpo_script.GRPOScriptArguments(dataset_name="toy"), mixture, 0, dpo_script.toy_split)
    assert (len(toy["train"]), len(toy["test"])) == (scripts.TOY_TRAIN_SIZE, scripts.TOY_TEST_SIZE)
    assert set(toy["train"].column_names) == {"prompt", "chosen", "rejected", "answer"}
    with pytest.raises(ValueError, match="Either `datasets` or `dataset_name`"):
        scripts.load_datasets(grpo_script.GRPOScriptArguments(), mixture, 0, grpo_script.toy_split)


def test_the_wheel_ships_the_recipes_and_the_command(tmp_path):
    """A built wheel holds the YAMLs as trl_kl/recipes (what ``--config NAME`` finds once installed) and the
    ``trl-kl`` entry point. Built from a copy, so that the checkout gets no build folder."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "trl_kl", "recipes"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).relative_to("trl_kl/recipes").as_posix() for n in names if n.startswith("trl_kl/recipes/")}
    expected = {p.relative_to(ROOT / "recipes").as_posix() for p in (ROOT / "recipes").rglob("*.yaml")}
    assert shipped == expected and "trl_kl/scripts/grpo.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "trl-kl = trl_kl.cli:main" in entry_points


@pytest.mark.slow
def test_grpo_recipe_under_torchrun(toy_path, tmp_path):
    out = tmp_path / "run"
    args = ["-m", "trl_kl.cli", "grpo", "--config", "grpo_offpolicy", "--output_dir", out, "--max_steps", "4", "--save_steps", "2"]
    log = torchrun(args, tmp_path / "torchrun.log", finished=(out / "model.safetensors").exists, cwd=tmp_path)
    assert log.count("trl-kl: no GPU found") == 1  # one line, from the main process
    checkpoint = out / "checkpoint-2"
    # each process saved the rollout it was still training on (4 steps per generation, checkpoint after 2)
    assert (checkpoint / "trl_kl_rollout_state_rank0.pt").exists()
    assert (checkpoint / "trl_kl_rollout_state_rank1.pt").exists()
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    steps = [row for row in history if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4]
    # on-policy at the first step of a rollout, off-policy after it: the importance weights spread
    assert steps[0]["is/ess"] == 1.0 and steps[-1]["is/ess"] < 1.0
    assert (out / "model.safetensors").exists()


@pytest.mark.slow
def test_dpo_recipe_resamples_and_checkpoints_its_window(toy_path, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "trl_kl.cli", "dpo", "--config", "dpo_online", "--output_dir", str(out),
           "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1"]
    done = subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, cwd=tmp_path,
                          capture_output=True, text=True)
    assert "trl-kl: toy task, held-out greedy correctness" in done.stdout
    assert (out / "model.safetensors").exists() and (out / "checkpoint-2" / "trl_kl_dpo_window").is_dir()
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert [row["resample/age"] for row in history if "loss" in row] == [0, 1, 0, 1]


ACCELERATE = {
    "single_gpu.yaml": ("NO", 1),
    "multi_gpu.yaml": ("MULTI_GPU", 8),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 8),
    "fsdp2.yaml": ("FSDP", 8),
    "multi_node.yaml": ("DEEPSPEED", 16),
    "cpu_ddp.yaml": ("MULTI_CPU", 2),
}


def test_every_accelerate_config_is_checked():
    assert {p.name for p in (ROOT / "recipes" / "accelerate").glob("*.yaml")} == set(ACCELERATE)


@pytest.mark.parametrize("name", sorted(ACCELERATE))
def test_accelerate_config_loads(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "recipes" / "accelerate" / name))
    distributed_type, processes = ACCELERATE[name]
    assert (config.distributed_type.value, config.num_processes) == (distributed_type, processes)
    if distributed_type == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] in (2, 3)
    if distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
