"""The Serve application against a real local Ray cluster and real HTTP on 127.0.0.1.

One Serve instance for the whole module (started once, shut down at the end): the toy backbone and a saved
untrained sampler. Order matters only for the last tests: the replica-kill test and the autoscaling test
change the generator's replicas, so they run after the request tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from sampler import JointSampler, encode_prompts, generate, load_backbone  # noqa: E402
from sampler.testing import make_toy_backbone  # noqa: E402
from serve.app import AppArgs, api_key_hash, build, load_config, main  # noqa: E402
from serve.generator import Engine  # noqa: E402

pytestmark = pytest.mark.ray

MAX_BODY = 64 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    bb = make_toy_backbone(root / "backbone")
    backbone = load_backbone(bb)
    JointSampler.for_backbone(backbone, seed=0).save(root / "sampler")
    return {"backbone": str(bb), "sampler": str(root / "sampler"), "model": backbone.name, "bb": backbone}


def _test_options() -> dict:
    # short autoscaling delays so 1 -> 2 -> 1 fits in a test; fractional CPUs for 2 cores
    return {
        "Ingress": {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.25}},
        "Generator": {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 32,
                      "autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                                             "target_ongoing_requests": 2, "upscale_delay_s": 1,
                                             "downscale_delay_s": 3}},
    }


def _args(toy, **extra) -> dict:
    args, _, _ = load_config(os.path.join(os.path.dirname(__file__), "..", "serve", "config.yaml"))
    args.update(backbone=toy["backbone"], sampler=toy["sampler"], max_body_bytes=MAX_BODY,
                limits={"max_tokens": 480, "max_k": 8, "max_n": 8, "max_prompt_tokens": 1024}, retries=3)
    args.update(extra)
    return args


@pytest.fixture(scope="module")
def server(toy):
    metrics_port = _free_port()
    with pytest.MonkeyPatch.context() as env:  # workers report metrics every second, not every 10 s
        env.setenv("RAY_metrics_report_interval_ms", "1000")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(_args(toy), _test_options()), name="jointgen", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "model": toy["model"], "metrics_port": metrics_port}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _post(server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server["url"] + path, content=content, timeout=60,
                      headers={"content-type": "application/json", **kw.pop("headers", {})}, **kw)


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


# --- no Ray needed: builder and CLI errors --------------------------------------------------------------


def test_builder_refuses_bad_config(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no config.json|does not exist"):
        build({"backbone": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="max_batch_size"):
        build({"backbone": str(tmp_path), "max_batch_size": 0})
    with pytest.raises(ValueError, match="unknown_arg|Extra inputs"):
        build({"unknown_arg": 1})
    monkeypatch.delenv("JOINTGEN_API_KEY", raising=False)
    with pytest.raises(ValueError, match="JOINTGEN_API_KEY"):
        api_key_hash(AppArgs(require_api_key=True))
    monkeypatch.setenv("JOINTGEN_API_KEY", "s3cret")
    assert api_key_hash(AppArgs(api_key_env="JOINTGEN_NO_SUCH_KEY")) is None  # the named variable is read
    # replicas only ever see the hash: sha256("s3cret")
    assert api_key_hash(AppArgs()) == "1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0"
    assert main(["--backbone", str(tmp_path / "missing")]) == 2


# --- the generator's engine in-process (no Ray): continuous batching against sampler.generate ---------------


def _collect(engine: Engine, prompt: str, **decoding) -> list[dict]:
    async def run():
        request = {"kind": "completion", "prompt": prompt, "decoding": decoding, "stream": False}
        return [event async for event in engine.submit(request)]

    return run()


@pytest.fixture(scope="module")
def engine(toy):
    return Engine(toy["backbone"], toy["sampler"], batch_wait_s=0.0, torch_threads=1)


@pytest.mark.parametrize("decoding", [{"mode": "exact"}, {"mode": "joint", "k": 4},
                                      {"mode": "marginal", "k": 3, "block_length": 5},
                                      {"mode": "joint", "k": 2, "stop_at_eos": True},
                                      {"mode": "joint", "k": 4, "order": "planned"},
                                      {"mode": "marginal", "k": 8, "threshold": 0.2},
                                      {"mode": "joint", "k": 4, "threshold": 0.2, "stop_at_eos": True},
                                      {"mode": "joint", "k": 4, "threshold": 0.2, "fill": "sure"}])
def test_engine_matches_sampler_generate(engine, toy, decoding):
    decoding = {"temperature": 0.0, "max_tokens": 20, "stop_at_eos": False, **decoding}
    events = asyncio.run(_collect(engine, "The quick brown", **decoding))
    assert [e["event"] for e in events] == ["accepted", "done"]
    fields = {f: v for f, v in decoding.items() if f != "max_tokens"}
    ref = generate(toy["bb"], encode_prompts(toy["bb"], ["The quick brown"]), sampler=engine.sampler,
                   gen_length=20, **fields)
    done = events[-1]
    assert done["choices"][0]["text"] == ref.text[0]
    assert done["info"]["full_passes"] == ref.full_passes
    assert done["info"]["sampler_passes"] == ref.sampler_passes
    assert done["info"]["tokens_per_pass"] == pytest.approx(ref.tokens_per_pass, abs=1e-3)


def test_engine_batches_rows_with_different_tokens_per_pass(engine, toy):
    """Threshold decoding takes a different number of tokens per pass in each row: rows of one lane
    still give what each gives alone."""
    decoding = {"mode": "marginal", "k": 8, "threshold": 0.2, "temperature": 0.0, "stop_at_eos": False}
    prompts = ["The quick brown", "San", "To be, or not to be"]

    async def run():
        return await asyncio.gather(*[_collect(engine, p, max_tokens=16, **decoding) for p in prompts])

    results = asyncio.run(run())
    rates = set()
    for events, prompt in zip(results, prompts, strict=True):
        ref = generate(toy["bb"], encode_prompts(toy["bb"], [prompt]), gen_length=16, **decoding)
        assert events[-1]["choices"][0]["text"] == ref.text[0]
        rates.add(events[-1]["info"]["tokens_per_pass"])
    assert max(r[-1]["info"]["batch_requests"] for r in results) > 1  # they did share passes
    assert len(rates) > 1


def test_engine_late_request_joins_a_running_one(engine, toy):
    greedy = {"mode": "exact", "temperature": 0.0, "stop_at_eos": False}

    async def run():
        long = asyncio.create_task(_collect(engine, "A long one", max_tokens=64, **greedy))
        while engine.stats()["running"] == 0:  # the long request is decoding
            assert not long.done(), long.result()
            await asyncio.sleep(0.005)
        short = await _collect(engine, "A short one with a longer prompt", max_tokens=6, **greedy)
        return await long, short

    long, short = asyncio.run(run())
    assert short[-1]["info"]["batch_requests"] == 2 and short[-1]["info"]["shared_passes"] == 6
    assert long[-1]["info"]["full_passes"] == 64 and long[-1]["info"]["shared_passes"] == 6
    assert short[-1]["info"]["decode_s"] < long[-1]["info"]["decode_s"]  # it did not wait for the long one
    for events, prompt, n in ((long, "A long one", 64), (short, "A short one with a longer prompt", 6)):
        ref = generate(toy["bb"], encode_prompts(toy["bb"], [prompt]), mode="exact", gen_length=n,
                       temperature=0.0)
        assert events[-1]["choices"][0]["text"] == ref.text[0]  # joining and leaving changes nothing


def test_engine_streams_the_finished_prefix(engine, toy):
    greedy = {"mode": "joint", "k": 2, "temperature": 0.0, "stop_at_eos": False, "block_length": 4,
              "max_tokens": 32}
    ref = generate(toy["bb"], encode_prompts(toy["bb"], ["To be"]), sampler=engine.sampler, mode="joint", k=2,
                   gen_length=32, temperature=0.0, block_length=4).text[0]
    stop = ref[len(ref) // 2: len(ref) // 2 + 3]

    async def run(**extra):
        request = {"kind": "completion", "prompt": "To be", "decoding": {**greedy, **extra}, "stream": True}
        return [event async for event in engine.submit(request)]

    for extra, expected in (({}, ref), ({"stop": [stop]}, ref[: ref.find(stop)])):
        events = asyncio.run(run(**extra))
        deltas = [e["text"] for e in events if e["event"] == "delta"]
        assert len(deltas) >= 2 and "".join(deltas) == expected == events[-1]["choices"][0]["text"]
        assert all(stop not in d for d in deltas) or not extra


def test_engine_usage_counts_each_prompt_once_and_stops_at_the_cut(engine, toy):
    bb, greedy = toy["bb"], {"mode": "exact", "temperature": 0.0, "stop_at_eos": False, "max_tokens": 24}
    ids = encode_prompts(bb, ["The quick brown"])[0]
    ref = generate(bb, [ids], mode="exact", temperature=0.0, gen_length=24)
    done = asyncio.run(_collect(engine, "The quick brown", n=3, **greedy))[-1]
    assert done["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 72,
                             "total_tokens": len(ids) + 72}
    text = ref.text[0]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = text[: text.find(stop)]
    # the fewest tokens whose text covers the answer, found by a plain scan
    need = next(m for m in range(25) if len(bb.tokenizer.decode(ref.tokens[0][:m], skip_special_tokens=True))
                >= len(cut))
    done = asyncio.run(_collect(engine, "The quick brown", stop=[stop], **greedy))[-1]
    assert done["choices"][0]["text"] == cut and done["choices"][0]["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == need < 24


def test_engine_token_id_and_empty_prompts(engine, toy):
    bb, greedy = toy["bb"], {"mode": "exact", "temperature": 0.0, "stop_at_eos": False, "max_tokens": 10}
    ids = encode_prompts(bb, ["To be"])[0]
    ref = generate(bb, [ids, [bb.bos_id]], mode="exact", temperature=0.0, gen_length=10).text

    async def run(prompt):
        request = {"kind": "completion", "prompt": prompt, "decoding": greedy, "stream": False}
        return [event async for event in engine.submit(request)][-1]

    # token ids are taken like text: BOS first when missing; several prompts in one list
    done = asyncio.run(run([ids[1:], ids, [], ""]))
    assert [c["text"] for c in done["choices"]] == [ref[0], ref[0], ref[1], ref[1]]
    assert done["usage"]["prompt_tokens"] == 2 * len(ids) + 2  # an empty prompt is [BOS]
    for bad, words in (([5, bb.args.vocab_size], "outside the vocabulary"), ([5, -1], "outside"),
                       ([5, bb.mask_id], "mask token")):
        err = asyncio.run(run([bad]))
        assert err["event"] == "error" and err["param"] == "prompt" and words in err["message"], err


def test_engine_health_check_fails_when_decoding_keeps_failing_or_the_loop_died(toy):
    eng = Engine(toy["backbone"], toy["sampler"], batch_wait_s=0.0, torch_threads=1, max_step_failures=2)
    joint = {"mode": "joint", "k": 2, "max_tokens": 4}
    # a sampler of another width than the backbone: every joint step fails, as on a broken device
    broken = type(eng.sampler)(dataclasses.replace(eng.backbone.args, dim=32, intermediate_size=64))

    async def run():
        eng.check_health()  # no request yet: healthy
        assert (await _collect(eng, "Hello", **joint))[-1]["event"] == "done"
        eng.check_health()
        good, eng.sampler = eng.sampler, broken
        for i in range(2):
            err = (await _collect(eng, "Hello", **joint))[-1]
            assert (err["event"], err["status"], err["code"]) == ("error", 500, "generation_failed")
            if i == 0:
                eng.check_health()  # one failure is not yet "keeps failing"
        with pytest.raises(RuntimeError, match="last 2 decoding steps failed"):
            eng.check_health()
        eng.sampler = good
        assert (await _collect(eng, "Hello", **joint))[-1]["event"] == "done"  # a good step: healthy again
        eng.check_health()
        eng._loop_task.cancel()
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="decoding loop died"):
            eng.check_health()

    asyncio.run(run())


# --- the running application ------------------------------------------------------------------------------


def test_health_and_models(server, client, toy):
    r = httpx.get(server["url"] + "/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = client.models.list()
    assert [m.id for m in models.data] == [server["model"]]
    assert models.data[0].model_extra["sampler"] == "loaded"
    assert models.data[0].model_extra["max_model_len"] == toy["bb"].args.max_seq_len == 512
    card = client.models.retrieve(server["model"])  # GET /v1/models/{id}
    assert card.id == server["model"] and card.model_extra["max_model_len"] == 512
    r = httpx.get(server["url"] + "/v1/models/no-such-model", timeout=30)
    assert r.status_code == 404
    err = _error(r)
    assert (err["param"], err["code"], err["type"]) == ("model", "model_not_found", "invalid_request_error")
    assert "no-such-model" in err["message"]


def test_completion(server, client, toy):
    r = client.completions.create(model=server["model"], prompt="The quick brown fox", max_tokens=12,
                                  extra_body={"mode": "joint", "k": 4, "stop_at_eos": False})
    assert len(r.choices) == 1 and isinstance(r.choices[0].text, str)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(encode_prompts(toy["bb"], ["The quick brown fox"])[0])
    assert r.usage.completion_tokens == 12
    info = r.model_extra["jointgen"]
    assert (info["mode"], info["k"], info["full_passes"], info["sampler_passes"]) == ("joint", 4, 3, 9)
    # exact decoding: one token per full pass; n and a list of prompts give one choice per row
    r = client.completions.create(model=server["model"], prompt=["Hello", "To be"], max_tokens=6, n=2,
                                  extra_body={"mode": "exact", "stop_at_eos": False})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.model_extra["jointgen"]["full_passes"] == 6 and r.usage.completion_tokens == 24
    # each prompt counts once in prompt_tokens, whatever n (as OpenAI and vLLM count)
    assert r.usage.prompt_tokens == sum(map(len, encode_prompts(toy["bb"], ["Hello", "To be"])))
    r = client.completions.create(model=server["model"], prompt="The quick brown fox", max_tokens=5, n=3,
                                  extra_body={"mode": "exact", "stop_at_eos": False})
    assert r.usage.prompt_tokens == len(encode_prompts(toy["bb"], ["The quick brown fox"])[0])
    assert r.usage.completion_tokens == 15 and r.usage.total_tokens == r.usage.prompt_tokens + 15


def test_token_id_and_empty_prompts(server, client, toy):
    bb, kw = toy["bb"], {"model": server["model"], "max_tokens": 8, "temperature": 0.0,
                         "extra_body": {"mode": "exact", "stop_at_eos": False}}
    ids = encode_prompts(bb, ["To be, or not"])[0]
    by_text = client.completions.create(prompt="To be, or not", **kw)
    by_ids = client.completions.create(prompt=ids[1:], **kw)  # no BOS: added as for text
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)
    several = client.completions.create(prompt=[ids, [bb.bos_id]], **kw)
    assert [c.text for c in several.choices][0] == by_text.choices[0].text
    # unconditional generation: "" and [] start from BOS alone
    for empty in ("", []):
        r = client.completions.create(prompt=empty, **kw)
        assert r.choices[0].text == several.choices[1].text and r.usage.prompt_tokens == 1
        assert r.usage.completion_tokens == 8


def test_chat_completion(server, client, toy):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three fruits"}]
    r = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=10,
                                       temperature=0.7, top_p=0.9, extra_body={"mode": "marginal", "k": 2})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    tok = toy["bb"].tokenizer
    templated = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert r.usage.prompt_tokens == len(tok(templated, add_special_tokens=False)["input_ids"])
    assert r.model_extra["jointgen"]["mode"] == "marginal"


def test_stop_sequence_and_seed(server, client):
    kw = {"model": server["model"], "prompt": "The quick", "max_tokens": 24, "seed": 123,
          "extra_body": {"mode": "joint", "k": 2, "stop_at_eos": False}}
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text  # a seeded request decodes alone: reproducible
    text = a.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if stop.strip():
        c = client.completions.create(**kw, stop=[stop])
        assert c.choices[0].text == text[: text.find(stop)] and c.choices[0].finish_reason == "stop"
        # usage counts the tokens up to the cut, streamed or not
        assert c.usage.completion_tokens < a.usage.completion_tokens == 24
        chunks = list(client.completions.create(**kw, stop=[stop], stream=True,
                                                stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == c.usage.completion_tokens


def test_streaming(server, client):
    kw = {"model": server["model"], "prompt": "To be, or not", "max_tokens": 24, "seed": 7,
          "extra_body": {"mode": "exact", "stop_at_eos": False, "block_length": 4}}
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(texts) >= 3, texts  # the finished prefix grows block by block
    assert "".join(texts) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24
    # chat streaming: a role chunk, then content deltas, then the finish reason
    chat = list(client.chat.completions.create(
        model=server["model"], messages=[{"role": "user", "content": "hi"}], max_tokens=16, stream=True,
        extra_body={"mode": "joint", "k": 2, "block_length": 4, "stop_at_eos": False}))
    assert chat[0].choices[0].delta.role == "assistant"
    assert sum(bool(c.choices[0].delta.content) for c in chat) >= 2
    assert chat[-1].choices[0].finish_reason == "length"
    # raw SSE: OpenAI's framing, ending with [DONE]
    with httpx.stream("POST", server["url"] + "/v1/completions", timeout=60,
                      json={"prompt": "Hello", "max_tokens": 8, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


BAD = [
    # (path, body, status, param, words in the message)
    ("/v1/completions", b'{"prompt": "x",', 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt", "required"),
    ("/v1/completions", {"prompt": [1, 100000]}, 400, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"prompt": [[5, 6], [-2]]}, 400, "prompt", "token id -2"),
    ("/v1/completions", {"prompt": [1, 2.5]}, 400, "prompt", "valid"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "string"),
    ("/v1/completions", {"prompt": "the " * 600, "max_tokens": 8}, 400, "prompt", "context"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens", "limit"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than"),
    ("/v1/completions", {"prompt": "x", "k": 0}, 400, "k", "greater than"),
    ("/v1/completions", {"prompt": "x", "k": 9}, 400, "k", "maximum"),
    ("/v1/completions", {"prompt": "x", "mode": "fast"}, 400, "mode", "exact"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, 400, "temperature", "less than"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "greater than"),
    ("/v1/completions", {"prompt": "x", "n": 9}, 400, "n", "limit"),
    ("/v1/completions", {"prompt": "x", "mode": "marginal", "threshold": -0.5}, 400, "threshold", "greater"),
    ("/v1/completions", {"prompt": "x", "mode": "exact", "threshold": 0.9}, 400, "threshold", "exact"),
    ("/v1/completions", {"prompt": "x", "kv_cache": "full"}, 400, "kv_cache", "prefix"),
    ("/v1/completions", {"prompt": "x", "order": "random"}, 400, "order", "planned"),
    ("/v1/completions", {"prompt": "x", "fill": "all"}, 400, "fill", "sure"),
    ("/v1/completions", {"prompt": "x", "mode": "joint", "fill": "sure"}, 400, "fill", "threshold"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "greater"),
    ("/v1/completions", {"prompt": "x", "stream": True, "k": 9}, 400, "k", "maximum"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", ""),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", ""),
]


@pytest.mark.parametrize("path,body,status,param,words", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input(server, path, body, status, param, words):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    err = _error(r)
    assert err["param"] == param
    assert words.lower() in err["message"].lower()
    if param:
        assert err["message"].startswith(param)


REFUSED = {"echo": True, "best_of": 3, "presence_penalty": 0.5, "frequency_penalty": -1.0,
           "logit_bias": {"50": 5}, "response_format": {"type": "json_object"},
           "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto", "top_k": 5,
           "min_p": 0.1, "logprobs": 2, "top_logprobs": 3, "repetition_penalty": 1.2, "no_such_field": 1}


@pytest.mark.parametrize("field", REFUSED)
def test_fields_the_server_cannot_honour_are_refused(server, field):
    """vLLM's rule: a field that would change the answer and is not implemented is a 400 naming it."""
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", chat)):
        r = _post(server, path, {**body, "max_tokens": 2, field: REFUSED[field]})
        assert r.status_code == 400, r.text
        err = _error(r)
        assert (err["param"], err["code"], err["type"]) == (field, "unsupported_parameter",
                                                            "invalid_request_error")
        assert err["message"].startswith(f"{field}: not supported")


def test_fields_with_no_effect_pass(server, client):
    body = {"prompt": "x", "max_tokens": 2, "n": 2, "user": "u1", "metadata": {"team": "a"},
            "store": False, "service_tier": "auto", "echo": False, "best_of": 2, "presence_penalty": 0,
            "frequency_penalty": 0.0, "logit_bias": {}, "logprobs": None, "top_k": -1, "tools": [],
            "tool_choice": "none"}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
    r = _post(server, "/v1/chat/completions",
              {"messages": [{"role": "user", "content": "x", "tool_calls": []}]})
    assert r.status_code == 400 and _error(r)["param"] == "messages.0.tool_calls"
    with pytest.raises(openai.BadRequestError) as e:  # the official client sees it too
        client.completions.create(model=server["model"], prompt="x", max_tokens=2, echo=True)
    assert e.value.body["param"] == "echo"


def test_errors_keep_the_server_up(server, client):
    r = httpx.get(server["url"] + "/v1/nope", timeout=30)
    assert r.status_code == 404 and _error(r)["code"] == "not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server["model"], prompt="x", extra_body={"k": 99})
    assert e.value.body["param"] == "k"
    ok = client.completions.create(model=server["model"], prompt="x", max_tokens=4)
    assert ok.usage.prompt_tokens > 0


def _complete(response: bytes) -> bool:
    head, sep, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return bool(sep) and len(body) >= int(line.split(b":")[1])
    return False


def _send_body(server, head: bytes, chunk: bytes = b"", total: int = 0,
               pause: float = 0.0) -> tuple[bytes, int]:
    """Send a request head, then `chunk` repeatedly (chunked encoding) until `total` bytes or an answer.
    A reader thread collects the answer as it arrives: the server closes the connection while the client
    is still sending, and a reset would discard an answer read only afterwards."""
    host, port = server["url"].removeprefix("http://").split(":")
    answer, sent = bytearray(), 0
    with socket.create_connection((host, int(port)), timeout=30) as s:
        def read():
            try:
                while data := s.recv(65536):
                    answer.extend(data)
            except OSError:
                pass

        reader = threading.Thread(target=read)
        reader.start()
        try:
            s.sendall(head)
            while sent < total and not answer:
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
                time.sleep(pause)  # a client on a real network: the answer can overtake the body
        except OSError:  # the server answered and closed the connection
            pass
        deadline = time.time() + 30
        while time.time() < deadline and reader.is_alive() and not _complete(bytes(answer)):
            time.sleep(0.01)
        s.shutdown(socket.SHUT_RDWR)
        reader.join(timeout=30)
    return bytes(answer), sent


def test_body_size_limit(server):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # a declared size over the limit: refused from the headers, no body sent at all
    answer, _ = _send_body(server, head + b"Content-Length: 100000000\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    # chunked, no declared size: refused while streaming, long before the 16 MiB the client would send
    # (16 KiB every 20 ms: 20 s for the whole body)
    total = 16 << 20
    answer, sent = _send_body(server, head + b"Transfer-Encoding: chunked\r\n\r\n", b"x" * 16384, total,
                              pause=0.02)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"request_too_large" in answer and sent < total // 4, sent


def test_concurrent_requests_are_batched(server, client):
    def one(i):  # different prompt and gen lengths still share full passes
        return client.completions.create(model=server["model"], prompt=f"Request number {i}" + " go" * i,
                                         max_tokens=40 + i,
                                         extra_body={"mode": "exact", "stop_at_eos": False})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    sizes = [r.model_extra["jointgen"]["batch_requests"] for r in results]
    assert max(sizes) > 1, sizes
    assert sum(r.model_extra["jointgen"]["shared_passes"] for r in results) > 0
    assert [r.usage.completion_tokens for r in results] == [40 + i for i in range(8)]
    stats = httpx.get(server["url"] + "/v1/stats", timeout=30).json()
    assert stats["max_batch_requests"] > 1 and stats["requests"] >= 8


def _metric(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of `name` whose labels include `labels` (Prometheus text format); None if none."""
    found = None
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            found = (found or 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def test_metrics_after_requests(server, client):
    """Ray's metrics agent of the local node exports the serving metrics (what Prometheus scrapes)."""
    client.completions.create(model=server["model"], prompt="metrics", max_tokens=8,
                              extra_body={"mode": "joint", "k": 2, "stop_at_eos": False})
    list(client.completions.create(model=server["model"], prompt="metrics", max_tokens=8, stream=True))
    assert _post(server, "/v1/completions", {"prompt": "x", "echo": True}).status_code == 400
    want = {  # name, labels -> the least value
        ("ray_jointgen_requests_total", (("deployment", "Ingress"), ("endpoint", "/v1/completions"),
                                         ("status", "200"))): 2,
        ("ray_jointgen_errors_total", (("endpoint", "/v1/completions"), ("status", "400"),
                                       ("code", "unsupported_parameter"))): 1,
        ("ray_jointgen_prompt_tokens_total", (("deployment", "Generator"),)): 2,
        ("ray_jointgen_completion_tokens_total", ()): 16,
        ("ray_jointgen_full_passes_total", (("mode", "joint"),)): 4,
        ("ray_jointgen_sampler_passes_total", (("mode", "joint"),)): 4,
        ("ray_jointgen_batch_rows_count", (("mode", "joint"),)): 4,
        ("ray_jointgen_queue_seconds_count", ()): 2,
        ("ray_jointgen_time_to_first_token_seconds_count", ()): 1,
        ("ray_jointgen_decode_seconds_count", ()): 2,
    }
    url = f"http://127.0.0.1:{server['metrics_port']}/metrics"
    deadline, missing = time.time() + 60, want
    while missing and time.time() < deadline:
        time.sleep(1)
        text = httpx.get(url, timeout=30).text
        missing = {k: v for k, v in want.items() if (_metric(text, k[0], **dict(k[1])) or 0) < v}
    assert not missing, missing
    assert "# TYPE ray_jointgen_queue_seconds histogram" in text


def test_replica_killed_mid_request(server, client):
    handle = serve.get_deployment_handle("Generator", app_name="jointgen")
    pid = handle.pid.remote().result(timeout_s=60)
    out: dict = {}

    def long_request():
        try:
            out["r"] = client.completions.create(model=server["model"], prompt="The quick", max_tokens=400,
                                                 n=4, extra_body={"mode": "exact", "stop_at_eos": False})
        except openai.APIStatusError as e:
            out["e"] = e

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.time() + 60
    while handle.stats.remote().result(timeout_s=30)["running"] == 0:
        assert time.time() < deadline and t.is_alive(), "the long request never started decoding"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=180)
    assert not t.is_alive()
    if "r" in out:  # retried on the replacement replica
        assert out["r"].model_extra["jointgen"]["replica_pid"] != pid
        assert out["r"].usage.completion_tokens == 1600
    else:  # or a clean OpenAI-style error
        assert out["e"].status_code == 503 and out["e"].body["code"] == "replica_unavailable"
    r = client.completions.create(model=server["model"], prompt="after", max_tokens=4)
    assert r.model_extra["jointgen"]["replica_pid"] != pid


def _running_generators() -> int:
    dep = serve.status().applications["jointgen"].deployments["Generator"]
    return dep.replica_states.get("RUNNING", 0)


def test_autoscaling_up_and_down(server):
    # bounded load: 4 clients for at most 60 s, stopped as soon as a second replica runs
    stop = threading.Event()
    deadline = time.time() + 60
    body = {"prompt": "load", "max_tokens": 64, "mode": "exact", "stop_at_eos": False}

    def client_loop():
        with httpx.Client(timeout=120) as c:
            while not stop.is_set() and time.time() < deadline:
                c.post(server["url"] + "/v1/completions", json=body)

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    peak = 1
    try:
        while time.time() < deadline and peak < 2:
            peak = max(peak, _running_generators())
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    assert peak == 2, "the generator did not scale to 2 replicas under load"
    deadline = time.time() + 90
    while time.time() < deadline and _running_generators() != 1:
        time.sleep(1)
    assert _running_generators() == 1, "the generator did not scale back to 1 replica when idle"


def test_api_key_auth(server, toy, monkeypatch):
    monkeypatch.setenv("JOINTGEN_API_KEY", "test-key-123")
    fixed = {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.1}}
    opts = {"Ingress": fixed, "Generator": fixed}
    serve.run(build(_args(toy, sampler="none"), opts), name="secure", route_prefix="/secure")
    try:
        url = server["url"] + "/secure/v1"
        r = httpx.get(url + "/models", timeout=30)
        assert r.status_code == 401 and _error(r)["code"] == "invalid_api_key"
        r = httpx.post(url + "/completions", json={"prompt": "x"}, timeout=30,
                       headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url, api_key="test-key-123", max_retries=0, timeout=60)
        assert good.models.list().data[0].model_extra["sampler"] == "none"
        r = good.completions.create(model=server["model"], prompt="Hello", max_tokens=4)
        assert r.model_extra["jointgen"]["mode"] == "exact"  # default joint needs a sampler: falls back
        with pytest.raises(openai.BadRequestError) as e:  # joint asked for, no sampler loaded
            good.completions.create(model=server["model"], prompt="Hello", extra_body={"mode": "joint"})
        assert e.value.body["param"] == "mode" and "sampler" in e.value.body["message"]
    finally:
        serve.delete("secure")
