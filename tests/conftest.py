import pytest


@pytest.fixture(scope="session")
def toy_path():
    """The offline toy policy (built and warm-started once, cached on disk; see trl_kl.toy)."""
    from trl_kl.toy import toy_model_path

    return toy_model_path()
