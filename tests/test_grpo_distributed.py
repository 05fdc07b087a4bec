"""Two processes (torchrun, CPU/gloo) give the same gradient as one on the same global batch, and train."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_run import torchrun

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.parametrize("placement, loss_type", [("reward", "dapo"), ("loss", "grpo")])
def test_two_processes_match_one(toy_path, tmp_path, placement, loss_type):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = str(HERE / "dist_grpo_grad.py")
    subprocess.run([sys.executable, script, str(tmp_path), placement, loss_type], check=True, env=env, timeout=600)
    torchrun([script, tmp_path, placement, loss_type], tmp_path / "torchrun.log",
             finished=(tmp_path / "result_2.pt").exists)
    one, two = torch.load(tmp_path / "result_1.pt"), torch.load(tmp_path / "result_2.pt")
    assert two["world"] == 2, "torchrun did not start two processes"
    # end_distributed: the group is gone and no DDP wrapper holds it into Python's teardown (gloo's crash there)
    assert two["group_destroyed"] and two["wrapper_freed"]
    torch.testing.assert_close(two["grad"], one["grad"], rtol=1e-5, atol=1e-5)
    # every trl_kl metric (means, is/ratio_max, is/ess) is over the global batch, whatever the process count
    assert set(two["metrics"]) == set(one["metrics"]) and {"is/ess", "is/ratio_max", "kl/seq_kl"} <= set(one["metrics"])
    for name, value in one["metrics"].items():
        assert two["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert len(two["losses"]) == 2 and all(torch.isfinite(torch.tensor(two["losses"])))
