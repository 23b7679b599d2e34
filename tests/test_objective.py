"""The training objective: gradients reach only the sampler, and training beats the marginal baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sampler import JointSampler, depth_metrics, encode_prompts, from_result, generate, joint_loss
from sampler.schema import ShardError, read_trajectories, write_trajectories
from sampler.trajectory import Trajectory, build_windows, k_weights, sample_windows


@pytest.fixture(scope="module")
def trajs(toy):
    r = generate(toy, encode_prompts(toy, n=96), gen_length=16, seed=0)
    return from_result(r)


def test_states_replay_the_trajectory(toy, trajs):
    t = trajs[0]
    assert t.state(0, toy.mask_id)[1:] == [toy.mask_id] * 16
    assert t.state(16, toy.mask_id)[1:] == t.tokens
    s3 = t.state(3, toy.mask_id)[1:]
    assert [i for i, x in enumerate(s3) if x != toy.mask_id] == sorted(t.order[:3])
    b = build_windows([t, trajs[1]], [2, 5], [3, 1], toy.mask_id, toy.pad_id)
    assert b.states.shape == (2, 4, 17)
    assert b.states[0, 3].tolist() == t.state(5, toy.mask_id)
    assert b.states[1, 3].tolist() == trajs[1].state(6, toy.mask_id)  # rows past K repeat s_{i+K}
    assert int(b.target_valid[0].sum()) == 16 - 5


def test_k_weights_favour_small_k():
    w = k_weights(7)
    assert abs(w.sum() - 1) < 1e-12 and all(w[:-1] > w[1:])
    with pytest.raises(ValueError, match="weighting"):
        k_weights(3, "cubic")


def test_gradient_reaches_only_the_sampler(toy, trajs):
    s = JointSampler.for_backbone(toy, seed=0)
    with torch.no_grad():  # away from the zero init so every sampler parameter gets a gradient
        s.norm_out.weight.fill_(0.1)
    batch = sample_windows(trajs, 8, 4, np.random.default_rng(0), toy.mask_id, toy.pad_id)
    loss, _ = joint_loss(toy, s, batch)
    loss.backward()
    assert all(p.grad is None for p in toy.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters())


def test_training_drives_sampler_kl_below_marginal(toy, trajs):
    torch.manual_seed(0)
    train, held_out = trajs[:80], trajs[80:]
    s = JointSampler.for_backbone(toy, seed=0)
    opt = torch.optim.AdamW(s.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    before = depth_metrics(toy, s, held_out, 4, windows_per_depth=32)
    for _ in range(300):
        loss, _ = joint_loss(toy, s, sample_windows(train, 16, 4, rng, toy.mask_id, toy.pad_id))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.parameters(), 1.0)
        opt.step()
    after = depth_metrics(toy, s, held_out, 4, windows_per_depth=32)
    for k in (1, 2, 3, 4):
        assert before[k]["kl_sampler"] == pytest.approx(before[k]["kl_marginal"])  # starts at marginal
        assert after[k]["kl_sampler"] < 0.7 * after[k]["kl_marginal"], (k, after[k])


def test_shards_round_trip_and_refuse_bad_input(toy, trajs, tmp_path):
    meta = {"backbone_identity": toy.identity, "gen_length": 16}
    path = write_trajectories(tmp_path / "a.parquet", trajs[:10], meta)
    back, m = read_trajectories(path, backbone_identity=toy.identity)
    assert back == trajs[:10] and m["gen_length"] == 16
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away
    with pytest.raises(ShardError, match="a.parquet: written for backbone"):
        read_trajectories(path, backbone_identity="feedfacefeedface")
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ShardError, match="corrupt.parquet"):
        read_trajectories(bad)
    import pyarrow as pa
    import pyarrow.parquet as pq

    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    with pytest.raises(ShardError, match="foreign.parquet: not a trajectory shard"):
        read_trajectories(foreign)
    broken = [Trajectory([1], [5, 6, 7], [0, 0, 2], traj_id=9)]
    write_trajectories(tmp_path / "perm.parquet", broken, meta)
    with pytest.raises(ShardError, match="perm.parquet: trajectory 9: order is not a permutation"):
        read_trajectories(tmp_path / "perm.parquet")


def test_warm_start_copies_the_last_layer_and_is_still_marginal(toy, trajs):
    s = JointSampler.for_backbone(toy, seed=0, init="backbone")
    for name, p in toy.model.layers[-1].state_dict().items():
        assert torch.equal(s.blocks[0].state_dict()[name], p)
    d = toy.args.dim
    assert torch.equal(s.proj.weight[:, d:], torch.eye(d)) and not s.proj.weight[:, :d].any()
    prompts = encode_prompts(toy, n=3)
    a = generate(toy, prompts, mode="marginal", k=3, gen_length=9, seed=5)
    b = generate(toy, prompts, sampler=s, mode="joint", k=3, gen_length=9, seed=5)
    assert a.tokens == b.tokens  # the output norm is still zero


def test_loss_at_every_depth(toy, trajs):
    rng = np.random.default_rng(0)
    s = JointSampler.for_backbone(toy, seed=0)
    with torch.no_grad():
        s.norm_out.weight.fill_(0.3)
    one = sample_windows(trajs[:16], 16, 1, rng, toy.mask_id, toy.pad_id)  # K = 1: both losses agree
    last, info_last = joint_loss(toy, s, one, "last")
    every, info_all = joint_loss(toy, s, one, "all")
    assert torch.allclose(last, every, atol=1e-6)
    assert info_all["kl_marginal"] == pytest.approx(info_last["kl_marginal"], abs=1e-6)
    deep = sample_windows(trajs[:16], 16, 4, rng, toy.mask_id, toy.pad_id)
    loss, _ = joint_loss(toy, s, deep, "all")
    loss.backward()
    assert s.blocks[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert not torch.allclose(loss, joint_loss(toy, s, deep, "last")[0])  # earlier depths count too
    with pytest.raises(ValueError, match="depths"):
        joint_loss(toy, s, deep, "every")


def test_rows_of_a_batch_unroll_to_their_own_depth(toy, trajs):
    """The unroll steps only the rows still within their K; each row's prediction equals its own."""
    from sampler.objective import _unroll

    s = JointSampler.for_backbone(toy, seed=0)
    with torch.no_grad():
        s.norm_out.weight.fill_(0.5)
    picks, starts, ks = trajs[:3], [0, 4, 2], [3, 1, 5]
    together = _unroll(toy, s, build_windows(picks, starts, ks, toy.mask_id, toy.pad_id))[0]
    for b in range(3):
        alone = _unroll(toy, s, build_windows([picks[b]], [starts[b]], [ks[b]], toy.mask_id, toy.pad_id))[0]
        n = alone.shape[1]
        torch.testing.assert_close(together[b, :n], alone[0], atol=1e-4, rtol=1e-4)


def test_windows_writing_only_eos_can_be_thinned(toy):
    """eos_keep drops windows whose written tokens are all EOS, and only those."""
    eos, n = toy.eos_id, 8
    t = Trajectory([toy.bos_id], [5, 6, eos, eos, eos, eos, eos, eos], [2, 3, 4, 5, 6, 7, 0, 1])
    rng = np.random.default_rng(0)
    every = sample_windows([t] * 4, 400, 2, rng, toy.mask_id, toy.pad_id)
    thinned = sample_windows([t] * 4, 400, 2, rng, toy.mask_id, toy.pad_id, eos_id=eos, eos_keep=1e-9)

    def eos_only(b):  # windows whose written tokens (s_{i+K} minus s_i) are all EOS
        wrote = (b.states[:, 0] == toy.mask_id) & (b.states[torch.arange(len(b.ks)), b.ks] != toy.mask_id)
        written = b.states[torch.arange(len(b.ks)), b.ks]
        return ((written == eos) | ~wrote).all(1)

    assert 0.3 < float(eos_only(every).float().mean()) < 0.9
    assert not bool(eos_only(thinned).any()) and len(thinned.ks) == 400
    with pytest.raises(ValueError, match="eos_keep"):
        sample_windows([t], 4, 2, rng, toy.mask_id, toy.pad_id, eos_id=eos, eos_keep=0)
    assert n == len(t.tokens)


def test_next_targets_keeps_the_positions_decoded_next(toy, trajs):
    t = trajs[0]
    every = build_windows([t], [2], [3], toy.mask_id, toy.pad_id)
    near = build_windows([t], [2], [3], toy.mask_id, toy.pad_id, next_targets=4)
    assert int(every.target_valid.sum()) == 16 - 5 and int(near.target_valid.sum()) == 4
    assert (near.target_pos[0, :4] - 1).tolist() == t.order[5:9]  # column 0 is the prompt's BOS
