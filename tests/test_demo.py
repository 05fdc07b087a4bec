"""The README's main job, `python -m trl_kl.demo`, run as a user runs it (a fresh process), for a few steps."""

import json
import math
import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_command_trains_off_policy_and_writes_its_outputs(toy_path, tmp_path):
    steps = 8
    done = subprocess.run(
        [sys.executable, "-m", "trl_kl.demo", "--output_dir", str(tmp_path), "--max_steps", str(steps)],
        check=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
    )
    # what a reader sees on stdout: one compact line per step (the bar is on stderr), then the summary, last
    lines = done.stdout.strip().splitlines()
    number = r"\d+\.\d+"
    for step, line in enumerate(lines[:steps], start=1):
        reward = rf"reward {number}" if step in (1, 5) else " " * 12
        assert re.fullmatch(rf"step {step}/{steps}  {reward}  seq KL {number}  IS ESS {number}  clip {number}", line), line
    assert lines[steps].startswith("wrote ") and len(lines) == steps + 2
    assert re.fullmatch(rf"held-out correctness \(sampled, T=1\): {number} -> {number} after {steps} steps; final sequence KL {number}", lines[-1])
    assert "training" in done.stderr  # the progress bar
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    log = metrics["log"]
    assert metrics["steps"] == steps and [row["step"] for row in log] == list(range(1, steps + 1))
    # one rollout feeds 4 updates (steps_per_generation 2 x num_iterations 2): the first update after a rollout
    # is on-policy (ratio exactly 1), the later ones are not, so importance sampling is really exercised
    assert log[0]["is/ess"] == 1.0 and log[0]["is/ratio_max"] == 1.0
    assert min(row["is/ess"] for row in log) < 1.0
    assert all(math.isfinite(row["kl/seq_kl"]) and math.isfinite(row["loss"]) for row in log)
    assert [row["step"] for row in log if "reward" in row] == [1, 5]  # the rollout's reward: once per generation
    for split in ("before", "after"):
        assert 0.0 <= metrics[f"held_out_correctness_{split}"] <= 1.0
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
