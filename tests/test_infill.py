"""Infilling: prompt, a masked span, suffix. The library (`generate(..., suffixes=)`), the serving lane, the
OpenAI `suffix` field on a real Serve app on 127.0.0.1 and the Ray Data job's `suffix` column.

The Serve app is tests/test_serve.py's module fixture (`server`, `client`, and its `toy` dict, which here
stands in for conftest's `toy`); the library tests use conftest's toy backbone through `bb`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from test_decode import OracleSampler
from test_kvcache import MODES, sampler_for
from test_serve import _error, _post, client, engine, server, toy  # noqa: F401  (Serve fixtures)
from torch import nn

from ray_jobs.generate import run_generate
from ray_jobs.pipeline import read_outputs
from sampler import DEFAULT_BACKBONE, JointSampler, encode_prompts, generate, load_backbone
from sampler.backbone import Backbone, Layout
from sampler.decode import NOT_GENERATED, encode_text, pack_rows
from sampler.kvcache import BlockKVCache
from serve.generator import Lane

PROMPTS = ["The quick brown", "San", "To be, or not"]
SUFFIXES = [" over the lazy dog.", "", " that is the question."]  # row 1: no suffix, in the same batch
G = 8


@pytest.fixture(scope="module")
def bb(toy_dir) -> Backbone:
    return load_backbone(toy_dir)


def rows_of(bb: Backbone) -> tuple[list[list[int]], list[list[int]]]:
    return encode_prompts(bb, PROMPTS), [encode_text(bb, s, bos=False) for s in SUFFIXES]


class Recording(Backbone):
    """The same weights, recording the sequence every full pass sees."""

    def hidden(self, ids, attention_mask=None, ctx=None, cache=None):
        self.seen.append(ids.clone())
        return super().hidden(ids, attention_mask, ctx, cache)


def recording(bb: Backbone) -> Recording:
    layout = Layout("dream", bb.shift, bb.args, bb.mask_id, bb.eos_id, bb.bos_id, bb.pad_id)
    rec = Recording(bb.model, layout, tokenizer=bb.tokenizer, name=bb.name, identity=bb.identity)
    rec.seen = []
    return rec


def naive_infill(bb: Backbone, prompt: list[int], gen_length: int, suffix: list[int]
                 ) -> tuple[list[int], list[int]]:
    """Exact greedy decoding written out for one unpadded row [prompt, masks, suffix]: each pass, the
    lowest-entropy masked span position gets its argmax token."""
    P = len(prompt)
    x = torch.tensor([prompt + [bb.mask_id] * gen_length + suffix])
    order = []
    while (x[0, P:P + gen_length] == bb.mask_id).any():
        with torch.no_grad():
            logits = bb(x)[1][0].float()
        logits[:, bb.mask_id] = float("-inf")
        p = torch.softmax(logits, -1)
        ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
        masked = [i for i in range(P, P + gen_length) if x[0, i] == bb.mask_id]
        best = min(masked, key=lambda i: ent[i].item())
        x[0, best] = logits[best].argmax()
        order.append(best - P)
    return x[0, P:P + gen_length].tolist(), order


# --- the library ------------------------------------------------------------------------------------------


def test_pack_rows_right_aligns_prompt_span_suffix(bb):
    M, pad, B = bb.mask_id, bb.pad_id, NOT_GENERATED
    x, attn, blocks = pack_rows(bb, [[1, 5, 6], [1], [1, 7]], 4, suffixes=[[8, 9], [], [10, 11, 12]],
                                block_length=2)
    assert x.tolist() == [[1, 5, 6, M, M, M, M, 8, 9],
                          [pad, pad, pad, pad, 1, M, M, M, M],
                          [1, 7, M, M, M, M, 10, 11, 12]]
    assert attn.tolist() == [[True] * 9, [False] * 4 + [True] * 5, [True] * 9]
    assert blocks.tolist() == [[B, B, B, 0, 0, 1, 1, B, B], [B, B, B, B, B, 0, 0, 1, 1],
                               [B, B, 0, 0, 1, 1, B, B, B]]
    x, _, blocks = pack_rows(bb, [[1, 5]], 2, 6, suffixes=[[9]])  # wider: more left padding
    assert x.tolist() == [[pad, 1, 5, M, M, 9]] and blocks.tolist() == [[B, B, B, 0, 0, B]]
    with pytest.raises(ValueError, match="do not fit"):
        pack_rows(bb, [[1, 5]], 2, 4, suffixes=[[9]])


@pytest.mark.parametrize("kv_cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("name", list(MODES))
def test_suffix_stays_verbatim_and_the_span_is_decoded(bb, name, kv_cache):
    """Every mode, with and without the KV cache: every full pass sees [prompt, span, suffix] with the
    suffix as given; the span ends fully decoded, its blocks left to right; the text is the span's."""
    rec = recording(bb)
    prompts, suffixes = rows_of(bb)
    r = generate(rec, prompts, sampler=sampler_for(bb), gen_length=G, block_length=4, temperature=0.0,
                 stop_at_eos=False, kv_cache=kv_cache, suffixes=suffixes, **MODES[name])
    L = rec.seen[0].shape[1]
    assert L == max(len(p) + len(s) for p, s in zip(prompts, suffixes, strict=True)) + G
    for b, (p, s) in enumerate(zip(prompts, suffixes, strict=True)):
        end = L - len(s)
        for x in rec.seen:
            assert x[b, end:].tolist() == s and x[b, end - G - len(p): end - G].tolist() == p
        assert rec.seen[0][b, end - G: end].tolist() == [bb.mask_id] * G
        last = rec.seen[-1][b, end - G: end].tolist()  # before the last pass's tokens were written
        assert all(t in (bb.mask_id, r.tokens[b][i]) for i, t in enumerate(last))
        assert bb.mask_id not in r.tokens[b] and sorted(r.order[b]) == list(range(G))
        assert sorted(r.order[b][:4]) == [0, 1, 2, 3]  # the span's first block first
    assert r.suffix_ids == suffixes
    assert r.text == [bb.tokenizer.decode(t, skip_special_tokens=True) for t in r.tokens]


def test_exact_infilling_is_the_greedy_rule_and_sees_the_suffix(bb):
    prompts, suffixes = rows_of(bb)
    r = generate(bb, prompts, mode="exact", gen_length=G, temperature=0.0, suffixes=suffixes)
    again = generate(bb, prompts, mode="exact", gen_length=G, temperature=0.0, suffixes=suffixes, seed=99)
    assert r.tokens == again.tokens and r.order == again.order  # deterministic
    for b, (p, s) in enumerate(zip(prompts, suffixes, strict=True)):  # padded batch == one bare row
        tokens, order = naive_infill(bb, p, G, s)
        assert r.tokens[b] == tokens and r.order[b] == order
    # the last token decoded is the argmax given everything else (prompt, the rest of the span, suffix)
    b, last = 0, r.order[0][-1]
    x = torch.tensor([prompts[b] + r.tokens[b] + suffixes[b]])
    x[0, len(prompts[b]) + last] = bb.mask_id
    with torch.no_grad():
        logits = bb(x)[1][0, len(prompts[b]) + last]
    logits[bb.mask_id] = float("-inf")
    assert int(logits.argmax()) == r.tokens[b][last]
    plain = generate(bb, prompts, mode="exact", gen_length=G, temperature=0.0)
    assert plain.tokens[1] == r.tokens[1]  # no suffix: plain decoding
    assert plain.tokens[0] != r.tokens[0] and plain.tokens[2] != r.tokens[2]  # the suffix mattered


def test_joint_with_an_oracle_sampler_infills_like_exact(bb):
    """Joint decoding with the backbone itself as the sampler is exact decoding (fixed k and hybrid)."""
    prompts, suffixes = rows_of(bb)
    kw = {"gen_length": 12, "temperature": 0.0, "suffixes": suffixes}
    exact = generate(bb, prompts, mode="exact", **kw)
    for extra in ({}, {"threshold": 1.5}):
        joint = generate(bb, prompts, sampler=OracleSampler(bb), mode="joint", k=4, **extra, **kw)
        assert joint.tokens == exact.tokens and joint.order == exact.order
        assert joint.full_passes == 3 and joint.sampler_passes == 9


@pytest.mark.parametrize("name,kv_cache", [("exact", "none"), ("marginal", "none"), ("joint", "none"),
                                           ("threshold", "none"), ("joint-threshold", "none"),
                                           ("exact", "dual"), ("joint", "prefix")])
def test_batch_rows_equal_rows_alone(bb, name, kv_cache):
    """Rows with different prompt and suffix lengths (different padding, spans at different columns)
    decode in a batch as each does alone."""
    prompts, suffixes = rows_of(bb)
    kw = {"sampler": sampler_for(bb), "gen_length": G, "block_length": 4, "temperature": 0.0,
          "kv_cache": kv_cache, **MODES[name]}
    batch = generate(bb, prompts, suffixes=suffixes, **kw)
    for b, (p, s) in enumerate(zip(prompts, suffixes, strict=True)):
        alone = generate(bb, [p], suffixes=[s], **kw)
        assert batch.tokens[b] == alone.tokens[0] and batch.order[b] == alone.order[0], b


def test_eos_ends_the_span_and_the_suffix_stays(bb):
    rec = recording(bb)
    prompts, suffixes = rows_of(bb)
    old = bb.model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[bb.eos_id] = 1e4  # EOS everywhere
    bb.model.lm_head = head
    try:
        r = generate(rec, prompts, gen_length=G, stop_at_eos=True, temperature=0.0, policy="random",
                     seed=3, suffixes=suffixes)
    finally:
        bb.model.lm_head = old
    L = rec.seen[0].shape[1]
    for b, s in enumerate(suffixes):
        first = r.tokens[b].index(bb.eos_id)
        assert r.tokens[b][first:] == [bb.eos_id] * (G - first) and r.order[b][-1] == first
        assert len(r.order[b]) < G  # the positions after the EOS were filled, not decoded
        assert all(x[b, L - len(s):].tolist() == s for x in rec.seen if len(x) == len(prompts))
    # a pass over the rows still decoding (finished rows cost nothing) sees each row's suffix too
    tails = [tuple(s) for s in suffixes]
    assert any(len(x) < len(prompts) for x in rec.seen)
    assert all(any(tuple(row[L - len(t):].tolist()) == t for t in tails) for x in rec.seen for row in x)
    assert r.text == ["", "", ""]


def test_kv_cache_plan_with_a_suffix(bb):
    """The cache computes the current block (dual) or the block and everything after it, suffix included
    (prefix), per row, whatever the row's padding and suffix."""
    prompts, suffixes = rows_of(bb)
    x, _, block_id = pack_rows(bb, prompts, G, suffixes=suffixes, block_length=4)
    L = x.shape[1]
    masked = (x == bb.mask_id) & (block_id < NOT_GENERATED)
    for kind in ("prefix", "dual"):
        cache = BlockKVCache.for_backbone(bb, len(prompts), L, kind)
        cache.plan(masked, block_id)
        for b, s in enumerate(suffixes):
            start = L - len(s) - G  # the first block: [start, start + 4); Dream's shift adds start - 1
            want = list(range(start - 1, start + 4 if kind == "dual" else L))
            assert sorted(set(cache.cols[b].tolist())) == want, (kind, b)


def test_text_infilling_with_the_embedded_backbone():
    """Real text: "Name a city:" + one masked token + " Kong" is "Hong", in every mode."""
    real = load_backbone()
    sampler = JointSampler.load(Path(DEFAULT_BACKBONE).parent / "sampler", real)
    names = {" Francisco": " San", " Kong": " Hong", " Town": " Cape", " Aires": " Buenos"}
    prompts = encode_prompts(real, ["Name a city:"] * len(names))
    suffixes = [encode_text(real, s, bos=False) for s in names]
    assert all(s and s[0] != real.bos_id for s in suffixes)  # no BOS in a suffix
    for fields in ({"mode": "exact"}, {"mode": "marginal", "k": 2}, {"mode": "joint", "k": 2},
                   {"mode": "marginal", "k": 2, "threshold": 0.9, "kv_cache": "dual"}):
        r = generate(real, prompts, sampler=sampler, gen_length=1, temperature=0.0, suffixes=suffixes,
                     **fields)
        assert r.text == list(names.values()), fields


def test_bad_suffixes_are_refused(bb):
    p = encode_prompts(bb, ["Hi", "Ho"])
    for suffixes, msg in (([[5]], "suffixes has 1 rows for 2 prompts"),
                          ([[5], [10 ** 6]], "suffix 1 has token ids outside"),
                          ([[bb.mask_id], []], "suffix 0 contains the mask token"),
                          ([[5] * bb.args.max_seq_len, []], "prompt and suffix of .* exceeds the context")):
        with pytest.raises(ValueError, match=msg):
            generate(bb, p, gen_length=4, suffixes=suffixes)


# --- the serving lane (in-process) ------------------------------------------------------------------------


def test_lane_packs_suffixes_and_rows_equal_rows_alone(engine, toy):  # noqa: F811
    """A lane holds jobs of different prompt, span and suffix lengths (one joining mid-decode): each row's
    suffix sits right after its span, and each answer equals the library's alone."""
    loop = asyncio.new_event_loop()
    decoding = {"mode": "exact", "temperature": 0.0, "block_length": 4, "stop_at_eos": False}

    def job(prompt: str, suffix: str | None, max_tokens: int):
        return engine.prepare({"kind": "completion", "prompt": prompt, "suffix": suffix, "stream": False,
                               "decoding": {**decoding, "max_tokens": max_tokens}}, loop)

    jobs = [job("The quick brown fox", " over the lazy dog.", 12), job("San", None, 8),
            job("To be", " that is the question.", 6)]
    lane = Lane(engine, jobs[0].settings, seed=0)
    lane.admit(jobs[0])
    lane.admit(jobs[1])
    for i, j in enumerate(jobs[:2]):
        L, S = lane.x.shape[1], len(j.suffix)
        assert lane.x[i, L - S:].tolist() == j.suffix
        assert lane.x[i, L - S - j.gen_length: L - S].tolist() == [engine.backbone.mask_id] * j.gen_length
    done = {}
    for step in range(40):
        if step == 2:
            lane.admit(jobs[2])
        if not lane.n_rows():
            break
        lane.step()
        for j, _, ids, finished in lane.rows_after_step():
            if finished:
                done[j.id] = ids
    loop.close()
    assert len(done) == 3
    for j in jobs:
        alone = generate(toy["bb"], j.prompts, gen_length=j.gen_length, suffixes=[j.suffix], **decoding)
        assert done[j.id] == alone.tokens[0]


# --- the OpenAI API on a real Serve app ---------------------------------------------------------------------


def _library(toy, mode: str, k: int, suffix: str, **kw) -> str:  # noqa: F811
    b = toy["bb"]
    return generate(b, encode_prompts(b, ["The quick brown"]), sampler=JointSampler.load(toy["sampler"], b),
                    mode=mode, k=k, gen_length=10, temperature=0.0, stop_at_eos=True,
                    suffixes=[encode_text(b, suffix, bos=False)], **kw).text[0]


@pytest.mark.ray
@pytest.mark.parametrize("mode,k,extra", [("exact", 1, {}), ("marginal", 3, {}), ("joint", 4, {}),
                                          ("joint", 4, {"threshold": 0.3, "kv_cache": "dual"}),
                                          ("marginal", 2, {"kv_cache": "prefix"})])
def test_api_suffix_infills_in_every_mode(server, client, toy, mode, k, extra):  # noqa: F811
    suffix = " over the lazy dog."
    kw = {"model": server["model"], "prompt": "The quick brown", "suffix": suffix, "max_tokens": 10,
          "temperature": 0, "seed": 5,  # seeded: a lane of its own, so the KV cache matches the library
          "extra_body": {"mode": mode, "k": k, "stop_at_eos": True, "block_length": 5, **extra}}
    r = client.completions.create(**kw)
    want = _library(toy, mode, k, suffix, block_length=5, **extra)
    assert r.choices[0].text == want and r.model_extra["jointgen"]["mode"] == mode
    assert want != _library(toy, mode, k, "", block_length=5, **extra)  # the suffix changed the span
    chunks = list(client.completions.create(**kw, stream=True))
    deltas = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(deltas) == want and len(deltas) >= 2  # streamed the same way, span only


@pytest.mark.ray
def test_api_suffix_stop_strings_and_context(server, client, toy):  # noqa: F811
    kw = {"model": server["model"], "prompt": "The quick brown", "suffix": " over the lazy dog.",
          "max_tokens": 10, "temperature": 0, "extra_body": {"mode": "exact", "stop_at_eos": True}}
    text = client.completions.create(**kw).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip()
    c = client.completions.create(**kw, stop=[stop])
    assert c.choices[0].text == text[: text.find(stop)] and c.choices[0].finish_reason == "stop"
    resp = _post(server, "/v1/completions", {"prompt": "x", "suffix": "the " * 600, "max_tokens": 8})
    err = _error(resp)
    assert resp.status_code == 400 and err["param"] == "suffix" and "context" in err["message"]


# --- the Ray Data generation job ---------------------------------------------------------------------------


@pytest.mark.ray
def test_generate_job_infills_the_suffix_column(toy, ray_cluster, tmp_path):  # noqa: F811
    lines = [{"id": "a", "prompt": "The quick brown", "suffix": " over the lazy dog."},
             {"id": "b", "prompt": "San"},
             {"id": "c", "prompt": "To be", "suffix": " that is the question.", "task": "x"},
             {"id": "d", "prompt": "Hi", "suffix": 3},
             {"id": "e", "messages": [{"role": "user", "content": "hi"}], "suffix": "!"}]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    res = run_generate({"backbone": toy["backbone"], "sampler": toy["sampler"], "prompts": str(src),
                        "out": str(tmp_path / "o"), "mode": "joint", "k": 2, "gen_length": 8,
                        "temperature": 0.0, "stop_at_eos": False, "progress": False})
    assert [(e["row"], e["prompt_id"]) for e in res["errors"]] == [(3, "d"), (4, "e")]
    assert "'suffix' must be a string" in res["errors"][0]["error"]
    assert "not with 'messages'" in res["errors"][1]["error"]
    rows = read_outputs(tmp_path / "o").to_pylist()
    assert [(r["prompt_id"], r["suffix"]) for r in rows] == [
        ("a", " over the lazy dog."), ("b", None), ("c", " that is the question.")]
    assert json.loads(rows[2]["meta"]) == {"task": "x"}  # the suffix has its own column, not meta
    assert "suffix" in pq.read_schema(next((tmp_path / "o").glob("part-*.parquet"))).names
    b = toy["bb"]
    again = generate(b, [r["prompt_ids"] for r in rows], sampler=JointSampler.load(toy["sampler"], b),
                     mode="joint", k=2, gen_length=8, temperature=0.0, seed=rows[0]["seed"],
                     suffixes=[encode_text(b, r["suffix"] or "", bos=False) for r in rows])
    assert again.tokens == [r["tokens"] for r in rows] and again.text == [r["text"] for r in rows]
    assert all(len(r["tokens"]) == 8 and sorted(r["order"]) == list(range(8)) for r in rows)
