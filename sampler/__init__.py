"""ADJUST joint sampling for masked diffusion LMs: the library (plain PyTorch, no Ray)."""

from sampler.backbone import (
    DEFAULT_BACKBONE,
    DEFAULT_JUDGE,
    Backbone,
    CheckpointError,
    load_backbone,
    save_backbone,
)
from sampler.decode import GenerateResult, encode_prompts, generate
from sampler.joint import JointSampler, SamplerMismatchError
from sampler.model import ModelArgs, Transformer
from sampler.objective import depth_metrics, joint_loss
from sampler.schema import TRAJECTORY_SCHEMA, ShardError, read_trajectories, write_trajectories
from sampler.trajectory import Trajectory, build_windows, from_result, sample_windows

__all__ = [
    "DEFAULT_BACKBONE", "DEFAULT_JUDGE", "Backbone", "CheckpointError", "GenerateResult", "JointSampler",
    "ModelArgs", "SamplerMismatchError", "ShardError", "TRAJECTORY_SCHEMA", "Trajectory", "Transformer",
    "build_windows", "depth_metrics", "encode_prompts", "from_result", "generate", "joint_loss",
    "load_backbone", "read_trajectories", "sample_windows", "save_backbone", "write_trajectories",
]
