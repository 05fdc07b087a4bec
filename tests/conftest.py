import pytest
import torch

# The tests run tiny models: with several intra-op threads on a small (or busy) machine, thread hand-offs cost
# more than the arithmetic (measured: 1.8 s vs 7 ms for one loss + backward on 2 loaded cores).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_path():
    """The offline toy policy (built and warm-started once, cached on disk; see trl_kl.toy)."""
    from trl_kl.toy import toy_model_path

    return toy_model_path()
