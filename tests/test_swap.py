"""The swap table of README.md (and docs/grpo.md) is honest: it names every default trl_kl changes, and its one
line (read from the README itself) gives stock TRL 1.16's loss and gradient exactly."""

import ast
import dataclasses
import re
import warnings
from pathlib import Path

import pytest
import torch
import trl

from grpo_batch import assert_same_rollout_advantages, fixed_batch, loss_and_gradient, make_config, make_trainer
from trl_kl import GRPOConfig

ROOT = Path(__file__).resolve().parent.parent
LINE_MARKER = "<!-- trl-default -->"


def _section(page: Path) -> str:
    text = page.read_text()
    start = text.index("## What changes when you swap")
    return text[start : text.index("\n## ", start + 1)]


def restore_line(page: Path = ROOT / "README.md") -> str:
    """The one Python line of the python block right after the ``<!-- trl-default -->`` marker."""
    match = re.search(re.escape(LINE_MARKER) + r"[ \t]*\n```python\n(.*?)\n```", page.read_text(), re.S)
    assert match, f"{page.name}: no {LINE_MARKER} python block"
    lines = [line for line in match.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) == 1, f"{page.name}: the restoring block must hold one line, got {lines}"
    return lines[0]


def restore_kwargs(line: str) -> dict:
    call = ast.parse(line).body[0].value
    assert isinstance(call, ast.Call) and call.func.id == "GRPOConfig" and not call.args
    return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def changed_defaults() -> dict[str, object]:
    """Fields whose trl_kl default differs from TRL's: name -> TRL's default."""
    trl_fields = {f.name: f for f in dataclasses.fields(trl.GRPOConfig)}
    return {
        f.name: _default(trl_fields[f.name])
        for f in dataclasses.fields(GRPOConfig)
        if f.name in trl_fields and _default(f) != _default(trl_fields[f.name])
    }


def test_readme_and_grpo_guide_show_the_same_table_and_line():
    readme, guide = ROOT / "README.md", ROOT / "docs" / "grpo.md"
    assert restore_line(readme) == restore_line(guide)
    table = lambda page: [row for row in _section(page).replace("](docs/", "](").splitlines() if row.startswith("|")]  # noqa: E731
    assert table(readme) == table(guide) and len(table(readme)) >= 5


def test_the_table_names_every_changed_default_and_the_line_restores_it():
    changed = changed_defaults()
    assert changed == {"loss_type": "dapo", "use_bias_correction_kl": True}  # a new change must join the table
    kwargs, table = restore_kwargs(restore_line()), _section(ROOT / "README.md")
    for name, trl_default in changed.items():
        assert f"`{name}`" in table and kwargs[name] == trl_default
    # and TRL's KL term: k3 as a loss (which trl_kl's new fields otherwise move into the reward as k1)
    assert (kwargs["kl_estimator"], kwargs["kl_placement"]) == ("k3", "loss") and kwargs["beta"] > 0
    for name in ("kl_estimator", "kl_placement", "kl_reward_scope"):
        assert f"`{name}=" in table


@pytest.mark.parametrize("num_iterations", [1, 2], ids=["on-policy", "off-policy"])
def test_the_line_gives_stock_trl_loss_and_gradient(toy_path, tmp_path, num_iterations):
    """The README's line against ``trl.GRPOTrainer`` with TRL's own defaults (same beta): same advantages from
    the same rollout, same loss and gradient on a fixed batch (off-policy: importance ratio != 1)."""
    kwargs = restore_kwargs(restore_line())
    kwargs.pop("output_dir")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k3 as a loss is biased: trl_kl warns
        ours = make_trainer(toy_path, make_config(tmp_path, **kwargs, num_iterations=num_iterations))
    trl_default_loss = trl.GRPOConfig.__dataclass_fields__["loss_type"].default
    stock_args = make_config(
        tmp_path, cls=trl.GRPOConfig, beta=kwargs["beta"], num_iterations=num_iterations, loss_type=trl_default_loss
    )
    assert stock_args.use_bias_correction_kl is True and stock_args.loss_type == "dapo"  # TRL's defaults
    stock = make_trainer(toy_path, stock_args, cls=trl.GRPOTrainer)
    assert_same_rollout_advantages(ours, stock)

    batch, logps = fixed_batch(ours)
    if num_iterations == 1:
        batch.pop("old_per_token_logps")  # on-policy: TRL keeps no old log-probs
    losses, grads = zip(*(loss_and_gradient(trainer, batch) for trainer in (ours, stock)))
    assert losses[0] != 0 and grads[0].abs().max() > 0
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
