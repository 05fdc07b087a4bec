"""The torchrun harness of the multi-process tests: a hung run is stopped with every rank's stack and no rank
left behind; a failed exit after finished work is a warning; a failed run is an error."""

import textwrap
import time

import pytest
from distributed_run import _alive, torchrun

SCRIPT = """
import os, sys, time
from pathlib import Path
import torch.distributed as dist
dist.init_process_group("gloo")
out = Path(sys.argv[1])
(out / f"pid{dist.get_rank()}").write_text(str(os.getpid()))
dist.barrier()
(out / f"done{dist.get_rank()}").write_text("")
mode = sys.argv[2]
if mode == "hang":
    time.sleep(3600)
if mode == "abort" or (mode == "fail" and dist.get_rank() == 1):
    os.abort()
dist.destroy_process_group()
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(SCRIPT))
    return path


def _done(tmp_path):
    return lambda: all((tmp_path / f"done{r}").exists() for r in (0, 1))


@pytest.mark.slow
def test_a_hung_run_is_stopped_with_its_stacks_and_no_rank_survives(script, tmp_path):
    with pytest.raises(AssertionError, match="torchrun hung") as error:
        torchrun([script, tmp_path, "hang"], tmp_path / "log", finished=lambda: False, timeout=15)
    sleeping = textwrap.dedent(SCRIPT).splitlines().index("    time.sleep(3600)") + 1
    stacks = error.value.args[0].split("--- output ends:")[0]
    assert stacks.count(f'script.py", line {sleeping} in <module>') == 2  # each rank's stack, whole
    for rank in (0, 1):
        assert not _alive(int((tmp_path / f"pid{rank}").read_text()))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["abort", "hang"])
def test_a_failed_exit_after_the_work_is_a_warning(script, tmp_path, mode):
    start = time.monotonic()
    with pytest.warns(UserWarning, match="after the work was done"):
        torchrun([script, tmp_path, mode], tmp_path / "log", finished=_done(tmp_path), exit_grace=3)
    assert time.monotonic() - start < 60  # a hang at exit costs the grace period, not the timeout


@pytest.mark.slow
def test_a_failed_run_is_an_error_and_a_clean_one_is_not(script, tmp_path):
    with pytest.raises(AssertionError, match="exited with 1"):
        torchrun([script, tmp_path, "fail"], tmp_path / "log", finished=lambda: False)
    assert "gloo" not in torchrun([script, tmp_path, "clean"], tmp_path / "log", finished=_done(tmp_path)).lower()
