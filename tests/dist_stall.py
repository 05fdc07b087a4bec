"""Run under ``torchrun --nproc_per_node 2`` (CPU, gloo) by tests/test_faults.py: a stalled rank.

GRPO on 2 CPU processes with ``ddp_timeout=TIMEOUT``; at its second reward call, rank 1 stalls (sleeps for an
hour, alive, as a hung reward server would). Rank 0 waits in the gather of the rewards. Rank 1 writes the time the
stall began to ``OUT/stall_began``; rank 0 writes, when its collective gives up, the time and the error to
``OUT/peer_error.json`` and exits 1 (torchrun then stops rank 1).
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import fault_injection as fi  # noqa: E402


def main(out: Path, timeout: int):
    import torch.distributed as dist

    from trl_kl.toy import closeness_reward

    calls = []

    def stalling_reward(completions, answer, **kwargs):
        calls.append(1)
        if len(calls) == 2 and dist.get_rank() == 1:
            (out / "stall_began").write_text(str(time.time()))
            time.sleep(3600)
        return closeness_reward(completions, answer)

    trainer = fi.build("grpo", out / "run", reward_funcs=[stalling_reward], ddp_timeout=timeout, save_strategy="no",
                       num_iterations=1, steps_per_generation=1)
    try:
        trainer.train()
    except Exception as error:  # noqa: BLE001 (what the peer of a stalled rank sees)
        (out / "peer_error.json").write_text(json.dumps({"time": time.time(), "error": f"{type(error).__name__}: {error}"}))
        sys.exit(1)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
