"""Locate ../shared/fidelity (reference figures produced by the original VirTex code)."""

import os
from pathlib import Path

import pytest


def fidelity_dir() -> Path:
    """The fidelity folder: $VIRTEX_FIDELITY, else shared/fidelity beside the checkout."""
    env = os.environ.get("VIRTEX_FIDELITY")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "fidelity"


FIDELITY = fidelity_dir()
needs_fidelity = pytest.mark.skipif(not FIDELITY.is_dir(),
                                    reason=f"fidelity data not found at {FIDELITY}")
