import pytest
import trl

from trl_kl.compat import SUPPORTED_TRL, check_trl_version


def test_installed_trl_is_supported():
    """Fails with the supported range when CI installs a TRL that trl_kl was not tested with."""
    check_trl_version(trl.__version__)


@pytest.mark.parametrize("version", ["1.15.2", "1.17.0", "2.0.0"])
def test_unsupported_trl_raises_clearly(version, monkeypatch):
    monkeypatch.delenv("TRL_KL_SKIP_VERSION_CHECK", raising=False)
    with pytest.raises(ImportError, match=r"trl>=1.16.0,<1.17.0"):
        check_trl_version(version)


def test_pyproject_pins_the_same_range():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    deps = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    low, high = SUPPORTED_TRL
    assert f"trl>={low.major}.{low.minor},<{high.major}.{high.minor}" in deps
