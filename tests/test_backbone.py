"""The backbone adapter against independent references (transformers' own Qwen2 and Llama)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sampler.backbone import CheckpointError, load_backbone
from sampler.model import positions_from_mask

IDS = torch.tensor([[5, 17, 3, 44, 9, 12, 60, 2, 7, 31], [8, 8, 21, 40, 11, 19, 6, 50, 3, 1]])
LEFT_PAD = torch.tensor([[1] * 10, [0, 0, 0] + [1] * 7])


def _reference(model, ids, mask, shift: bool) -> torch.Tensor:
    pos = None if mask is None else positions_from_mask(mask)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    return torch.cat([ref[:, :1], ref[:, :-1]], 1) if shift else ref


def _assert_close(ours, ref, mask):
    valid = torch.ones(ours.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    assert (ours - ref)[valid].abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, is_causal=False,
                      max_position_embeddings=128, rope_theta=10000.0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random biases: the default init leaves them at zero, which tests nothing
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("dream")
    model.save_pretrained(path)
    conf = json.loads((path / "config.json").read_text())
    conf.update(model_type="Dream", architectures=["DreamModel"], mask_token_id=96)
    (path / "config.json").write_text(json.dumps(conf))
    return path, model


@pytest.mark.parametrize("mask", [None, LEFT_PAD], ids=["no-padding", "left-padding"])
def test_dream_layout_matches_transformers_qwen2_shifted(dream_dir, mask):
    path, ref_model = dream_dir
    bb = load_backbone(path, dtype=torch.float32)
    assert bb.shift == 1 and bb.mask_id == 96 and bb.layout == "dream"
    _, ours = bb(IDS, mask)
    _assert_close(ours, _reference(ref_model, IDS, mask, shift=True), mask)
    # logits at requested positions equal the full computation
    h = bb.hidden(IDS, mask)
    pos = torch.tensor([[1, 4, 9], [5, 6, 8]])
    full = bb.logits(h)
    assert torch.allclose(bb.logits(h, pos), torch.gather(full, 1, pos[..., None].expand(-1, -1, 97)),
                          atol=1e-6)


LLADA_CONFIG = {  # keys as in GSAI-ML/LLaDA-8B-Base's config.json, sizes shrunk
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 64,
    "embedding_dropout": 0.0, "embedding_size": 128, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
    "mlp_hidden_size": 96, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
    "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "pad_token_id": 126081, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "use_cache": False, "vocab_size": 128,
    "weight_tying": False,
}
LLAMA_TO_LLADA = {
    "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "attn_out", "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj",
    "mlp.down_proj": "ff_out", "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm",
}


def _llada_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "model.transformer.wte.weight"
    if name == "model.norm.weight":
        return "model.transformer.ln_f.weight"
    if name == "lm_head.weight":
        return "model.transformer.ff_out.weight"
    _, _, i, rest = name.split(".", 3)
    mod, leaf = rest.rsplit(".", 1)
    return f"model.transformer.blocks.{i}.{LLAMA_TO_LLADA[mod]}.{leaf}"


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
                      rope_theta=500000.0, is_causal=False, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)  # non-trivial norm weights, so a swapped norm would show
    path = tmp_path_factory.mktemp("llada")
    sd = {_llada_name(n): p.detach().clone().contiguous() for n, p in model.state_dict().items()}
    half = len(sd) // 2  # sharded with an index, as the 8B checkpoint is
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(path / fname))
        weight_map.update({k: fname for k in keys})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(LLADA_CONFIG))
    return path, model


@pytest.mark.parametrize("mask", [None, LEFT_PAD], ids=["no-padding", "left-padding"])
def test_llada_layout_matches_bidirectional_llama(llada_dir, mask):
    path, ref_model = llada_dir
    bb = load_backbone(path, dtype=torch.float32)
    assert bb.shift == 0 and bb.mask_id == 126336 and bb.layout == "llada" and bb.eos_id == 126081
    _, ours = bb(IDS, mask)
    _assert_close(ours, _reference(ref_model, IDS, mask, shift=False), mask)


def test_identity_changes_with_weights(dream_dir, tmp_path):
    import shutil

    path, _ = dream_dir
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    assert load_backbone(copy).identity == load_backbone(path).identity
    from safetensors.torch import load_file

    sd = load_file(str(copy / "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"] + 1
    save_file(sd, str(copy / "model.safetensors"))
    assert load_backbone(copy).identity != load_backbone(path).identity


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_errors_name_the_problem(dream_dir, llada_dir, tmp_path):
    path, _ = dream_dir
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(tmp_path / "nowhere")
    d = _copy(path, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_backbone(d)
    d = _copy(path, tmp_path / "noconfig")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_backbone(d)
    d = _copy(path, tmp_path / "unknown")
    conf = json.loads((d / "config.json").read_text())
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (d / "config.json").write_text(json.dumps(conf | gpt2))
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load_backbone(d)
    d = _copy(path, tmp_path / "nomask")
    conf.pop("mask_token_id")
    (d / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="no mask_token_id"):
        load_backbone(d)
    d = _copy(path, tmp_path / "shape")
    conf = json.loads((path / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(conf | {"intermediate_size": 128}))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'model.layers.0.mlp.gate_proj.weight'"):
        load_backbone(d)
    lpath, _ = llada_dir
    d = _copy(lpath, tmp_path / "missing_shard")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_backbone(d)
    d = _copy(lpath, tmp_path / "missing_param")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    from safetensors.torch import load_file

    f = d / "model-00001-of-00002.safetensors"
    sd = load_file(str(f))
    gone = sorted(sd)[0]
    sd.pop(gone)
    save_file(sd, str(f))
    idx["weight_map"].pop(gone)
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=f"missing parameter '{gone}'"):
        load_backbone(d)


def test_toy_backbone_loads_with_tokenizer(toy):
    assert toy.tokenizer is not None and toy.mask_id == toy.tokenizer.mask_token_id
    assert toy.bos_id == toy.tokenizer.bos_token_id and toy.eos_id == toy.tokenizer.eos_token_id
    ids = toy.tokenizer("San Diego")["input_ids"]
    assert toy.tokenizer.decode(ids) == "San Diego"


def test_tied_embeddings_round_trip(tmp_path):
    from sampler.backbone import save_backbone
    from sampler.model import ModelArgs, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=2,
                                  intermediate_size=64, tie_embeddings=True))
    save_backbone(model, tmp_path, layout="dream", mask_id=49, bos_id=0, eos_id=1, pad_id=2,
                  dtype=torch.float32)
    bb = load_backbone(tmp_path)
    assert bb.model.lm_head.weight is bb.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.allclose(bb(IDS[:, :5] % 49)[1], torch.cat(
            [model.lm_head(model(IDS[:, :5] % 49))[:, :1], model.lm_head(model(IDS[:, :5] % 49))[:, :-1]], 1))
