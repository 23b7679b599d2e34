"""The block-wise approximate KV cache (sampler.kvcache): exact wherever the approximation is exact.

Two settings make it exact and so give tests that can fail: a block length of 1 (every full pass is a
refresh), and a one-layer backbone (a layer's keys and values at a column depend only on that column's
token, so columns outside the block whose tokens did not change have exactly the cached ones).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from sampler import JointSampler, generate
from sampler.backbone import Backbone, Layout, load_backbone
from sampler.decode import pack_rows
from sampler.kvcache import BlockKVCache
from sampler.testing import make_toy_backbone

# rows of different prompt lengths: the batch is left-padded
PROMPT_LENGTHS = (4, 1, 6)


def prompts_for(bb: Backbone) -> list[list[int]]:
    return [[bb.bos_id] + [5 + 3 * i + j for j in range(n - 1)] for i, n in enumerate(PROMPT_LENGTHS)]


def unshifted(bb: Backbone) -> Backbone:
    """The same weights read out as LLaDA does (shift 0: the hidden state at p gives position p)."""
    layout = Layout("llada", 0, bb.args, bb.mask_id, bb.eos_id, bb.bos_id, bb.pad_id)
    return Backbone(bb.model, layout, tokenizer=bb.tokenizer, name=bb.name + "-shift0", identity=bb.identity)


@pytest.fixture(scope="module")
def toy1_dir(tmp_path_factory):
    return make_toy_backbone(tmp_path_factory.mktemp("toy1") / "backbone", n_layers=1)


@pytest.fixture(scope="module")
def toy1(toy1_dir):
    return load_backbone(toy1_dir)


def sampler_for(bb: Backbone, n_layers: int = 1) -> JointSampler:
    s = JointSampler.for_backbone(bb, seed=0, n_layers=n_layers)
    with torch.no_grad():  # a nonzero output norm, so the sampler changes the distributions
        s.norm_out.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    return s.eval()


MODES = {
    "exact": {"mode": "exact"},
    "marginal": {"mode": "marginal", "k": 2},
    "joint": {"mode": "joint", "k": 2},
    "threshold": {"mode": "marginal", "k": 3, "threshold": 0.05},
    "joint-threshold": {"mode": "joint", "k": 3, "threshold": 0.05},
}


@pytest.mark.parametrize("shift", [1, 0])
@pytest.mark.parametrize("kind", ["prefix", "dual"])
def test_block_length_one_equals_uncached(toy, shift, kind):
    """Block length 1: every full pass is a refresh, so the cache changes nothing, in every mode."""
    bb = toy if shift else unshifted(toy)
    s = sampler_for(bb)
    for name, fields in MODES.items():
        common = {"gen_length": 8, "block_length": 1, "temperature": 0.0, "sampler": s, **fields}
        ref = generate(bb, prompts_for(bb), **common)
        got = generate(bb, prompts_for(bb), kv_cache=kind, **common)
        assert got.tokens == ref.tokens and got.order == ref.order, name
        assert got.full_passes == ref.full_passes


@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("shift", [1, 0])
@pytest.mark.parametrize("kind", ["prefix", "dual"])
def test_joint_one_sampler_pass_per_block_equals_uncached(toy, shift, kind, n_layers):
    """k = block length = 2: each block is one full pass (a refresh) and one sampler pass, the sampler's
    first since the refresh, which computes and stores every column: exact, with any number of layers."""
    bb = toy if shift else unshifted(toy)
    common = {"gen_length": 12, "block_length": 2, "temperature": 0.0, "sampler": sampler_for(bb, n_layers),
              "mode": "joint", "k": 2, "stop_at_eos": True}
    ref = generate(bb, prompts_for(bb), **common)
    got = generate(bb, prompts_for(bb), kv_cache=kind, **common)
    assert ref.sampler_passes > 0
    assert got.tokens == ref.tokens and got.order == ref.order
    assert (got.full_passes, got.sampler_passes) == (ref.full_passes, ref.sampler_passes)
    marginal = generate(bb, prompts_for(bb), **{**common, "mode": "marginal"})
    assert marginal.tokens != ref.tokens  # the sampler mattered


class RecordingSampler(JointSampler):
    """A JointSampler that records the cache each of its passes was given."""

    def forward(self, e, h, ctx, cache=None):
        self.caches.append(cache)
        return super().forward(e, h, ctx, cache)


@pytest.mark.parametrize("fields", [{"k": 3}, {"k": 3, "threshold": 0.9}, {"k": 3, "n_layers": 2}])
def test_generate_gives_the_sampler_the_cache(toy, fields):
    """Every sampler pass of a cached generation gets the cache (fixed k and the threshold hybrid)."""
    fields = dict(fields)  # a copy: pytest shares the parameter's dict
    n_layers = fields.pop("n_layers", 1)
    s = RecordingSampler(toy.args, n_layers=n_layers, backbone_identity=toy.identity)
    s.load_state_dict(sampler_for(toy, n_layers).state_dict())
    s.caches = []
    r = generate(toy, prompts_for(toy), sampler=s.eval(), mode="joint", gen_length=12, block_length=4,
                 temperature=0.0, kv_cache="dual", **fields)
    assert len(s.caches) == r.sampler_passes > 3
    assert all(c is s.caches[0] and c is not None for c in s.caches)


@pytest.mark.parametrize("shift", [1, 0])
@pytest.mark.parametrize("kind", ["prefix", "dual"])
def test_one_layer_backbone_cache_is_exact(toy1, shift, kind):
    """One layer: cached keys and values of unchanged columns are exact, so whole generations with real
    cached passes (4 columns a block, several passes each) equal the uncached ones."""
    bb = toy1 if shift else unshifted(toy1)
    for name in ("exact", "marginal", "threshold"):
        common = {"gen_length": 16, "block_length": 4, "temperature": 0.0, **MODES[name]}
        ref = generate(bb, prompts_for(bb), **common)
        got = generate(bb, prompts_for(bb), kv_cache=kind, **common)
        assert got.tokens == ref.tokens and got.order == ref.order, name
        assert ref.full_passes > 4  # more passes than blocks: most of them were cached passes


def batch_in_blocks(bb: Backbone, block: int = 4, gen: int = 12) -> tuple[torch.Tensor, torch.Tensor,
                                                                         torch.Tensor, torch.Tensor]:
    """A packed batch whose rows are in different blocks (row 0 in block 0, row 1 in block 1, row 2 in
    block 2), with random tokens already decoded before each row's current block."""
    prompts = prompts_for(bb)
    x, attn, _ = pack_rows(bb, prompts, gen)
    L = x.shape[1]
    P = L - gen
    block_id = torch.cat([torch.full((P,), gen), torch.arange(gen) // block]).expand(len(prompts), -1)
    g = torch.Generator().manual_seed(0)
    for row in range(len(prompts)):
        x[row, P: P + row * block] = torch.randint(10, 200, (row * block,), generator=g)
    return x, attn, block_id, (x == bb.mask_id) & (block_id < gen)


def block_positions(block_id: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Each row's current block's columns, [B, block]."""
    cur = torch.where(masked, block_id, 1 << 30).min(1, keepdim=True).values
    return torch.stack([row.nonzero()[:, 0] for row in block_id == cur])


@pytest.mark.parametrize("shift", [1, 0])
@pytest.mark.parametrize("kind", ["prefix", "dual"])
def test_cached_pass_logits_equal_uncached(toy, toy1, shift, kind):
    with torch.inference_mode():
        # two layers, nothing changed since the refresh: the block's logits are the uncached ones
        bb = toy if shift else unshifted(toy)
        x, attn, block_id, masked = batch_in_blocks(bb)
        ctx = bb.context(x, attn)
        cache = BlockKVCache.for_backbone(bb, x.shape[0], x.shape[1], kind)
        assert cache.plan(masked, block_id)  # the first pass refreshes
        h_ref = bb.hidden(x, attn, ctx)
        torch.testing.assert_close(bb.hidden(x, attn, ctx, cache), h_ref, rtol=0, atol=1e-5)
        assert not cache.plan(masked, block_id)
        pos = block_positions(block_id, masked)
        h = bb.hidden(x, attn, ctx, cache)
        torch.testing.assert_close(bb.logits(h, pos), bb.logits(h_ref, pos), rtol=0, atol=1e-5)
        # rows are in blocks 0, 1 and 2: each row computes its own columns, short rows padded
        width = {"prefix": lambda r: 12 - 4 * r, "dual": lambda r: 4}[kind]
        for r in range(3):
            start = x.shape[1] - 12 + 4 * r - shift
            assert sorted(set(cache.cols[r].tolist())) == list(range(start, start + width(r) + shift))

        # one layer, tokens of every row's block changed since the refresh: still exact
        bb = toy1 if shift else unshifted(toy1)
        x, attn, block_id, masked = batch_in_blocks(bb)
        ctx = bb.context(x, attn)
        cache = BlockKVCache.for_backbone(bb, x.shape[0], x.shape[1], kind)
        cache.plan(masked, block_id)
        h_before = bb.hidden(x, attn, ctx, cache)
        pos = block_positions(block_id, masked)
        x.scatter_(1, pos[:, :2], torch.tensor([[31, 32], [33, 34], [35, 36]]))  # two tokens decoded
        assert not cache.plan((x == bb.mask_id) & (block_id < 12), block_id)  # same blocks: no refresh
        h = bb.hidden(x, attn, ctx, cache)
        h_ref = bb.hidden(x, attn, ctx)
        torch.testing.assert_close(bb.logits(h, pos), bb.logits(h_ref, pos), rtol=0, atol=1e-5)
        assert not torch.allclose(bb.logits(h_before, pos), bb.logits(h_ref, pos), atol=1e-3)


def test_every_column_recomputed_is_exact_after_any_change(toy):
    """Columns given in any order, repeated: a cached pass that computes them all is the full pass, even
    with tokens changed everywhere (fresh keys and values are stored before attention)."""
    with torch.inference_mode():
        x, attn, block_id, masked = batch_in_blocks(toy)
        ctx = toy.context(x, attn)
        cache = BlockKVCache.for_backbone(toy, x.shape[0], x.shape[1], "prefix")
        cache.plan(masked, block_id)
        toy.hidden(x, attn, ctx, cache)
        x2 = torch.where(attn & (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) < 0.5),
                         torch.randint_like(x, 10, 200), x)
        L = x.shape[1]
        cache.cols = torch.stack([torch.cat([torch.randperm(L), torch.arange(3)]) for _ in range(3)])
        torch.testing.assert_close(toy.hidden(x2, attn, ctx, cache), toy.hidden(x2, attn, ctx),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["prefix", "dual"])
def test_cached_sampler_pass_equals_uncached(toy, kind):
    """The sampler's first pass after a refresh stores its layer's keys and values at every column; later
    passes compute only the cache's columns, exact while the input outside them is unchanged."""
    s = sampler_for(toy)
    with torch.inference_mode():
        x, attn, block_id, masked = batch_in_blocks(toy)
        ctx = toy.context(x, attn)
        cache = BlockKVCache.for_backbone(toy, x.shape[0], x.shape[1], kind, sampler=s)
        cache.plan(masked, block_id)
        h0 = toy.hidden(x, attn, ctx, cache)
        first = s(toy.embed(x), h0, ctx, cache)  # every column, stored
        torch.testing.assert_close(first, s(toy.embed(x), h0, ctx), rtol=0, atol=1e-5)
        pos = block_positions(block_id, masked)
        x.scatter_(1, pos[:, :1], torch.tensor([[41], [42], [43]]))
        cache.plan((x == toy.mask_id) & (block_id < 12), block_id)
        h1 = toy.hidden(x, attn, ctx, cache)  # outside the computed columns: h0's rows
        got = s(toy.embed(x), h1, ctx, cache)
        want = s(toy.embed(x), h1, ctx)
        cols = cache.cols
        computed = torch.zeros(x.shape, dtype=torch.bool).scatter_(1, cols, True)
        torch.testing.assert_close(got[computed], want[computed], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[~computed], h1[~computed], rtol=0, atol=0)  # passed through
        assert not torch.allclose(got[computed], h1[computed], atol=1e-3)  # the sampler did something
    with pytest.raises(ValueError, match="no sampler layer"):
        no_sampler = BlockKVCache.for_backbone(toy, 1, 4, kind)
        no_sampler.start("sampler")


@pytest.mark.parametrize("kind", ["prefix", "dual"])
def test_two_layer_sampler_caches_a_pair_per_layer(toy, kind):
    """One (keys, values) pair per sampler layer, each written by its own layer: a cached pass over
    unchanged input equals the uncached one only if every layer attends over its own cached columns."""
    s = sampler_for(toy, n_layers=2)
    with torch.inference_mode():
        x, attn, block_id, masked = batch_in_blocks(toy)
        ctx = toy.context(x, attn)
        cache = BlockKVCache.for_backbone(toy, x.shape[0], x.shape[1], kind, sampler=s)
        pairs = cache.layers["sampler"]
        assert len(pairs) == 2 and pairs[0][0].data_ptr() != pairs[1][0].data_ptr()
        cache.plan(masked, block_id)
        h = toy.hidden(x, attn, ctx, cache)
        want = s(toy.embed(x), h, ctx)
        torch.testing.assert_close(s(toy.embed(x), h, ctx, cache), want, rtol=0, atol=1e-5)  # stores
        assert all(k.abs().sum() > 0 and v.abs().sum() > 0 for k, v in pairs)
        assert not torch.allclose(pairs[0][0], pairs[1][0])
        got = s(toy.embed(x), h, ctx, cache)  # only cache.cols computed, the rest from each layer's pair
        computed = torch.zeros(x.shape, dtype=torch.bool).scatter_(1, cache.cols, True)
        assert not computed.all()
        torch.testing.assert_close(got[computed], want[computed], rtol=0, atol=1e-5)
        one_layer = BlockKVCache.for_backbone(toy, x.shape[0], x.shape[1], kind, sampler=sampler_for(toy))
        with pytest.raises(ValueError, match="n_layers 2"):
            s(toy.embed(x), h, ctx, one_layer)


def test_plan_refreshes_only_when_an_unfinished_row_changes_block(toy):
    P, gen, block = 3, 8, 4
    block_id = torch.cat([torch.full((P,), gen), torch.arange(gen) // block]).expand(3, -1)
    masked = torch.zeros(3, P + gen, dtype=torch.bool)
    masked[0, P:] = True  # row 0: block 0
    masked[1, P + 5:] = True  # row 1: block 1
    masked[2] = False  # row 2: finished
    cache = BlockKVCache(toy.args, 3, P + gen, kind="dual", shift=1)
    assert cache.plan(masked, block_id) and cache.refreshes == 1
    assert [sorted(set(c)) for c in cache.cols.tolist()] == [[2, 3, 4, 5, 6], [6, 7, 8, 9, 10], [10]]
    masked[0, P] = False  # a token decoded inside row 0's block
    assert not cache.plan(masked, block_id) and cache.refreshes == 1
    masked[1] = False  # row 1 finishes: nothing to refresh for
    assert not cache.plan(masked, block_id)
    masked[0, P:P + block] = False  # row 0 moves on to block 1
    assert cache.plan(masked, block_id) and cache.refreshes == 2
    assert cache.cols[0].tolist() == [6, 7, 8, 9, 10]
    with pytest.raises(ValueError, match="kv_cache"):
        BlockKVCache(toy.args, 1, 4, kind="none")


# --- the serving lane: its rows' cache is rebuilt whenever rows join or leave -------------------------------


@pytest.mark.parametrize("kind", ["prefix", "dual"])
def test_lane_rows_joining_mid_block_equal_rows_alone(toy1, toy1_dir, kind):
    from serve.generator import Engine, Lane

    engine = Engine(str(toy1_dir), "none", device="cpu", batch_wait_s=0.0, torch_threads=1)
    loop = asyncio.new_event_loop()
    decoding = {"mode": "exact", "temperature": 0.0, "block_length": 4, "stop_at_eos": False,
                "kv_cache": kind}

    def job(prompt: str, max_tokens: int):
        request = {"kind": "completion", "prompt": prompt, "stream": False,
                   "decoding": {**decoding, "max_tokens": max_tokens}}
        return engine.prepare(request, loop)

    first, late = job("The quick brown fox", 16), job("San", 8)
    assert first.settings.kv_cache == kind
    lane = Lane(engine, first.settings, seed=0)
    lane.admit(first)
    done, caches = {}, []
    for step in range(40):
        if step == 2:  # mid-block for the first job
            lane.admit(late)
            assert lane.cache is None  # rebuilt for the new rows
        if not lane.n_rows():
            break
        lane.step()
        caches.append((lane.cache, lane.cache.k.data_ptr(), lane.cache.refreshes))
        for j, r, ids, finished in lane.rows_after_step():
            if finished:
                done[j.id, r] = ids
    loop.close()
    assert len(done) == 2
    # one cache per batch, reused (same buffers) while the rows stay, refreshed at each new block
    assert caches[0][0] is caches[1][0] and caches[0][1] == caches[1][1] and caches[2][0] is not caches[1][0]
    assert caches[2][2] == 1 and max(c[2] for c in caches) > 1
    for j, gen in ((first, 16), (late, 8)):
        alone = generate(toy1, j.prompts, gen_length=gen, mode="exact", temperature=0.0, block_length=4)
        assert done[j.id, 0] == alone.tokens[0]
