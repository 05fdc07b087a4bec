"""Fault injection for trl_kl's trainers: kill -9 inside checkpoint saves and at random times, then resume; bad
reward functions; non-finite losses and gradients. ``tests/test_faults.py`` runs a subset, ``tools/fault_matrix.py``
all of it (and writes the table of docs/reliability.md).

Every case runs in a forked child of the harness process, so the imports are paid once and a kill is a real
``SIGKILL`` of a training process. The harness process itself never runs a torch op (a fork after OpenMP started
threads can hang). Each case ends in one outcome:

* ``exact``: the resumed run finished and its final weights (PPO: policy and critic) equal the uninterrupted run's
  (rtol 1e-5, atol 1e-6);
* ``refused``: the resume raised a clear error of trl_kl (``trl_kl.checkpoints.CheckpointError``) before training;
* ``error`` (bad inputs): a clear error before the first optimizer step: it names the reward function or the
  setting, and no weight moved;
* ``skip``: the documented rule: training finished with finite weights and the metric that counts the fault
  (``reward/nonfinite_frac``, ``nonfinite/skipped_frac``); a non-finite reward trains exactly as ``None`` would;
* ``uncounted``: a non-finite reward trained exactly as ``None`` would, but no metric reported it;
* ``wrong``: the run exited normally but the weights are not the uninterrupted run's, or not finite, or a fault
  went uncounted: the silently wrong outcome;
* ``crash``: some other exception (e.g. a torch or safetensors error on a partial file);
* ``hung``: still running after the case's timeout.

Kill inside a save: a recording run lists every file event of the save at step ``TARGET_STEP`` (a file written
by ``torch.save``, safetensors, the tokenizer or ``open(..., "w")``; an ``os.replace``; a ``shutil.rmtree`` of
rotation). Case k kills the run right after event k (``after``), or after truncating the file of event k to half
its size first (``torn``: what a kill during the write leaves), with ``save_total_limit`` None or 1. Each case is
then resumed twice: with ``resume_from_checkpoint=True`` and with the path of the checkpoint being saved.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import random
import shutil
import signal
import time
import traceback
import warnings
from pathlib import Path

STEPS, SAVE_STEPS, TARGET_STEP = 8, 3, 6
KINDS = ("grpo", "ppo", "dpo")
OUTCOMES = ("exact", "refused", "error", "skip", "uncounted", "wrong", "crash", "hung")
GOOD = {"exact", "refused", "error", "skip"}


# ---- running a case in a forked child ----------------------------------------------------------------------------


def in_child(fn, result: Path, timeout: float = 300, on_start=None) -> dict:
    """Run ``fn()`` (returning a JSON-able dict) in a forked child; its result, or ``{"killed": signal}``,
    ``{"hung": True}``. An exception becomes ``{"exception": type, "module": ..., "message": ...}``.
    ``on_start(pid)`` runs in the parent once the child started (e.g. to kill it later)."""
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:
        try:
            log = os.open(str(result.with_suffix(".log")), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1), os.dup2(log, 2)
            out = fn()
        except BaseException as error:  # noqa: BLE001 (the child reports everything)
            out = {
                "exception": type(error).__name__,
                "module": type(error).__module__,
                "message": str(error),
                "traceback": traceback.format_exc()[-3000:],
            }
        try:
            result.write_text(json.dumps(out))
        finally:
            os._exit(0)
    if on_start is not None:
        on_start(pid)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"hung": True}
        time.sleep(0.02)
    if os.WIFSIGNALED(status):
        return {"killed": os.WTERMSIG(status)}
    return json.loads(result.read_text()) if result.exists() else {"exception": "NoResult", "module": "", "message": ""}


def preload() -> None:
    """Import the libraries once in the harness process (the forked children inherit them), and build the toy
    policy in a child if it is not cached yet. Runs no torch op here."""
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import trl_kl.dpo  # noqa: F401
    import trl_kl.ppo  # noqa: F401
    from trl_kl import toy

    in_child(lambda: {"path": toy.toy_model_path()}, Path(os.environ.get("TMPDIR", "/tmp")) / f"toy_{os.getpid()}.json")


def _quiet():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.simplefilter("ignore")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


# ---- the scenarios ------------------------------------------------------------------------------------------


def build(kind: str, output_dir: Path, reward_funcs=None, **overrides):
    """A small trainer of ``kind`` on the toy policy: STEPS steps, a checkpoint every SAVE_STEPS."""
    import torch

    torch.set_num_threads(1)
    _quiet()
    from trl_kl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer
    from trl_kl.toy import closeness_reward, make_dataset, toy_model_path

    common = dict(
        output_dir=str(output_dir), max_steps=STEPS, save_strategy="steps", save_steps=SAVE_STEPS, learning_rate=1e-3,
        logging_steps=1, report_to="none", use_cpu=True, bf16=False, seed=0, disable_tqdm=True, beta=0.1,
        per_device_train_batch_size=4,
    )
    if kind == "dpo":
        common.update(resample_every=4, resample_max_new_tokens=4, gradient_checkpointing=False)
        common.update(overrides)
        funcs = reward_funcs or [closeness_reward]
        dataset = make_dataset(32, 0)
        return DPOTrainer(model=toy_model_path(), args=DPOConfig(**common), train_dataset=dataset, reward_funcs=funcs)
    common.update(max_completion_length=4, loss_type="grpo", steps_per_generation=2, num_iterations=2)
    if kind == "grpo_scale_none":
        kind, common["scale_rewards"] = "grpo", "none"
    if kind == "grpo":
        common["num_generations"] = 2
    common.update(overrides)
    config, trainer = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (PPOConfig, PPOTrainer)
    funcs = reward_funcs or [closeness_reward]
    return trainer(model=toy_model_path(), reward_funcs=funcs, args=config(**common), train_dataset=make_dataset(64, 0))


def weights(trainer) -> dict:
    """The trained weights: the policy's, and PPO's critic."""
    out = {f"policy.{k}": v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
    if hasattr(trainer, "value_model"):
        critic = trainer.accelerator.unwrap_model(trainer.value_model).state_dict()
        out.update({f"critic.{k}": v.detach().clone() for k, v in critic.items()})
    return out


def all_finite(state: dict) -> bool:
    import torch

    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def weight_difference(a: dict, b: dict) -> float:
    """Max |a - b| / (1 + |b|) over all tensors (inf when the keys differ or a value is not finite)."""
    if set(a) != set(b):
        return math.inf
    worst = 0.0
    for key, value in a.items():
        if value.is_floating_point():
            diff = ((value - b[key]).abs() / (1 + b[key].abs())).max().item()
            worst = max(worst, diff if math.isfinite(diff) else math.inf)
    return worst


def logged(trainer, key: str) -> list:
    return [row[key] for row in trainer.state.log_history if key in row]


# ---- file events of a save, and the kill ---------------------------------------------------------------------


class Injector:
    """Records the file events of the save at ``target_step`` under ``root``; kills the process at event
    ``kill_at`` (1-based), after truncating that file to half when ``torn``."""

    def __init__(self, root: Path, target_step: int, kill_at: int | None = None, torn: bool = False):
        self.root, self.target_step, self.kill_at, self.torn = str(root), target_step, kill_at, torn
        self.events: list[tuple[str, str]] = []
        self.active = False
        self.depth = 0  # inside a writer that writes through open(): count the outer call only

    def event(self, kind: str, path) -> None:
        path = os.path.abspath(str(path))
        if not self.active or self.depth or not path.startswith(self.root):
            return
        self.events.append((kind, os.path.relpath(path, self.root)))
        if self.kill_at == len(self.events):
            if self.torn and kind == "write" and os.path.isfile(path):
                os.truncate(path, os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    def _writer(self, func, path_arg: int, path_kw: str | None = None):
        def wrapper(*args, **kwargs):
            self.depth += 1
            try:
                out = func(*args, **kwargs)
            finally:
                self.depth -= 1
            path = kwargs.get(path_kw) if path_kw and path_kw in kwargs else args[path_arg]
            if isinstance(path, (str, os.PathLike)):
                self.event("write", path)
            return out

        return wrapper

    def install(self, trainer) -> None:
        import torch
        import transformers.modeling_utils as modeling_utils
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        injector = self
        torch.save = self._writer(torch.save, 1, "f")
        modeling_utils.safe_save_file = self._writer(modeling_utils.safe_save_file, 1, "filename")
        original_tokenizer_save = TokenizersBackend._save_pretrained

        def tokenizer_save(tokenizer, save_directory, *args, **kwargs):
            self.depth += 1
            try:
                out = original_tokenizer_save(tokenizer, save_directory, *args, **kwargs)
            finally:
                self.depth -= 1
            self.event("write", os.path.join(str(save_directory), "tokenizer.json"))
            return out

        TokenizersBackend._save_pretrained = tokenizer_save
        original_open, original_replace, original_rmtree = builtins.open, os.replace, shutil.rmtree

        class Tracked:
            def __init__(self, file, path):
                self._file, self._path = file, path

            def __getattr__(self, name):
                return getattr(self._file, name)

            def __iter__(self):
                return iter(self._file)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.close()
                return False

            def close(self):
                if not self._file.closed:
                    self._file.close()
                    injector.event("write", self._path)

        def tracked_open(file, mode="r", *args, **kwargs):
            handle = original_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax"):
                return Tracked(handle, file)
            return handle

        def replace(src, dst, *args, **kwargs):
            original_replace(src, dst, *args, **kwargs)
            self.event("rename", dst)

        def rmtree(path, *args, **kwargs):
            original_rmtree(path, *args, **kwargs)
            self.event("delete", path)

        builtins.open, os.replace, shutil.rmtree = tracked_open, replace, rmtree
        save = trainer._save_checkpoint

        def save_checkpoint(model, trial):
            self.active = trainer.state.global_step == self.target_step
            try:
                save(model, trial)
            finally:
                self.active = False

        trainer._save_checkpoint = save_checkpoint


class Progress:
    """A callback that writes the step of each finished save to ``path`` (the parent's clock for random kills)."""

    def __new__(cls, path: Path):
        from transformers import TrainerCallback

        class _Progress(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                with open(path, "a") as f:
                    f.write(f"{state.global_step} {time.monotonic()}\n")

        return _Progress()


# ---- reference and resume ------------------------------------------------------------------------------------------


def reference(kind: str, work: Path, save_steps: int = SAVE_STEPS, record: bool = True) -> dict:
    """The uninterrupted run (in a child): final weights saved to ``work/reference.pt``; the file events of the
    save at TARGET_STEP; the seconds from the end of the first save to the end of training."""

    def run():
        import torch

        # save_total_limit=1: rotation's deletion is one of the recorded events (the weights do not depend on it)
        trainer = build(kind, work / "reference", save_steps=save_steps, save_total_limit=1)
        injector = Injector(work / "reference", TARGET_STEP)
        if record:
            injector.install(trainer)
        progress = work / "reference_progress.txt"
        progress.unlink(missing_ok=True)
        trainer.add_callback(Progress(progress))
        trainer.train()
        end = time.monotonic()
        torch.save(weights(trainer), work / "reference.pt")
        first_save = float(progress.read_text().split()[1])
        return {"events": injector.events, "after_first_save": end - first_save, "steps": trainer.state.global_step}

    return in_child(run, work / "reference.json")


def resume(kind: str, work: Path, output_dir: Path, checkpoint, **overrides) -> dict:
    """Resume the run in ``output_dir`` from ``checkpoint`` (a path or True) in a child; classify it against
    ``work/reference.pt``."""

    def run():
        import torch

        trainer = build(kind, output_dir, **overrides)
        trainer.train(resume_from_checkpoint=checkpoint)
        if trainer.state.global_step != STEPS:
            return {"outcome": "wrong", "detail": f"stopped at step {trainer.state.global_step}"}
        diff = weight_difference(weights(trainer), torch.load(work / "reference.pt"))
        return {"outcome": "exact" if diff <= 1e-5 else "wrong", "detail": f"max weight difference {diff:.2e}"}

    out = in_child(run, work / "resume.json")
    return classify_resume(out)


def classify_resume(out: dict, refusal_possible: bool = True) -> dict:
    """An ``in_child`` result as an outcome: an escaped exception is a refusal when trl_kl raised it on purpose
    (a resume), else a crash."""
    if out.get("hung"):
        return {"outcome": "hung", "detail": "timeout"}
    if "killed" in out:
        return {"outcome": "crash", "detail": f"killed by signal {out['killed']}"}
    if "exception" in out:
        refused = refusal_possible and out["module"].startswith("trl_kl")
        return {"outcome": "refused" if refused else "crash", "detail": f"{out['exception']}: {out['message'][:300]}"}
    return out


def kill_at_event(kind: str, work: Path, event: int, torn: bool = False, limit: int | None = None) -> dict:
    """Train until event ``event`` of the save at TARGET_STEP, kill -9 there, resume both ways."""
    output_dir = work / f"kill{event}{'t' if torn else ''}{limit or ''}"
    shutil.rmtree(output_dir, ignore_errors=True)

    def run():
        trainer = build(kind, output_dir, save_total_limit=limit)
        Injector(output_dir, TARGET_STEP, kill_at=event, torn=torn).install(trainer)
        trainer.train()
        return {"finished": True}

    killed = in_child(run, work / "kill.json")
    if "killed" not in killed:
        return {"killed": False, "detail": str(killed)[:300]}
    backup = output_dir.with_name(output_dir.name + "_copy")
    shutil.rmtree(backup, ignore_errors=True)
    shutil.copytree(output_dir, backup)  # the second resume starts from the same files
    newest = resume(kind, work, output_dir, True, save_total_limit=limit)
    explicit = resume(kind, work, backup, str(backup / f"checkpoint-{TARGET_STEP}"), save_total_limit=limit)
    shutil.rmtree(output_dir, ignore_errors=True)
    shutil.rmtree(backup, ignore_errors=True)
    return {"killed": True, "resume_true": newest, "resume_path": explicit}


def random_kill(kind: str, work: Path, rng: random.Random, seconds: float) -> dict:
    """Kill -9 at a uniformly random time between the first finished save and the expected end of the run
    (checkpoints every step), then resume with ``resume_from_checkpoint=True``."""
    output_dir = work / "random"
    shutil.rmtree(output_dir, ignore_errors=True)
    progress = work / "progress.txt"
    progress.unlink(missing_ok=True)
    delay = {}

    def run():
        trainer = build(kind, output_dir, save_steps=1)
        trainer.add_callback(Progress(progress))
        trainer.train()
        return {"finished": True}

    def killer(pid):
        deadline = time.monotonic() + 120
        while not progress.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        delay["at"] = rng.uniform(0, seconds)
        time.sleep(delay["at"])
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    killed = in_child(run, work / "kill.json", on_start=killer)
    if "killed" not in killed:
        shutil.rmtree(output_dir, ignore_errors=True)
        return {"killed": False, "delay": delay.get("at")}
    saved = progress.read_text().split() if progress.exists() else []
    out = {"killed": True, "delay": delay["at"], "saves_done": len(saved) // 2}
    out["resume_true"] = resume(kind, work, output_dir, True)
    shutil.rmtree(output_dir, ignore_errors=True)
    return out


# ---- bad rewards, non-finite losses --------------------------------------------------------------------------


def _corrupt(case: str, values: list):
    """A reward function's output with one fault (row 0 of each call)."""
    import torch

    bad = list(values)
    if case in ("inf", "-inf", "nan"):
        bad[0] = float(case)
    elif case == "none":
        bad[0] = None
    elif case == "huge":
        bad[0] = 1e39  # finite in Python, inf in float32
    elif case == "all_none":
        bad = [None] * len(bad)
    elif case == "all_nan":
        bad = [float("nan")] * len(bad)
    elif case == "wrong_length":
        bad = bad[:-1]
    elif case == "string":
        bad[0] = "1.0"
    elif case == "nested_list":
        bad[0] = [bad[0]]
    elif case == "vector_tensor":
        bad[0] = torch.tensor([bad[0], bad[0]])
    elif case == "scalar":
        bad = 1.0
    return bad


REWARD_CASES = ("none", "all_none", "inf", "-inf", "nan", "huge", "all_nan", "wrong_length", "string", "nested_list",
                "vector_tensor", "scalar")
REWARD_EXPECTED = {  # the documented outcome of each case
    **dict.fromkeys(("none", "all_none"), "skip"),
    **dict.fromkeys(("inf", "-inf", "nan", "huge", "all_nan"), "skip"),
    **dict.fromkeys(("wrong_length", "string", "nested_list", "vector_tensor", "scalar"), "error"),
}


def reward_expected(kind: str, case: str) -> str:
    """The documented outcome: DPO cannot pair a refresh where nothing was scored (a clear error, its own)."""
    return "error" if kind == "dpo" and case in ("all_none", "all_nan") else REWARD_EXPECTED[case]
REWARD_KINDS = ("grpo", "grpo_scale_none", "ppo", "dpo")
NONFINITE_TO_NONE = {"inf": "none", "-inf": "none", "nan": "none", "huge": "none", "all_nan": "all_none"}


def bad_reward(kind: str, case: str, work: Path) -> dict:
    """Train 3 steps with a reward function that returns fault ``case`` (GRPO: groups of 4). Non-finite cases must
    train exactly like the same value returned as None (``work/reward_<kind>_<none case>.pt`` from that run)."""

    def run():
        import torch

        from trl_kl.toy import closeness_reward

        def faulty_reward(completions, answer, **kwargs):
            return _corrupt(case, closeness_reward(completions, answer))

        groups = {"num_generations": 4} if kind.startswith("grpo") else {}  # a group of 4: one bad value among 3 good
        trainer = build(kind, work / f"reward_{kind}_{case}", reward_funcs=[faulty_reward], max_steps=3,
                        save_strategy="no", **groups)
        before = weights(trainer)
        try:
            trainer.train()
        except Exception as error:  # noqa: BLE001
            unchanged = weight_difference(weights(trainer), before) == 0.0
            clear = "faulty_reward" in str(error) or "produced no preference pair" in str(error)  # DPO: nothing to pair
            outcome = "error" if clear and unchanged and trainer.state.global_step == 0 else "crash"
            return {"outcome": outcome, "detail": f"{type(error).__name__}: {str(error)[:300]}"}
        state = weights(trainer)
        torch.save(state, work / f"reward_{kind}_{case}.pt")
        if not all_finite(state):
            return {"outcome": "wrong", "detail": "non-finite weights"}
        counted = [v for v in logged(trainer, "reward/nonfinite_frac") if v > 0]
        if case in NONFINITE_TO_NONE:
            baseline = work / f"reward_{kind}_{NONFINITE_TO_NONE[case]}.pt"
            diff = weight_difference(state, torch.load(baseline)) if baseline.exists() else math.inf
            if diff > 1e-6:
                return {"outcome": "wrong", "detail": f"trains unlike None (weight difference {diff:.1e})"}
            if not counted:
                return {"outcome": "uncounted", "detail": "trains as None, but no metric counts it"}
            return {"outcome": "skip", "detail": f"reward/nonfinite_frac {max(counted):.3f}; trains as None"}
        if reward_expected(kind, case) == "error":
            return {"outcome": "wrong", "detail": "the bad value was accepted: finished with finite weights"}
        return {"outcome": "skip", "detail": "finite weights"}

    return classify_resume(in_child(run, work / "reward.json"), refusal_possible=False)


NUMERIC_CASES = ("nan_loss", "nan_grad", "lr_1e30", "nan_loss_skip", "nan_grad_skip", "config_nan")


def numeric_fault(kind: str, case: str, work: Path) -> dict:
    """A NaN loss or gradient injected at the second optimizer step (or a learning rate of 1e30, or the
    trainer's dangerous config field set to NaN: DPO ``beta``, PPO ``vf_coef``, GRPO ``beta``)."""

    def run():

        overrides = dict(max_steps=4, save_strategy="no")
        if case.endswith("_skip"):
            overrides["skip_nonfinite_steps"] = True
        if case == "lr_1e30":
            overrides["learning_rate"] = 1e30
        if case == "config_nan":
            field = {"dpo": "beta", "ppo": "vf_coef", "grpo": "beta"}[kind]
            try:
                trainer = build(kind, work / f"num_{kind}_{case}", **{**overrides, field: float("nan")})
            except Exception as error:  # noqa: BLE001
                clear = field in str(error)
                return {"outcome": "error" if clear else "crash", "detail": f"{type(error).__name__}: {str(error)[:200]}"}
        else:
            trainer = build(kind, work / f"num_{kind}_{case}", **overrides)
        if case.startswith("nan_loss"):
            compute_loss = trainer.compute_loss

            def poisoned(*args, **kwargs):
                out = compute_loss(*args, **kwargs)
                if trainer.state.global_step == 1 and trainer.model.training:
                    out = (out[0] * math.nan, *out[1:]) if isinstance(out, tuple) else out * math.nan
                return out

            trainer.compute_loss = poisoned
        if case.startswith("nan_grad"):
            param = next(p for p in trainer.model.parameters() if p.requires_grad)
            param.register_hook(lambda g: g * math.nan if trainer.state.global_step == 1 else g)
        try:
            trainer.train()
        except Exception as error:  # noqa: BLE001
            state = weights(trainer)
            clear = "optimizer step" in str(error) and trainer.state.global_step >= 1
            outcome = "error" if clear and all_finite(state) else ("wrong" if not all_finite(state) else "crash")
            detail = f"at step {trainer.state.global_step + 1}: {type(error).__name__}: {str(error)[:200]}"
            return {"outcome": outcome, "detail": detail}
        state = weights(trainer)
        if not all_finite(state):
            return {"outcome": "wrong", "detail": f"finished {trainer.state.global_step} steps with non-finite weights"}
        skipped = [v for v in logged(trainer, "nonfinite/skipped_frac") if v > 0]
        if case.endswith("_skip") and skipped:
            return {"outcome": "skip", "detail": f"nonfinite/skipped_frac {max(skipped):.2f}, finite weights"}
        return {"outcome": "wrong", "detail": f"finished {trainer.state.global_step} steps, nothing flagged"}

    return classify_resume(in_child(run, work / "numeric.json"), refusal_possible=False)


NUMERIC_EXPECTED = {"nan_loss": "error", "nan_grad": "error", "lr_1e30": "error", "nan_loss_skip": "skip",
                    "nan_grad_skip": "skip", "config_nan": "error"}
