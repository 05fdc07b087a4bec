"""The TRL versions trl_kl is tested with. trl_kl relies on TRL 1.16 internals (private hooks, attributes and
module globals, listed in ``trl_kl._trl``) that may change in any minor release, so a TRL outside the pinned range is
refused when a trainer module is imported."""

from __future__ import annotations

import os

from packaging.version import Version

SUPPORTED_TRL = (Version("1.16.0"), Version("1.17.0"))
"""[min, max): the pinned range of pyproject.toml."""


def check_trl_version(version: str | None = None) -> None:
    """Raise ``ImportError`` naming the supported range when the installed TRL is outside it.
    ``TRL_KL_SKIP_VERSION_CHECK=1`` turns the error into nothing (at your own risk)."""
    if version is None:
        import trl

        version = trl.__version__
    low, high = SUPPORTED_TRL
    if not low <= Version(version) < high and os.environ.get("TRL_KL_SKIP_VERSION_CHECK") != "1":
        raise ImportError(
            f"trl_kl supports trl>={low},<{high} (it overrides TRL's private GRPO hooks), but trl {version} is "
            f'installed: pip install "trl>={low},<{high}", or set TRL_KL_SKIP_VERSION_CHECK=1 to try anyway.'
        )
