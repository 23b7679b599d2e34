"""Shared test set-up: the process environment, small checkpoints in real on-disk layouts (made once per
test session) and a local Ray cluster per test module."""

from __future__ import annotations

import os

import pytest
import torch

# Set before any test module imports Ray or transformers. One intra-op thread per process: tests run Ray
# actors and Train workers beside the test process on 2 cores, and spinning OpenMP threads that compete
# for a core slow a step down tenfold or more.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    from sampler.testing import make_toy_backbone

    return make_toy_backbone(tmp_path_factory.mktemp("toy") / "backbone")


@pytest.fixture(scope="session")
def toy(toy_dir):
    from sampler.backbone import load_backbone

    return load_backbone(toy_dir)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster for one test module (reused if one is already up); yields its GCS address
    so that tests can start drivers in subprocesses (`--address`)."""
    import ray  # here, not at the top: tests that need no Ray do not pay for importing it

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()
