"""Tests marked `gpu` run where torch sees a CUDA device and are skipped with a reason everywhere else (CI
and this project's CPU machines): bench/gpu/gpu_check.sh runs them on a GPU."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
