"""Decoding: exact against a naive re-implementation, joint's bookkeeping against an oracle sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sampler import DEFAULT_BACKBONE, JointSampler, encode_prompts, from_result, generate, joint_loss
from sampler.decode import log_probs
from sampler.joint import SAMPLER_WEIGHTS
from sampler.trajectory import sample_windows


def naive_threshold(bb, prompt: list[int], gen_length: int, tau: float, k: int,
                    ) -> tuple[list[int], list[int]]:
    """Fast-dLLM's rule written out for one row, greedy: every masked position whose top probability is
    >= tau, and the lowest-entropy one in any case, at most k (the lowest-entropy ones first)."""
    x = torch.tensor([prompt + [bb.mask_id] * gen_length])
    order = []
    while (x[0] == bb.mask_id).any():
        with torch.no_grad():
            logits = bb(x)[1][0].float()
        logits[:, bb.mask_id] = float("-inf")
        p = torch.softmax(logits, -1)
        ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
        masked = [i for i in range(len(prompt), x.shape[1]) if x[0, i] == bb.mask_id]
        best = min(masked, key=lambda i: ent[i].item())
        take = sorted({best} | {i for i in masked if p[i].max() >= tau}, key=lambda i: ent[i].item())[:k]
        for i in take:
            x[0, i] = logits[i].argmax()
            order.append(i - len(prompt))
    return x[0, len(prompt):].tolist(), order


def naive_greedy(bb, prompt: list[int], gen_length: int) -> tuple[list[int], list[int]]:
    """One token per pass, lowest entropy first, argmax token: the rule above with nothing sure."""
    return naive_threshold(bb, prompt, gen_length, tau=2.0, k=1)


class OracleSampler(nn.Module):
    """Test double: 'sampling' with the backbone itself re-run on the updated sequence, i.e. exact."""

    def __init__(self, bb):
        super().__init__()
        self.bb = bb

    def check_backbone(self, backbone) -> None:
        assert backbone is self.bb

    def forward(self, e, h, ctx, cache=None):  # unmask_step passes a KV cache (None here)
        x = e
        for layer in self.bb.model.layers:
            x = layer(x, ctx)
        return self.bb.model.norm(x)


def test_exact_greedy_equals_naive_one_by_one(toy):
    prompts = encode_prompts(toy, ["The quick brown", "San"])
    r = generate(toy, prompts, mode="exact", gen_length=10, temperature=0)
    again = generate(toy, prompts, mode="exact", gen_length=10, temperature=0, seed=123)
    assert r.tokens == again.tokens and r.order == again.order  # deterministic, seed irrelevant
    for b, p in enumerate(prompts):  # row 1 is left-padded in the batch: padding must not matter
        tokens, order = naive_greedy(toy, p, 10)
        assert r.tokens[b] == tokens and r.order[b] == order
    assert r.full_passes == 10 and r.sampler_passes == 0 and r.tokens_per_pass == 1.0


@pytest.mark.parametrize("policy", ["entropy", "confidence", "margin"])
def test_joint_with_oracle_sampler_reproduces_exact(toy, policy):
    prompts = encode_prompts(toy, ["A journey of", "To be, or not", "Name"])
    exact = generate(toy, prompts, mode="exact", gen_length=12, temperature=0, policy=policy)
    joint = generate(toy, prompts, sampler=OracleSampler(toy), mode="joint", k=4, gen_length=12,
                     temperature=0, policy=policy)
    assert joint.tokens == exact.tokens and joint.order == exact.order
    assert joint.full_passes == 3 and joint.sampler_passes == 9 and joint.tokens_per_pass == 4.0


def test_marginal_uses_one_pass_for_k_tokens(toy):
    prompts = encode_prompts(toy, n=4)
    r = generate(toy, prompts, mode="marginal", k=4, gen_length=10, seed=0)
    assert r.full_passes == 3  # 4 + 4 + 2
    for row, order in zip(r.tokens, r.order, strict=True):
        assert sorted(order) == list(range(10)) and toy.mask_id not in row


def test_untrained_sampler_equals_marginal(toy):
    """The sampler's output norm starts at zero: untrained joint decoding is the marginal baseline."""
    prompts = encode_prompts(toy, n=3)
    s = JointSampler.for_backbone(toy, seed=0)
    a = generate(toy, prompts, mode="marginal", k=3, gen_length=9, seed=5)
    b = generate(toy, prompts, sampler=s, mode="joint", k=3, gen_length=9, seed=5)
    assert a.tokens == b.tokens and b.sampler_passes == 6


def test_sampling_is_seeded(toy):
    prompts = encode_prompts(toy, n=4)
    a = generate(toy, prompts, gen_length=8, seed=1)
    b = generate(toy, prompts, gen_length=8, seed=1)
    c = generate(toy, prompts, gen_length=8, seed=2)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_blocks_fill_left_to_right(toy):
    r = generate(toy, encode_prompts(toy, n=2), gen_length=12, block_length=4, seed=0)
    for order in r.order:
        assert sorted(order[:4]) == [0, 1, 2, 3] and sorted(order[4:8]) == [4, 5, 6, 7]


def test_stop_at_eos_fills_the_rest(toy):
    # an LM head with a large EOS bias makes EOS the likeliest token everywhere
    old_head = toy.model.lm_head
    head = nn.Linear(old_head.in_features, old_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old_head.weight)
        head.bias.zero_()
        head.bias[toy.eos_id] = 1e4
    toy.model.lm_head = head
    try:
        r = generate(toy, encode_prompts(toy, n=2), gen_length=8, stop_at_eos=True, temperature=0,
                     policy="random", seed=3)
    finally:
        toy.model.lm_head = old_head
    for row, order in zip(r.tokens, r.order, strict=True):
        first = row.index(toy.eos_id)
        assert all(t == toy.eos_id for t in row[first:])
        assert len(order) < 8 and r.full_passes < 8
        assert order[-1] == first  # the EOS was the last decoded token of its row
    assert r.text == ["", ""]


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    p = log_probs(logits, 1.0, 0.7).exp()
    assert torch.allclose(p, torch.tensor([[[0.625, 0.375, 0.0, 0.0]]]))
    assert torch.allclose(log_probs(logits, 1.0, 1.0).exp(), logits.exp())


def test_bad_arguments_raise_clear_errors(toy, tmp_path):
    p = encode_prompts(toy, n=1)
    s = JointSampler.for_backbone(toy)
    cases = [
        (dict(mode="joint", k=2), "needs a sampler"),
        (dict(mode="marginal", k=0), "k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(mode="fast"), "mode"),
        (dict(policy="best"), "policy"),
        (dict(mode="marginal", k=4, threshold=-0.5), "threshold"),
        (dict(mode="exact", threshold=0.9), "threshold"),
        (dict(kv_cache="full"), "kv_cache"),
        (dict(block_length=0), "block_length"),
        (dict(gen_length=toy.args.max_seq_len), "exceeds the context"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            generate(toy, p, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        generate(toy, [[]])
    other = JointSampler(toy.args, backbone_identity="0123456789abcdef", backbone_name="other")
    with pytest.raises(ValueError, match="trained for backbone 'other'"):
        generate(toy, p, sampler=other, mode="joint", k=2)
    # and on load: a saved sampler for another backbone is refused
    other.save(tmp_path / "s")
    with pytest.raises(ValueError, match="trained for backbone"):
        JointSampler.load(tmp_path / "s", toy)
    s.save(tmp_path / "ok")
    loaded = JointSampler.load(tmp_path / "ok", toy)
    for a, b in zip(loaded.state_dict().values(), s.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_compiled_read_out_matches_eager(toy):
    """compile_read_out() fuses log-softmax and position scores: same values, same decoding."""
    from sampler.decode import compile_read_out, read_out

    prompts = encode_prompts(toy, ["A journey of", "To be, or not", "Name"])
    x = torch.tensor([p + [toy.mask_id] * (12 - len(p)) for p in (q[:12] for q in prompts)])
    cand = torch.arange(4, 12).expand(x.shape[0], -1)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        h = toy.hidden(x)
        want = [read_out(toy, h, cand, 0.7, 1.0, pol, gen) for pol in ("entropy", "margin")]
        eager = generate(toy, prompts, mode="marginal", k=3, gen_length=9, temperature=0)
        compile_read_out()
        try:
            got = [read_out(toy, h, cand, 0.7, 1.0, pol, gen) for pol in ("entropy", "margin")]
            fused = generate(toy, prompts, mode="marginal", k=3, gen_length=9, temperature=0)
        finally:
            compile_read_out(False)
    for (lp, sc), (glp, gsc) in zip(want, got, strict=True):
        assert torch.allclose(lp, glp, atol=1e-4) and torch.allclose(sc, gsc, atol=1e-4)
    assert fused.tokens == eager.tokens and fused.order == eager.order


def test_settings_validate_once_and_name_the_field():
    from pydantic import ValidationError

    from sampler.settings import DecodeSettings

    assert DecodeSettings(mode="exact", k=4).k == 1  # k means nothing in exact mode
    s = DecodeSettings(mode="joint", k=4, threshold=0.9)
    assert s.replace(k=2).k == 2 and s.k == 4  # frozen: replace makes a validated copy
    with pytest.raises(ValidationError, match="top_p"):
        DecodeSettings(top_p=1.5)
    with pytest.raises(ValidationError, match="unknown_field"):
        DecodeSettings(unknown_field=1)
    with pytest.raises(ValidationError, match="frozen"):
        s.k = 3


def sharpened(toy, scale: float):
    """The toy backbone with its LM head scaled: confident at some positions, not at others."""
    head = nn.Linear(toy.model.lm_head.in_features, toy.model.lm_head.out_features, bias=False)
    with torch.no_grad():
        head.weight.copy_(toy.model.lm_head.weight * scale)
    return head


def test_threshold_decoding_is_fast_dllms_rule(toy):
    prompts = encode_prompts(toy, ["The quick brown", "San", "To be"])
    old = toy.model.lm_head
    toy.model.lm_head = sharpened(toy, 6.0)
    try:
        r = generate(toy, prompts, mode="marginal", k=8, threshold=0.7, gen_length=12, temperature=0)
        for b, p in enumerate(prompts):
            tokens, order = naive_threshold(toy, p, 12, 0.7, 8)
            assert r.tokens[b] == tokens and sorted(r.order[b]) == sorted(order)
    finally:
        toy.model.lm_head = old
    assert 1.0 < r.tokens_per_pass < 8.0  # some passes take several tokens, none takes all


def test_threshold_above_one_is_exact_and_zero_is_fixed_k(toy):
    prompts = encode_prompts(toy, ["A journey of", "To be, or not", "Name"])
    for temperature in (0.0, 1.0):
        exact = generate(toy, prompts, mode="exact", gen_length=10, temperature=temperature, seed=4)
        above = generate(toy, prompts, mode="marginal", k=4, threshold=1.01, gen_length=10,
                         temperature=temperature, seed=4)
        assert above.tokens == exact.tokens and above.order == exact.order
        assert above.full_passes == exact.full_passes
        fixed = generate(toy, prompts, mode="marginal", k=4, gen_length=10, temperature=temperature, seed=4)
        zero = generate(toy, prompts, mode="marginal", k=4, threshold=0.0, gen_length=10,
                        temperature=temperature, seed=4)
        assert zero.tokens == fixed.tokens and zero.order == fixed.order and zero.full_passes == 3


def test_joint_threshold_with_oracle_sampler_is_exact(toy):
    prompts = encode_prompts(toy, ["A journey of", "To be, or not", "Name"])
    exact = generate(toy, prompts, mode="exact", gen_length=12, temperature=0)
    hybrid = generate(toy, prompts, sampler=OracleSampler(toy), mode="joint", k=4, threshold=1.5,
                      gen_length=12, temperature=0)
    assert hybrid.tokens == exact.tokens and hybrid.order == exact.order
    assert hybrid.full_passes == 3 and hybrid.sampler_passes == 9


def test_joint_threshold_takes_sure_tokens_without_sampler_passes(toy):
    """Sure positions come from the full pass; the sampler only runs for rows that still take a token."""
    prompts = encode_prompts(toy, ["The quick brown", "San", "To be"])
    s = JointSampler.for_backbone(toy, seed=0)
    old = toy.model.lm_head
    toy.model.lm_head = sharpened(toy, 6.0)
    try:
        fixed = generate(toy, prompts, sampler=s, mode="joint", k=4, gen_length=12, temperature=0)
        hybrid = generate(toy, prompts, sampler=s, mode="joint", k=4, threshold=0.7, gen_length=12,
                          temperature=0)
    finally:
        toy.model.lm_head = old
    for order in hybrid.order:
        assert sorted(order) == list(range(12))
    assert hybrid.full_passes == fixed.full_passes == 3  # k tokens per pass either way
    assert hybrid.sampler_passes < fixed.sampler_passes  # the sure ones needed no sampler pass


def test_fill_sure_takes_only_what_the_sampler_made_sure(toy):
    """fill='sure': above 1 nothing is ever sure, so it is exact decoding with one (wasted) sampler pass
    per full pass that leaves a candidate; at 0 everything is, so it fills to k like the hybrid; in between
    it takes fewer tokens per pass than filling to k, and still decodes every position."""
    prompts = encode_prompts(toy, ["A journey of", "To be, or not", "Name"])
    oracle = OracleSampler(toy)
    exact = generate(toy, prompts, mode="exact", gen_length=12, temperature=0)
    above = generate(toy, prompts, sampler=oracle, mode="joint", k=4, threshold=1.5, fill="sure",
                     gen_length=12, temperature=0)
    assert above.tokens == exact.tokens and above.order == exact.order
    assert above.full_passes == exact.full_passes == 12
    assert above.sampler_passes == 11  # none after the last pass: no candidate is left
    s = JointSampler.for_backbone(toy, seed=0)
    with torch.no_grad():
        s.norm_out.weight.fill_(0.5)
    kw = dict(sampler=s, mode="joint", k=4, gen_length=12, seed=3)
    assert generate(toy, prompts, threshold=0.0, fill="sure", **kw).tokens == \
        generate(toy, prompts, threshold=0.0, **kw).tokens
    old = toy.model.lm_head
    toy.model.lm_head = sharpened(toy, 3.0)  # sure at some positions, not at others
    try:
        sure = generate(toy, prompts, threshold=0.7, fill="sure", **kw)
        to_k = generate(toy, prompts, threshold=0.7, **kw)
    finally:
        toy.model.lm_head = old
    assert 1.0 < sure.tokens_per_pass < to_k.tokens_per_pass == 4.0
    for order in sure.order:
        assert sorted(order) == list(range(12))


@pytest.mark.parametrize("settings", [dict(mode="joint", k=4, fill="sure"),
                                      dict(mode="marginal", k=4, threshold=0.9, fill="sure"),
                                      dict(mode="joint", k=4, threshold=0.9, order="planned", fill="sure")])
def test_fill_sure_needs_a_joint_rescoring_threshold(settings):
    from pydantic import ValidationError

    from sampler.settings import DecodeSettings

    with pytest.raises(ValidationError, match="fill"):
        DecodeSettings(**settings)


@pytest.mark.parametrize("mode,threshold,fill", [("marginal", 0.5, "k"), ("joint", 0.5, "k"),
                                                 ("joint", None, "k"), ("joint", 0.5, "sure")])
def test_rows_stop_independently(toy, mode, threshold, fill):
    """With EOS and thresholds rows finish after different numbers of passes: batched = each row alone."""
    prompts = encode_prompts(toy, ["The quick brown", "San", "To be, or not to be"])
    s = JointSampler.for_backbone(toy, seed=0)
    with torch.no_grad():
        s.norm_out.weight.fill_(0.5)  # a sampler that changes the distributions
    old = toy.model.lm_head
    head = sharpened(toy, 1.5)
    head.bias = nn.Parameter(torch.zeros(head.out_features))
    with torch.no_grad():
        head.bias[toy.eos_id] = 8.0  # EOS likely but not certain: rows end at different passes
    toy.model.lm_head = head
    kw = dict(sampler=s, mode=mode, k=4, threshold=threshold, fill=fill, gen_length=12, temperature=0,
              stop_at_eos=True)
    try:
        batch = generate(toy, prompts, **kw)
        alone = [generate(toy, [p], **kw) for p in prompts]
    finally:
        toy.model.lm_head = old
    for b, one in enumerate(alone):
        assert batch.tokens[b] == one.tokens[0] and batch.order[b] == one.order[0]
    assert len({len(o) for o in batch.order}) > 1  # the rows really did stop at different points


def test_planned_order_reads_out_the_full_pass_plan(toy):
    """order='planned': the full pass fixes the k positions. An untrained sampler gives marginal decoding
    token for token; the oracle sampler keeps exact's tokens at each planned position (it conditions on
    every token written), in the full pass's order; k=1 is exact; a threshold is refused."""
    prompts = encode_prompts(toy, ["A journey of", "To be, or not", "Name"])
    untrained = JointSampler.for_backbone(toy, seed=0)
    a = generate(toy, prompts, mode="marginal", k=3, gen_length=9, seed=5)
    b = generate(toy, prompts, sampler=untrained, mode="joint", k=3, gen_length=9, seed=5, order="planned")
    assert a.tokens == b.tokens and a.order == b.order and b.sampler_passes == 6
    oracle = generate(toy, prompts, sampler=OracleSampler(toy), mode="joint", k=3, gen_length=9,
                      temperature=0, order="planned")
    for b, p in enumerate(prompts):  # the rule written out for one row
        x = torch.tensor([p + [toy.mask_id] * 9])

        def dist(x):
            with torch.no_grad():
                logits = toy(x)[1][0].float()
            logits[:, toy.mask_id] = -1e9  # finite: 0 * log 0 stays 0 in the entropy
            return torch.log_softmax(logits, -1)

        order = []
        while (x[0] == toy.mask_id).any():
            lp = dist(x)
            masked = [i for i in range(len(p), x.shape[1]) if x[0, i] == toy.mask_id]
            plan = sorted(masked, key=lambda i: -(lp[i].exp() * lp[i]).sum().item())[:3]
            for i in plan:
                x[0, i] = dist(x)[i].argmax()
                order.append(i - len(p))
        assert oracle.tokens[b] == x[0, len(p):].tolist() and oracle.order[b] == order
    one = generate(toy, prompts, sampler=untrained, mode="joint", k=1, gen_length=9, temperature=0,
                   order="planned")
    exact = generate(toy, prompts, mode="exact", gen_length=9, temperature=0)
    assert one.tokens == exact.tokens and one.order == exact.order
    # with a threshold: the sure ones, then the rest of k planned by score; by confidence and with the
    # untrained (marginal) sampler that is the top k by confidence: marginal fixed-k decoding
    hybrid = generate(toy, prompts, sampler=untrained, mode="joint", k=3, gen_length=9, temperature=0,
                      policy="confidence", threshold=0.3, order="planned")
    fixed = generate(toy, prompts, mode="marginal", k=3, gen_length=9, temperature=0, policy="confidence")
    assert hybrid.tokens == fixed.tokens and hybrid.order == fixed.order and hybrid.full_passes == 3


# --- a sampler of several decoder layers (n_layers) ---------------------------------------------------------


def test_two_layer_sampler_is_marginal_untrained_and_differs_from_one_layer_trained(toy):
    prompts = encode_prompts(toy, n=3)
    two = JointSampler.for_backbone(toy, seed=0, n_layers=2)
    assert len(two.blocks) == 2 and two.args.n_layers == 2 and not two.args.causal
    a = generate(toy, prompts, mode="marginal", k=3, gen_length=9, seed=5)
    b = generate(toy, prompts, sampler=two, mode="joint", k=3, gen_length=9, seed=5)
    assert a.tokens == b.tokens and b.sampler_passes == 6  # the zero gate: exactly the marginal baseline
    one = JointSampler.for_backbone(toy, seed=0)
    with torch.no_grad():
        for s in (one, two):
            s.norm_out.weight.fill_(1.0)  # an open gate, as after training
    x = torch.tensor([p + [toy.mask_id] * 6 for p in (q[:4] for q in prompts)])
    ctx = toy.context(x)
    with torch.no_grad():
        h = toy.hidden(x, None, ctx)
        out1, out2 = one(toy.embed(x), h, ctx), two(toy.embed(x), h, ctx)
    assert not torch.allclose(out2, h, atol=1e-3) and not torch.allclose(out2, out1, atol=1e-3)
    c = generate(toy, prompts, sampler=two, mode="joint", k=3, gen_length=9, seed=5)
    assert c.tokens != a.tokens  # the second layer's output reaches the tokens
    with pytest.raises(ValueError, match="n_layers"):
        JointSampler.for_backbone(toy, n_layers=0)
    with pytest.raises(ValueError, match="n_layers 3"):  # the toy backbone has 2 layers to copy
        JointSampler.for_backbone(toy, init="backbone", n_layers=3)


def test_warm_start_copies_the_last_n_layers_in_order(toy):
    s = JointSampler.for_backbone(toy, seed=0, init="backbone", n_layers=2)
    for block, layer in zip(s.blocks, toy.model.layers[-2:], strict=True):
        for name, p in layer.state_dict().items():
            assert torch.equal(block.state_dict()[name], p)
    assert not torch.equal(toy.model.layers[0].mlp.up_proj.weight, toy.model.layers[1].mlp.up_proj.weight)


def test_two_layer_sampler_saves_and_loads(toy, tmp_path):
    s = JointSampler.for_backbone(toy, seed=0, n_layers=2)
    with torch.no_grad():
        s.norm_out.weight.fill_(0.5)
    s.save(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "sampler.json").read_text())["args"]["n_layers"] == 2
    loaded = JointSampler.load(tmp_path / "two", toy)
    assert len(loaded.blocks) == 2 and loaded.args.n_layers == 2
    want = s.state_dict()
    assert sorted(loaded.state_dict()) == sorted(want) and any(k.startswith("blocks.1.") for k in want)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_sampler_saved_with_block_keys_loads_into_blocks_0(toy, tmp_path):
    """Samplers saved before n_layers named their one layer `block.*` (the shipped one among them)."""
    s = JointSampler.for_backbone(toy, seed=0)
    with torch.no_grad():
        s.norm_out.weight.fill_(0.5)
    s.save(tmp_path / "old")
    f = tmp_path / "old" / SAMPLER_WEIGHTS
    save_file({k.replace("blocks.0.", "block."): v for k, v in load_file(str(f)).items()}, str(f))
    assert any(k.startswith("block.") for k in load_file(str(f)))
    loaded = JointSampler.load(tmp_path / "old", toy)
    assert len(loaded.blocks) == 1
    for k, v in s.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    shipped = JointSampler.load(DEFAULT_BACKBONE.parent / "sampler")
    for k, v in load_file(str(DEFAULT_BACKBONE.parent / "sampler" / SAMPLER_WEIGHTS)).items():
        assert torch.equal(shipped.state_dict()[k.replace("block.", "blocks.0.", 1)], v), k


def test_joint_loss_reaches_both_layers(toy):
    trajs = from_result(generate(toy, encode_prompts(toy, n=8), gen_length=8, seed=0))
    s = JointSampler.for_backbone(toy, seed=0, n_layers=2)
    with torch.no_grad():
        s.norm_out.weight.fill_(0.1)  # away from the zero gate, which would block every gradient
    batch = sample_windows(trajs, 8, 3, np.random.default_rng(0), toy.mask_id, toy.pad_id)
    loss, _ = joint_loss(toy, s, batch)
    loss.backward()
    for block in s.blocks:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
