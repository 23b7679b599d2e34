"""lm-evaluation-harness on the embedded backbone and the repo's task (integrations/lm_eval_tasks: held-out
task prompts, scored valid or not by their checker): the `jointgen` model through `simple_evaluate` and
through `jointgen lm-eval` (lm-eval's own CLI), and lm-eval's stock `local-completions` model against a real
Serve application on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from integrations.lm_eval import LOGLIKELIHOOD_REFUSED, JointGenLM
from sampler.backbone import DEFAULT_BACKBONE, load_tokenizer
from sampler.embedded.tasks import validate

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = ROOT / "integrations" / "lm_eval_tasks"
TASK = "jointgen_tasks"
LIMIT = 20
# Measured on these 20 held-out prompts (seeded, deterministic): exact 0.95, joint k=4 0.6, marginal k=4 0.5;
# exact through the served API at temperature 0 (what local-completions sends): 1.0.
EXACT_FLOOR = 0.85
JOINT_FLOOR = 0.3


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)  # not lm-eval's thousands


def _evaluate(task_manager, model, model_args, **kw) -> dict:
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], limit=LIMIT,
                                   task_manager=task_manager, bootstrap_iters=0, log_samples=True, **kw)


def _valid(out: dict) -> float:
    return out["results"][TASK]["valid,none"]


def _checked_by_the_task(out: dict) -> float:
    """Validity recomputed from the logged samples with the task's own checker."""
    samples = out["samples"][TASK]
    assert len(samples) == LIMIT
    return sum(validate(s["doc"], s["resps"][0][0]) for s in samples) / len(samples)


def test_exact_mode_through_simple_evaluate(task_manager):
    out = _evaluate(task_manager, "jointgen", "mode=exact,batch_size=8")
    assert out["config"]["model_args"] == "mode=exact,batch_size=8"
    assert _valid(out) >= EXACT_FLOOR
    assert _valid(out) == pytest.approx(_checked_by_the_task(out))
    # answers end at EOS or at the task's stop string
    assert all("\n" not in s["resps"][0][0] for s in out["samples"][TASK])

    # with the chat template (the embedded one is BOS + the message): the same tokens, the same answers
    chat = _evaluate(task_manager, "jointgen", "mode=exact,batch_size=8", apply_chat_template=True)
    bos = load_tokenizer(DEFAULT_BACKBONE).bos_token
    assert [s["arguments"][0][0] for s in chat["samples"][TASK]] == \
        [bos + s["doc"]["prompt"] for s in out["samples"][TASK]]
    assert [s["resps"] for s in chat["samples"][TASK]] == [s["resps"] for s in out["samples"][TASK]]


def test_joint_mode_through_the_jointgen_command(tmp_path):
    cmd = [sys.executable, "-m", "ray_jobs.cli", "lm-eval", "--model", "jointgen",
           "--model_args", "mode=joint,k=4,batch_size=20", "--include_path", str(TASKS_DIR), "--tasks", TASK,
           "--limit", str(LIMIT), "--output_path", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    [results] = list(tmp_path.rglob("results_*.json"))
    out = json.loads(results.read_text())
    assert out["config"]["model"] == "jointgen"
    assert out["n-samples"][TASK]["effective"] == LIMIT
    assert out["results"][TASK]["valid,none"] >= JOINT_FLOOR


def test_bad_model_args_name_the_field():
    bad = {"mode=joint,k=0": "k", "mode=exact,threshold=0.9": "threshold", "mode=fast": "mode",
           "kv_cache=full": "kv_cache", "temprature=0.5": "temprature", "dtype=float8": "dtype",
           "mode=joint,sampler=none": "sampler"}
    for args, field in bad.items():
        with pytest.raises(ValueError, match=field):
            JointGenLM.create_from_arg_string(args)


@pytest.fixture(scope="module")
def greedy():
    return JointGenLM.create_from_arg_string("mode=exact,temperature=0")  # argmax: the same answer per row


def test_until_stops_and_max_gen_toks_are_honoured(greedy, caplog):
    prompt = "Name four different colors:"
    reqs = [Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 16}), 0),
            Instance("generate_until", {}, (prompt, {"until": [","], "max_gen_toks": 16, "temperature": 0.7,
                                                     "do_sample": True}), 1),
            Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 1}), 2)]
    free, cut, short = greedy.generate_until(reqs)
    assert free.count(",") == 3, free  # four colours
    assert cut == free.split(",")[0]  # the same decoding, cut at the stop string
    assert len(greedy.backbone.tokenizer(short, add_special_tokens=False)["input_ids"]) == 1, short
    assert "ignoring the task's generation keys ['do_sample', 'temperature']" in caplog.text


def test_loglikelihood_is_refused(greedy):
    lm = greedy
    ll = Instance("loglikelihood", {}, ("Name a city:", " Cape Town"), 0)
    with pytest.raises(NotImplementedError, match="no cheap exact likelihood") as e:
        lm.loglikelihood([ll])
    assert str(e.value) == LOGLIKELIHOOD_REFUSED
    with pytest.raises(NotImplementedError, match="no cheap exact likelihood"):
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("Cape Town",), 0)])


# --- the stock local-completions model against `jointgen serve` ------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """The Serve application of `jointgen serve` (serve/config.yaml) on the embedded backbone and its
    shipped sampler, one replica of each deployment."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from serve.app import build, load_config

    args, _, _ = load_config(ROOT / "serve" / "config.yaml")
    options = {name: {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.25}}
               for name in ("Ingress", "Generator")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(args, options), name="jointgen", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_local_completions_against_serve(server, task_manager):
    import httpx

    model = httpx.get(server + "/v1/models", timeout=30).json()["data"][0]["id"]
    # text prompts (the embedded tokenizer is not on the hub), bounded requests; `mode` goes through
    # gen_kwargs into the request body as the API's extension field
    model_args = {"base_url": server + "/v1/completions", "model": model, "tokenized_requests": False,
                  "tokenizer_backend": None, "num_concurrent": 4, "max_retries": 1, "timeout": 60}
    out = _evaluate(task_manager, "local-completions", model_args, gen_kwargs="mode=exact")
    assert _valid(out) >= EXACT_FLOOR
    assert _valid(out) == pytest.approx(_checked_by_the_task(out))
