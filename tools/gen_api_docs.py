"""Generate docs/api.md from the docstrings and dataclass field help of trl_kl's public names.

    python tools/gen_api_docs.py            # writes docs/api.md
    python tools/gen_api_docs.py --check    # exits 1 if docs/api.md is not what it would write

Covers the configs and trainers (``trl_kl.GRPOConfig`` / ``GRPOTrainer``, ``PPOConfig`` / ``PPOTrainer``,
``DPOConfig`` / ``DPOTrainer``: every field trl_kl adds to TRL's config or whose default or help it changes,
with its type, default and help text) and the pure functions and constants of ``trl_kl.kl``,
``trl_kl.advantages`` and ``trl_kl.toy``. The text is the code's own: to change the reference, change the
docstring or the field's ``help`` and rerun.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import re
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "docs" / "api.md"

PAIRS = [  # (config, trainer, TRL base config, guide)
    ("GRPOConfig", "GRPOTrainer", "trl.GRPOConfig", "grpo.md"),
    ("PPOConfig", "PPOTrainer", "trl_kl.GRPOConfig", "ppo.md"),
    ("DPOConfig", "DPOTrainer", "trl.DPOConfig", "dpo.md"),
]
MODULES = ["trl_kl.kl", "trl_kl.advantages", "trl_kl.importance", "trl_kl.toy", "trl_kl.compat", "trl_kl.config", "trl_kl.distributed", "trl_kl.cli"]


def rst_to_md(text: str) -> str:
    """The docstrings use RST literals (``x``); markdown wants `x`."""
    return re.sub(r"``([^`]+)``", r"`\1`", text or "")


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def own_fields(cls, base) -> list[tuple[dataclasses.Field, str]]:
    """Fields of ``cls`` that ``base`` lacks ("new") or declares with another default or help ("changed")."""
    base_fields = {f.name: f for f in dataclasses.fields(base)}
    out = []
    for f in dataclasses.fields(cls):
        b = base_fields.get(f.name)
        if b is None:
            out.append((f, "new"))
        elif _default(f) != _default(b) or f.metadata.get("help") != b.metadata.get("help"):
            out.append((f, f"changed; the base class's default: `{_default(b)}`"))
    return out


def field_entry(f: dataclasses.Field, status: str) -> str:
    meta = f.metadata or {}
    choices = f"; choices: {', '.join(f'`{c}`' for c in meta['choices'])}" if meta.get("choices") else ""
    help_text = " ".join(str(meta.get("help", "(no help text)")).split())
    return f"- **`{f.name}`** (`{f.type}`, default `{_default(f)}`{choices}; {status}): {help_text}"


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def config_section(config_name: str, trainer_name: str, base_name: str, guide: str) -> list[str]:
    import trl_kl

    try:
        config, trainer, base = getattr(trl_kl, config_name), getattr(trl_kl, trainer_name), _resolve(base_name)
    except Exception as error:  # a module still being written must not stop the rest
        return [f"## `trl_kl.{config_name}`, `trl_kl.{trainer_name}`", "", f"(not importable here: {error!r})", ""]
    lines = [f"## `trl_kl.{config_name}`", ""]
    lines += [f"Subclass of `{base_name}`; guide: [{guide}]({guide}).", ""]
    lines += [rst_to_md(inspect.getdoc(config)), ""]
    lines += [f"Fields trl_kl adds to `{base_name}` or changes (every other field is the base class's, unchanged):", ""]
    lines += [field_entry(f, status) for f, status in own_fields(config, base)]
    lines += ["", f"## `trl_kl.{trainer_name}`", ""]
    lines += [f"```python\ntrl_kl.{trainer_name}{_signature(trainer.__init__).replace('(self, ', '(', 1)}\n```", ""]
    lines += [rst_to_md(inspect.getdoc(trainer)), ""]
    module_doc = inspect.getdoc(sys.modules[trainer.__module__])
    if module_doc:
        lines += [f"From the module docstring of `{trainer.__module__}`:", "", rst_to_md(module_doc), ""]
    bases = [b for b in trainer.__mro__[1:] if b is not object]
    public = [
        (name, obj) for name, obj in vars(trainer).items()
        if not name.startswith("_") and callable(obj) and not any(hasattr(b, name) for b in bases)
    ]
    for name, obj in public:
        lines += [f"### `{trainer_name}.{name}{_signature(obj)}`", "", rst_to_md(inspect.getdoc(obj)), ""]
    return lines


def attribute_docs(module) -> dict[str, str]:
    """Module-level ``NAME = value`` followed by a string literal: that string documents NAME."""
    tree = ast.parse(inspect.getsource(module))
    docs, body = {}, tree.body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(nxt, ast.Expr):
            if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        docs[t.id] = nxt.value.value
    return docs


def module_section(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    lines = [f"## `{module_name}`", "", rst_to_md(inspect.getdoc(module)), ""]
    attr_docs = attribute_docs(module)
    source_order = {name: i for i, name in enumerate(vars(module))}
    constants = [
        name for name, value in vars(module).items()
        if name.isupper() and not name.startswith("_") and isinstance(value, (int, float, str, tuple))
    ]
    if constants:
        lines += ["Constants:", ""]
        for name in constants:
            doc = " ".join(attr_docs.get(name, "").split())
            lines.append(f"- `{name} = {getattr(module, name)!r}`" + (f": {rst_to_md(doc)}" if doc else ""))
        lines.append("")
    functions = sorted(
        (name for name, obj in vars(module).items()
         if inspect.isfunction(obj) and obj.__module__ == module_name and not name.startswith("_")),
        key=source_order.get,
    )
    for name in functions:
        obj = getattr(module, name)
        lines += [f"### `{module_name}.{name}`", "", f"```python\n{name}{_signature(obj)}\n```", ""]
        lines += [rst_to_md(inspect.getdoc(obj)), ""]
    soundness = getattr(module, "SOUNDNESS", None)
    if isinstance(soundness, dict):
        lines += ["### `trl_kl.kl.SOUNDNESS`", "", "`dict[(estimator, placement), Soundness(verdict, reason)]`, what "
                  "`validate_kl` (and so `GRPOConfig`) checks:", "", "| estimator | placement | verdict | reason |",
                  "|---|---|---|---|"]
        for (estimator, placement), entry in soundness.items():
            reason = entry.reason.replace("|", "\\|")  # "KL(pi_ref || pi)" inside a table cell
            lines.append(f"| {estimator} | {placement} | {entry.verdict} | {reason} |")
        lines.append("")
    return lines


def render() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lines = [
            "# API reference",
            "",
            "<!-- Generated by `python tools/gen_api_docs.py` from the docstrings and field help texts: edit "
            "those, not this file. -->",
            "",
            "`import trl_kl` loads nothing heavy: the trainers and configs are imported lazily on first use "
            "(`from trl_kl import GRPOConfig, GRPOTrainer`), so `trl_kl.kl` and `trl_kl.advantages` work without "
            "TRL installed. Every config below is a dataclass usable with `TrlParser` / `HfArgumentParser`, so each "
            "field is also a flag of `trl-kl grpo|ppo|dpo` (`--kl_estimator k2`) and a key of its `--config` YAML.",
            "",
            "Contents: " + ", ".join(
                [f"[`{c}`](#trl_kl{c.lower()}) / [`{t}`](#trl_kl{t.lower()})" for c, t, _, _ in PAIRS]
                + [f"[`{m}`](#{m.replace('.', '').lower()})" for m in MODULES]
            ),
            "",
        ]
        for config_name, trainer_name, base_name, guide in PAIRS:
            lines += config_section(config_name, trainer_name, base_name, guide)
        for module_name in MODULES:
            lines += module_section(module_name)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def check(out: Path = OUT) -> str | None:
    """None when ``out`` is what ``render()`` writes, else what to do about it."""
    if not out.exists() or out.read_text() != render():
        return f"{out} is out of date: run python tools/gen_api_docs.py"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is out of date")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.check:
        problem = check(out)
        print(problem or f"{out} is up to date")
        return 1 if problem else 0
    text = render()
    out.write_text(text)
    print(f"wrote {out} ({len(text)} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
