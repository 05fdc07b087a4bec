"""The docs cannot rot: runnable code blocks run, and every config field trl_kl adds is documented.

A code block is runnable when the line before its opening fence is ``<!-- runnable -->`` (an HTML comment,
invisible when rendered). Each such block of README.md and docs/*.md runs as a script in its own process,
in a temporary working directory, on the offline toy model.
"""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trl

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MARKER = "<!-- runnable -->"
BLOCK = re.compile(r"^" + re.escape(MARKER) + r"[ \t]*\n```(?:python|py)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def runnable_blocks() -> list[tuple[str, int, str]]:
    """(file, line of the marker, code) for every runnable block of README.md and docs/*.md."""
    blocks = []
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((str(path.relative_to(ROOT)), line, match.group(1)))
    return blocks


BLOCKS = runnable_blocks()


def test_marked_blocks_are_found():
    """The marker must sit right before a python fence: a marker that matches nothing is a typo."""
    files = {name for name, _, _ in BLOCKS}
    assert "docs/grpo.md" in files and "docs/index.md" in files
    for path in [ROOT / "README.md", *DOCS.glob("*.md")]:
        text = path.read_text()
        markers = re.findall(r"^" + re.escape(MARKER) + r"[ \t]*$", text, re.M)  # on a line of its own
        assert len(markers) == len(BLOCK.findall(text)), f"{path.name}: a {MARKER} marker is not followed by a python block"


@pytest.mark.parametrize("name, line, code", BLOCKS, ids=[f"{name}:{line}" for name, line, _ in BLOCKS])
def test_runnable_block(name, line, code, tmp_path, toy_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{name}:{line} failed:\n{result.stderr[-4000:]}"


def _added_fields(cls, base) -> list[dataclasses.Field]:
    """Fields ``cls`` adds to ``base`` or redeclares with another default or help text."""
    base_fields = {f.name: f for f in dataclasses.fields(base)}
    out = []
    for f in dataclasses.fields(cls):
        b = base_fields.get(f.name)
        if b is None or f.default != b.default or f.metadata.get("help") != b.metadata.get("help"):
            out.append(f)
    return out


def _config_fields():
    from trl_kl import GRPOConfig, PPOConfig

    grpo = [("GRPOConfig", f, ("grpo.md", "ppo.md")) for f in _added_fields(GRPOConfig, trl.GRPOConfig)]
    ppo = [("PPOConfig", f, ("ppo.md",)) for f in _added_fields(PPOConfig, GRPOConfig)]
    return grpo + ppo


def test_every_added_config_field_is_documented():
    """Each field trl_kl adds to GRPOConfig / PPOConfig is in api.md with its current help text (regenerate
    with ``python benchmarks/gen_api_docs.py``) and in the trainer's guide."""
    fields = _config_fields()
    names = {f.name for _, f, _ in fields}
    assert {"kl_estimator", "kl_placement", "kl_reward_scope", "clip_std_min", "vf_coef", "gamma"} <= names
    api = (DOCS / "api.md").read_text()
    missing_api, stale_help, missing_guide = [], [], []
    for config, f, guides in fields:
        if f"`{f.name}`" not in api:
            missing_api.append(f"{config}.{f.name}")
        elif " ".join(f.metadata.get("help", "").split()) not in api:
            stale_help.append(f"{config}.{f.name}")
        if not any(f"`{f.name}`" in (DOCS / guide).read_text() for guide in guides):
            missing_guide.append(f"{config}.{f.name} (in {' or '.join(guides)})")
    assert not missing_api, f"not in docs/api.md (run python benchmarks/gen_api_docs.py): {missing_api}"
    assert not stale_help, f"help text changed since docs/api.md was generated (run python benchmarks/gen_api_docs.py): {stale_help}"
    assert not missing_guide, f"not documented in the guide: {missing_guide}"


def test_api_docs_cover_the_pure_functions():
    """Every public function of trl_kl.kl, trl_kl.advantages and trl_kl.compat has a section in api.md."""
    import inspect

    from trl_kl import advantages, compat, kl

    api = (DOCS / "api.md").read_text()
    for module in (kl, advantages, compat):
        for name, obj in vars(module).items():
            if inspect.isfunction(obj) and obj.__module__ == module.__name__ and not name.startswith("_"):
                assert f"### `{module.__name__}.{name}`" in api, f"{module.__name__}.{name} missing from docs/api.md"


def test_docs_index_links_resolve():
    """The links between the guide's pages point at files that exist."""
    for page in ("index.md", "choosing.md", "launching.md"):
        text = (DOCS / page).read_text()
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", text):
            assert (DOCS / target).exists(), f"docs/{page} links to missing {target}"
