"""Shared fixtures: small checkpoints in real on-disk layouts, made once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# One intra-op thread per process: tests run Ray actors and Train workers beside the test process on 2
# cores, and spinning OpenMP threads that compete for a core slow a step down tenfold or more.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    from sampler.toy import make_toy_backbone

    return make_toy_backbone(tmp_path_factory.mktemp("toy") / "backbone")


@pytest.fixture(scope="session")
def toy(toy_dir):
    from sampler.backbone import load_backbone

    return load_backbone(toy_dir)
