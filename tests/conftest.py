"""Shared test set-up: GPU tests skip with a stated reason when CUDA is absent."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker); run on the device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
