"""The docs cannot rot: every shell command shown in README.md and docs/*.md runs, runnable Python blocks run,
and the API reference is what the code says.

The convention for shell commands (every page follows it; the tests below enforce it):

* A shell command lives in a fenced block tagged ``bash``, ``sh``, ``shell`` or ``console``. Each line is a
  command (a line ending in a backslash continues on the next; ``# ...`` after it is a comment; in a
  ``console`` block commands start with ``$ `` and the other lines are output).
* Every such command is run by ``test_shell_command``, exactly as written, with ``bash -c``, in a temporary
  folder that mirrors the repository (``recipes/``, ``benchmarks/``, ``tools/`` resolve; ``outputs/`` lands in the
  temporary folder), on the offline toy model, in the slow tier. A command shown several times runs once.
* HTML comments on the lines right above the opening fence (invisible when rendered) change that, for every
  command of the block:

      <!-- not-run: REASON -->   not run; the reason is required ("needs 8 GPUs", "downloads a model from the
                                  hub", "takes 11 minutes; its --quick form runs", "installs packages; .ci/run
                                  runs it"). A command with a placeholder (<model>, ...) must carry one.
      <!-- quick: FLAGS -->       run with FLAGS appended (e.g. --max_steps 2); the page must show FLAGS to its
                                  reader, in backquotes outside comments, so the shortening is a documented one.

* A command quoted in the prose (a code span starting with ``python``, ``pip``, ``trl-kl``, ``torchrun`` or
  ``accelerate launch``, then an argument) must be a block command of some page, one ``&&`` part of one, or the
  first words of one: it is then covered by that block's run or its reason. A synopsis (with ``|``, ``[``, ``<``
  or ``...``, e.g. ``trl-kl grpo|ppo|dpo``) is not a command.
* docs/api.md is generated from the docstrings and checked by ``python tools/gen_api_docs.py --check``; keep the
  commands in docstrings to ones a page shows.
* A Python block right after ``<!-- runnable -->`` runs as a script (``test_runnable_block``).

``trl-kl`` is the console script of ``pip install -e .``; where the interpreter running the tests has none (a
source checkout on PYTHONPATH), the tests put an equivalent ``python -m trl_kl.cli`` shim on PATH.

Time, measured on the 2 shared (busy) CPU cores of the development machine: the convention and API checks ~8 s,
the runnable Python blocks ~45 s; the slow tier runs 12 commands in 6 min wall clock, 2.5 CPU-minutes (the
benchmarks' two smoke tests ~1 min each, each toy recipe 15-45 s, the demo ~30 s).
"""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trl

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
MARKER = "<!-- runnable -->"
BLOCK = re.compile(r"^" + re.escape(MARKER) + r"[ \t]*\n```(?:python|py)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SHELL_BLOCK = re.compile(r"^```(bash|sh|shell|console)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
TAG = re.compile(r"^<!--\s*([\w-]+)\s*(?::\s*(.*?))?\s*-->[ \t]*$")
TAGS = ("not-run", "quick")
COMMAND_WORDS = ("python", "pip", "trl-kl", "torchrun", "accelerate launch")
PLACEHOLDER = re.compile(r"<[a-z][^<>]*>|\.\.\.")


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _without_comments(text: str) -> str:
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)


def _block_tags(text: str, fence_start: int) -> dict[str, str]:
    """The ``<!-- name: value -->`` comments on the lines right above the fence at ``fence_start``."""
    tags = {}
    lines = text[:fence_start].splitlines()
    while lines and (match := TAG.match(lines[-1].strip())):
        tags[match.group(1)] = (match.group(2) or "").strip()
        lines.pop()
    return tags


def _commands(kind: str, body: str) -> list[str]:
    """The commands of a shell block as written: continuations joined, comments and console output dropped."""
    commands, pending = [], ""
    for raw in body.splitlines():
        line = raw.strip()
        if kind == "console" and not pending:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        if command := _strip_comment(line):
            commands.append(command)
    return commands


def _strip_comment(line: str) -> str:
    """``line`` without its ``# comment`` (a ``#`` at the start or after a space, outside quotes)."""
    masked = re.sub(r"""(["']).*?\1""", lambda m: "x" * len(m.group(0)), line)
    cut = re.search(r"(^|\s)#", masked)
    return (line[: cut.start()] if cut else line).strip()


@dataclasses.dataclass
class ShellBlock:
    page: str
    line: int
    commands: list[str]
    tags: dict[str, str]


def shell_blocks() -> list[ShellBlock]:
    blocks = []
    for path in PAGES:
        text = path.read_text()
        for match in SHELL_BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append(ShellBlock(_relative(path), line, _commands(match.group(1), match.group(2)), _block_tags(text, match.start())))
    return blocks


SHELL_BLOCKS = shell_blocks()


def commands_to_run() -> dict[str, str]:
    """command (quick flags appended) -> where it is shown first, for every command of an untagged block."""
    out = {}
    for block in SHELL_BLOCKS:
        if "not-run" in block.tags:
            continue
        for command in block.commands:
            run = f"{command} {block.tags['quick']}" if "quick" in block.tags else command
            out.setdefault(run, f"{block.page}:{block.line}")
    return out


COMMANDS = commands_to_run()


def test_shell_blocks_are_found_and_classified():
    """Every shell block is parsed into commands, carries known tags only, gives a reason when not run, shows its
    quick flags to the reader, and has no placeholder in a command that runs."""
    assert len(SHELL_BLOCKS) >= 10 and any(b.page == "README.md" for b in SHELL_BLOCKS)
    problems = []
    for block in SHELL_BLOCKS:
        where = f"{block.page}:{block.line}"
        if not block.commands:
            problems.append(f"{where}: a shell block without a command")
        for name in block.tags:
            if name not in TAGS:
                problems.append(f"{where}: unknown tag <!-- {name} -->, use one of {TAGS}")
        if "not-run" in block.tags:
            if not block.tags["not-run"]:
                problems.append(f"{where}: <!-- not-run: ... --> needs a reason")
            continue
        if "quick" in block.tags:
            visible = _without_comments((ROOT / block.page).read_text())
            if f"`{block.tags['quick']}`" not in visible:
                problems.append(f"{where}: the quick flags `{block.tags['quick']}` are not shown on the page")
        for command in block.commands:
            if PLACEHOLDER.search(command):
                problems.append(f"{where}: {command!r} has a placeholder: tag the block <!-- not-run: reason -->")
    assert not problems, "\n".join(problems)


def test_prose_commands_are_block_commands():
    """A command quoted in the prose is one that a block shows (so its run, or its reason, covers it)."""
    shown = [part.split() for block in SHELL_BLOCKS for c in block.commands for part in [c, *c.split("&&")]]
    span = re.compile(r"(?<!`)`((?:" + "|".join(map(re.escape, COMMAND_WORDS)) + r") [^`]+)`(?!`)")
    missing = []
    for path in PAGES:
        if path.name == "api.md":
            continue
        text = SHELL_BLOCK.sub("", _without_comments(path.read_text()))
        for quoted in span.findall(text):
            words = quoted.split()
            if not re.search(r"[|\[<]|\.\.\.", quoted) and not any(command[: len(words)] == words for command in shown):
                missing.append(f"{_relative(path)}: `{quoted}`")
    assert not missing, "commands quoted in the prose but shown in no shell block:\n" + "\n".join(missing)


def _mirror(tmp_path: Path) -> Path:
    """A folder whose entries link to the repository's (outputs/ excluded), so commands that name repository
    paths run as written and what they write lands here."""
    work = tmp_path / "repo"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("outputs", ".git", ".pytest_cache"):
            (work / entry.name).symlink_to(entry)
    return work


def _bin_dir(tmp_path: Path) -> str:
    """The folder of this interpreter's scripts, or a shim folder where ``trl-kl`` is not installed there."""
    scripts = Path(sys.executable).parent
    if (scripts / "trl-kl").exists():
        return str(scripts)
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "trl-kl").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m trl_kl.cli "$@"\n')
    (shim / "trl-kl").chmod(0o755)
    return f"{shim}{os.pathsep}{scripts}"


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS), ids=[f"{where} {c[:60]}" for c, where in COMMANDS.items()])
def test_shell_command(command, tmp_path, toy_path):
    env = {
        **os.environ,
        "PATH": f"{_bin_dir(tmp_path)}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        ["bash", "-c", command], cwd=_mirror(tmp_path), env=env, capture_output=True, text=True, timeout=840
    )
    assert done.returncode == 0, (
        f"{COMMANDS[command]}: `{command}` exited with {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    )


def test_readme_opens_with_the_two_lines_ci_runs():
    """README.md opens with two command lines, the main job (the demo) and the tests, and .ci/run runs both
    verbatim in a fresh virtualenv (where the docs test cannot: they install packages)."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.strip()]
    opening = [line for line in lines[1:] if not TAG.match(line.strip())][0]
    assert lines[0].startswith("# ") and opening == "```bash", "README.md must open with its command lines"
    first = SHELL_BLOCKS[0]
    assert len(first.commands) == 2 and first.commands[0].endswith("python -m trl_kl.demo")
    assert first.commands[1].endswith("python -m pytest -q")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in first.commands:
        assert command in ci, f".ci/run does not run the README's line {command!r}"


def runnable_blocks() -> list[tuple[str, int, str]]:
    """(file, line of the marker, code) for every runnable Python block of README.md and docs/*.md."""
    blocks = []
    for path in PAGES:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((_relative(path), line, match.group(1)))
    return blocks


BLOCKS = runnable_blocks()


def test_marked_blocks_are_found():
    """The marker must sit right before a python fence: a marker that matches nothing is a typo."""
    files = {name for name, _, _ in BLOCKS}
    assert "docs/grpo.md" in files and "docs/index.md" in files
    for path in PAGES:
        text = path.read_text()
        markers = re.findall(r"^" + re.escape(MARKER) + r"[ \t]*$", text, re.M)  # on a line of its own
        assert len(markers) == len(BLOCK.findall(text)), f"{path.name}: a {MARKER} marker is not followed by a python block"


@pytest.mark.parametrize("name, line, code", BLOCKS, ids=[f"{name}:{line}" for name, line, _ in BLOCKS])
def test_runnable_block(name, line, code, tmp_path, toy_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{name}:{line} failed:\n{result.stderr[-4000:]}"


def _gen_api_docs():
    spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "tools" / "gen_api_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_current():
    """docs/api.md is what ``python tools/gen_api_docs.py`` writes from the code (its own ``--check``)."""
    problem = _gen_api_docs().check()
    assert problem is None, problem


def test_every_added_config_field_is_in_its_guide():
    """Each field trl_kl adds to (or changes in) a TRL config is explained in the trainer's guide too."""
    from trl_kl import DPOConfig, GRPOConfig, PPOConfig

    own_fields = _gen_api_docs().own_fields
    configs = [
        (GRPOConfig, trl.GRPOConfig, ("grpo.md", "ppo.md")),
        (PPOConfig, GRPOConfig, ("ppo.md",)),
        (DPOConfig, trl.DPOConfig, ("dpo.md",)),
    ]
    names, missing = set(), []
    for config, base, guides in configs:
        for field, _ in own_fields(config, base):
            names.add(field.name)
            if not any(f"`{field.name}`" in (DOCS / guide).read_text() for guide in guides):
                missing.append(f"{config.__name__}.{field.name} (in {' or '.join(guides)})")
    assert {"kl_estimator", "kl_placement", "vf_coef", "gamma", "sft_weight", "reward_weights"} <= names
    assert not missing, f"not documented in the guide: {missing}"


def test_docs_index_links_resolve():
    """The links between the guide's pages point at files that exist."""
    for page in ("index.md", "choosing.md", "launching.md"):
        text = (DOCS / page).read_text()
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", text):
            assert (DOCS / target).exists(), f"docs/{page} links to missing {target}"
