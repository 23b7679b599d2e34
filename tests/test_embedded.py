"""The embedded default backbone and judge shipped in the repository, the corpus and the pretraining
script. Everything here runs offline from files in the repository."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from ray_jobs.common import load_prompts
from sampler.backbone import DEFAULT_BACKBONE, DEFAULT_JUDGE, load_backbone
from sampler.embedded.acceptance import (
    LANGUAGE_PROMPTS,
    PROMPT_SEED,
    TASK_GEN_LENGTH,
    TASK_PROMPTS,
    answer_texts,
)
from sampler.embedded.tasks import TASKS, make_task_examples, validate


@pytest.fixture(scope="module")
def bb():
    return load_backbone()


@pytest.fixture(scope="module")
def judge():
    return load_backbone(DEFAULT_JUDGE, require_mask=False)


def test_shipped_files_are_small_and_complete():
    for d, limit in ((DEFAULT_BACKBONE, 25e6), (DEFAULT_JUDGE, 25e6)):
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).is_file(), d / f
        assert sum(p.stat().st_size for p in d.iterdir()) < limit


def test_backbone_config(bb):
    cfg = json.loads((DEFAULT_BACKBONE / "config.json").read_text())
    assert cfg["model_type"] == "Dream" and cfg["architectures"] == ["DreamModel"]
    assert cfg["torch_dtype"] == "bfloat16"
    assert bb.layout == "dream" and bb.shift == 1  # the default path exercises the shifted logits
    assert not bb.args.causal and bb.args.qkv_bias
    assert bb.args.head_dim == 64
    assert bb.dtype == torch.bfloat16
    tok = bb.tokenizer
    assert bb.args.vocab_size == len(tok)
    assert bb.mask_id == tok.mask_token_id == cfg["mask_token_id"]
    assert bb.bos_id == tok.bos_token_id and bb.eos_id == tok.eos_token_id and bb.pad_id == tok.pad_token_id
    assert len({bb.mask_id, bb.bos_id, bb.eos_id, bb.pad_id}) == 4
    assert cfg["embedded_pretrain"]["step"] > 0


def test_tokenizer_prepends_bos_and_chat_matches_raw(bb):
    tok = bb.tokenizer
    ids = tok("Name a city:")["input_ids"]
    assert ids[0] == bb.bos_id and ids.count(bb.bos_id) == 1
    chat = tok.apply_chat_template([{"role": "user", "content": "Name a city:"}],
                                   add_generation_prompt=True, tokenize=True)
    chat = list(chat["input_ids"] if hasattr(chat, "keys") else chat)  # BatchEncoding or list
    assert chat == ids
    assert tok.decode(ids, skip_special_tokens=True) == "Name a city:"


def test_judge_config_and_shared_vocabulary(bb, judge):
    cfg = json.loads((DEFAULT_JUDGE / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert "mask_token_id" not in cfg
    assert judge.layout == "qwen2" and judge.args.causal and judge.args.head_dim == 64  # vLLM needs 64
    assert judge.args.vocab_size == bb.args.vocab_size
    text = "The older I grow, the more I distrust the familiar doctrine."
    assert judge.tokenizer(text)["input_ids"] == bb.tokenizer(text)["input_ids"]


def test_judge_matches_transformers_qwen2(judge):
    """The judge is a standard Qwen2 causal LM: transformers computes the same next-token logits."""
    from transformers import Qwen2ForCausalLM

    ref = Qwen2ForCausalLM.from_pretrained(str(DEFAULT_JUDGE), dtype=torch.float32).eval()
    ours = load_backbone(DEFAULT_JUDGE, dtype=torch.float32, require_mask=False)
    ids = torch.tensor([judge.tokenizer("A journey of a thousand miles begins")["input_ids"]])
    with torch.no_grad():
        want = ref(ids).logits
        h = ours.hidden(ids)
        got = ours.lm_head(h)  # causal: row p predicts p+1, as in transformers
    assert torch.allclose(got, want, atol=2e-3, rtol=1e-3), (got - want).abs().max()


def test_judge_prefers_real_text(judge):
    """NLL of held-out fortunes is far below that of the same tokens shuffled."""
    recs = load_prompts(LANGUAGE_PROMPTS, "reference")[0][:16]
    rng = random.Random(0)
    real, shuf = [], []
    for r in recs:
        ids = judge.tokenizer(r)["input_ids"][:48]
        perm = ids[1:]
        rng.shuffle(perm)
        for seq, out in ((ids, real), ([ids[0]] + perm, shuf)):
            x = torch.tensor([seq])
            with torch.no_grad():
                logits = judge.logits(judge.hidden(x)).float()
            out.append(F.cross_entropy(logits[0, 1:], x[0, 1:]).item())
    assert sum(real) / len(real) + 1.0 < sum(shuf) / len(shuf)


def test_exact_decoding_runs(bb):
    from sampler.decode import generate

    prompts = [bb.tokenizer(p)["input_ids"] for p in ("Name a city:", "The meaning of life")]
    r = generate(bb, prompts, mode="exact", gen_length=6, seed=0)
    assert r.full_passes == 6
    assert all(len(t) == 6 and bb.mask_id not in t for t in r.tokens)
    assert all(sorted(o) == list(range(6)) for o in r.order)


def test_exact_decoding_answers_tasks(bb):
    """A small, seeded version of the acceptance check: exact decoding answers the tasks."""
    from sampler.decode import generate

    examples = make_task_examples(30, seed=PROMPT_SEED)  # the first 30 of the prompt file
    prompts = [bb.tokenizer(ex["prompt"])["input_ids"] for ex in examples]
    r = generate(bb, prompts, mode="exact", gen_length=TASK_GEN_LENGTH, seed=0)
    answers = answer_texts(bb, r.tokens)
    ok = [validate(ex, a) for ex, a in zip(examples, answers, strict=True)]
    assert sum(ok) >= 0.8 * len(ok), list(zip(answers, ok, strict=True))


def test_prompt_files():
    """The shipped files are what `jointgen pretrain prompts` writes, and what the jobs' reader reads."""
    lang, _ = load_prompts(LANGUAGE_PROMPTS, "prompt")
    refs, _ = load_prompts(LANGUAGE_PROMPTS, "reference")
    assert len(lang) >= 100 and all(p and r.startswith(p) for p, r in zip(lang, refs, strict=True))
    texts, ids = load_prompts(TASK_PROMPTS, "prompt")
    tasks = [json.loads(line) for line in TASK_PROMPTS.read_text().splitlines()]
    examples = make_task_examples(len(tasks), seed=PROMPT_SEED)
    assert tasks == [{"id": f"task-{i:04d}", **ex} for i, ex in enumerate(examples)]
    assert texts == [t["prompt"] for t in tasks] and ids == [t["id"] for t in tasks]
    assert {r["task"] for r in tasks} == set(TASKS)
    rng = random.Random(0)
    for ex in tasks:
        assert validate(ex, TASKS[ex["task"]].reference_answer(ex, rng))


def test_acceptance_check_through_jointgen_pretrain(tmp_path):
    """`jointgen pretrain check`, small: both modes, validity per task, judge NLL of language samples."""
    from sampler.embedded.pretrain import main

    out = tmp_path / "check.json"
    main(["check", "--n-task", "6", "--n-lang", "4", "--batch", "6", "--show", "3", "--threads", "1",
          "--out", str(out)])
    rep = json.loads(out.read_text())
    assert set(rep["tasks"]) == set(rep["language"]) == {"exact_k1", "marginal_k4"}
    examples = make_task_examples(3, seed=1)  # the check's --seed
    for v in rep["tasks"].values():
        assert v["all"]["n"] == 6 and all(v[t]["n"] == 2 for t in TASKS)
        assert [(s["prompt"], s["valid"]) for s in v["samples"]] == [
            (ex["prompt"], validate(ex, s["answer"])) for ex, s in zip(examples, v["samples"], strict=True)]
    assert rep["tasks"]["exact_k1"]["all"]["mean"] >= 0.5
    for v in rep["language"].values():
        assert v["judge_nll_per_token"]["n"] == 4 and 0 < v["judge_nll_per_token"]["mean"] < 20


# ---------------------------------------------------------------------------------------------
# corpus and pretraining script (no fortunes package needed: a fake corpus)
# ---------------------------------------------------------------------------------------------


def test_corpus_reader(tmp_path):
    from sampler.embedded.corpus import load_corpus, normalise, read_records, split_of

    assert normalise("  Hello,\n\tw_\x08orld  ") == "Hello, world"
    (tmp_path / "wisdom").write_text("First   record here,\nwith two lines.\n%\n"
                                     "First record here, with two lines.\n%\nshort\n%\n"
                                     "(  /\\__/\\  ) |||| ==== ---- ____ ###\n%\nA second real record.\n")
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x01")
    (tmp_path / "ascii-art").write_text("Pictures are not prose at all really.\n")
    recs = read_records(tmp_path)
    assert recs == ["First record here, with two lines.", "A second real record."]
    splits = load_corpus(tmp_path)
    assert sorted(splits["train"] + splits["val"]) == sorted(recs)
    assert split_of("abc") == split_of("abc")
    share = sum(split_of(f"record {i}") == "val" for i in range(4000)) / 4000
    assert 0.03 < share < 0.07


FAKE = [f"Record number {i} says that the {w} is {c}." for i in range(60)
        for w, c in [("cat", "black"), ("sky", "blue")]]


@pytest.fixture()
def fake_corpus(monkeypatch):
    import sampler.embedded.pretrain as pt

    monkeypatch.setattr(pt, "load_corpus", lambda: {"train": FAKE[:100], "val": FAKE[100:]})
    return pt


def test_pretrain_smoke_export_and_resume(tmp_path, fake_corpus):
    pt = fake_corpus
    common = ["--run-dir", str(tmp_path / "run"), "--vocab", "700", "--task-len", "64", "--dim", "64",
              "--layers", "1", "--heads", "1", "--kv-heads", "1", "--ffn", "96", "--batch", "4",
              "--task-batch", "4",
              "--eval-every", "2", "--threads", "1"]
    pt.main(["backbone", *common, "--export-dir", str(tmp_path / "bb"), "--total-steps", "3"])
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["final"] and log[-1]["step"] == 3 and "val_task_masked_ce" in log[-1]
    b = load_backbone(tmp_path / "bb")
    assert b.layout == "dream" and json.loads((tmp_path / "bb" / "config.json").read_text())[
        "embedded_pretrain"]["step"] == 3
    pt.main(["backbone", *common, "--export-dir", str(tmp_path / "bb"), "--total-steps", "5"])
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 5  # resumed from 3, not restarted
    pt.main(["judge", *common[2:], "--run-dir", str(tmp_path / "jrun"), "--export-dir", str(tmp_path / "j"),
             "--tokenizer-dir", str(tmp_path / "run" / "tokenizer"), "--total-steps", "2"])
    j = load_backbone(tmp_path / "j", require_mask=False)
    assert j.layout == "qwen2" and j.args.causal and j.args.vocab_size == b.args.vocab_size


def test_masked_loss_reads_the_shifted_row(tmp_path, fake_corpus):
    """The training loss at masked position p equals the CE of `Backbone.logits(h, p)`: the objective
    and the decoder agree on Dream's shift (hidden at p-1 predicts token p)."""
    pt = fake_corpus
    from sampler.backbone import save_backbone
    from sampler.model import ModelArgs, Transformer

    torch.manual_seed(0)
    a = ModelArgs(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=64)
    m = Transformer(a)
    save_backbone(m, tmp_path / "m", mask_id=49, bos_id=1, eos_id=2, pad_id=0, dtype=torch.float32)
    b = load_backbone(tmp_path / "m")
    ids = torch.randint(3, 49, (2, 10))
    ids[:, 0] = 1
    g = torch.Generator().manual_seed(0)
    # t = 1: every position but BOS is masked
    loss, _ = pt.masked_diffusion_loss(m, ids, torch.ones_like(ids, dtype=torch.bool), 49, g, 1e-3,
                                       t=torch.ones(2))
    x = ids.clone()
    x[:, 1:] = 49
    pos = torch.arange(1, 10).expand(2, -1)
    want = F.cross_entropy(b.logits(b.hidden(x), pos).reshape(-1, 50), ids[:, 1:].reshape(-1))
    assert torch.allclose(loss, want, atol=1e-5)
    unshifted = F.cross_entropy(b.lm_head(b.hidden(x))[:, 1:].reshape(-1, 50), ids[:, 1:].reshape(-1))
    assert not torch.allclose(loss, unshifted, atol=1e-3)
