"""Every committed config is checked against the code that reads it, so none can rot silently:
cluster.yaml against Ray's cluster-launcher schema; each job YAML under configs/ against its job's keys
and value checks; each Serve YAML against Serve's schema and our application's arguments; input paths
must exist in the repository, live on the cluster's shared storage, or be the output of the stage
before them in the same directory (teacher -> train -> generate / evaluate / serve)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from ray_jobs import evaluate, generate, quickstart, teacher, train
from ray_jobs.common import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
SHARED = "/mnt/shared"  # the shared storage cluster.yaml mounts on every node
BACKBONES = ("dream-7b-base", "dream-7b-instruct", "llada-8b-base", "embedded")
INPUTS = ("backbone", "prompts", "data", "sampler", "judge", "tasks", "language_prompts",
          "hf_features_model", "train_summary")


def job_of(path: Path) -> str:
    return path.stem.split("_")[0]  # teacher_small -> teacher, quickstart_quick -> quickstart


def check_job(job: str, cfg: dict) -> None:
    if job == "teacher":
        teacher.check_config(cfg)
    elif job == "train":
        train.check_config(cfg)
    elif job == "evaluate":
        evaluate.check_config(cfg)
    elif job == "generate":  # value checks only: its input paths are checked below
        generate.check_settings([generate.Settings.from_config(cfg)], cfg["dtype"])
    else:
        raise AssertionError(f"no checks for job {job}")


def load_job(path: Path) -> tuple[str, dict]:
    job = job_of(path)
    defaults = {"teacher": teacher.DEFAULTS, "train": train.DEFAULTS, "generate": generate.DEFAULTS,
                "evaluate": evaluate.DEFAULTS}[job]
    return job, load_config(defaults, job, path)  # an unknown key raises, naming it


def test_cluster_yaml_passes_the_cluster_launchers_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` checks first
    nodes = raw["available_node_types"]
    assert raw["head_node_type"] in nodes
    assert sum(n.get("min_workers", 0) for n in nodes.values()) <= raw["max_workers"]
    setup = " ".join(raw["setup_commands"])
    assert SHARED in setup, "the shared storage every config writes to is mounted by setup_commands"
    (target,) = raw["file_mounts"]
    assert f"pip install -q -e \"{target}[" in setup, "the project installed from where it is mounted"
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["max_workers"] = "eight"
    with pytest.raises(Exception, match="max_workers"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem != "serve" and job_of(p) != "quickstart"],
                         ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_job_config_keys_values_and_paths(path):
    job, cfg = load_job(path)
    if job == "evaluate" and cfg["sampler"] is None:  # the laptop config takes it from --sampler
        check_job(job, {**cfg, "sampler": "given with --sampler"})
    else:
        check_job(job, cfg)
    for key in INPUTS:
        value = cfg.get(key)
        if value in (None, "auto", "none"):
            continue
        for item in str(value).split(","):  # train's data may name several teacher directories
            if item.startswith("/"):
                assert item.startswith(SHARED + "/"), f"{path.name}: {key} {item} is not on shared storage"
            elif not item.startswith("runs/"):  # runs/...: the laptop pipeline's own outputs
                assert (ROOT / item).exists(), f"{path.name}: {key} {item} does not exist in the repo"
    if cfg.get("out", "").startswith("/"):
        assert cfg["out"].startswith(SHARED + "/"), f"{path.name}: out must be on shared storage"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_each_backbone_has_every_stage_and_the_stages_chain(backbone):
    """configs/<backbone>/: teacher, train, generate, evaluate and serve; each stage reads what the
    previous one writes, and backbone / sampler paths agree across the files."""
    d = ROOT / "configs" / backbone
    assert sorted(p.stem for p in d.glob("*.yaml")) == ["evaluate", "generate", "serve", "teacher", "train"]
    cfg = {job: load_job(d / f"{job}.yaml")[1] for job in ("teacher", "train", "generate", "evaluate")}
    sampler_dir = str(Path(cfg["train"]["out"]) / "sampler")  # run_train exports the sampler there
    assert cfg["train"]["data"] == cfg["teacher"]["out"]
    assert cfg["generate"]["sampler"] == cfg["evaluate"]["sampler"] == sampler_dir
    assert cfg["evaluate"]["train_summary"] == cfg["train"]["out"]
    assert cfg["generate"]["backbone"] == cfg["evaluate"]["backbone"] == cfg["teacher"]["backbone"]
    assert len({c["out"] for c in cfg.values()}) == 4, "every stage writes its own directory"
    assert all(c.get("gpus_per_actor") == 1 for job, c in cfg.items() if job != "train")
    assert cfg["train"]["use_gpu"] is True and cfg["train"]["bf16"] is True
    args = serve_args(d / "serve.yaml", gpus=1)[0]
    assert args["backbone"] == cfg["teacher"]["backbone"] and args["sampler"] == sampler_dir


def test_instruct_configs_use_the_papers_decoding():
    """Dream-v0-Instruct-7B as in the paper: MetaMathQA-style chat prompts, temperature 0.1, top-p 0.9,
    256 tokens, for the teacher, generation, evaluation and serving alike."""
    d = ROOT / "configs" / "dream-7b-instruct"
    t = load_job(d / "teacher.yaml")[1]
    assert (t["chat"], t["temperature"], t["top_p"], t["gen_length"]) == (True, 0.1, 0.9, 256)
    assert t["num_trajectories"] == 20000 and t["prompt_field"] == "query"
    g = load_job(d / "generate.yaml")[1]
    assert (g["chat"], g["temperature"], g["top_p"], g["gen_length"]) == (True, 0.1, 0.9, 256)
    e = load_job(d / "evaluate.yaml")[1]
    assert (e["task_temperature"], e["top_p"], e["task_gen_length"]) == (0.1, 0.9, 256)
    s = serve_args(d / "serve.yaml", gpus=1)[0]["defaults"]
    assert (s["temperature"], s["top_p"], s["max_tokens"]) == (0.1, 0.9, 256)
    for name in ("dream-7b-base", "llada-8b-base"):  # the base setting: 100K x 127 tokens, temperature 1
        b = load_job(ROOT / "configs" / name / "teacher.yaml")[1]
        assert (b["num_trajectories"], b["gen_length"], b["temperature"], b["prompts"]) == (100000, 127, 1.0,
                                                                                             None)
        tr = load_job(ROOT / "configs" / name / "train.yaml")[1]
        assert (tr["lr"], tr["warmup_steps"], tr["batch_size"], tr["k_max"], tr["grad_clip"]) == (
            5e-5, 250, 32, 7, 1.0)


def test_serve_configs_here_and_on_a_cluster():
    args, deps, http = serve_args(ROOT / "serve" / "config.yaml", gpus=None)
    assert all(d["ray_actor_options"]["num_cpus"] < 1 for d in deps.values())  # 2 cores: fractional
    assert http["host"] == "127.0.0.1"  # no key by default: loopback only
    serve_args(ROOT / "serve" / "config.cluster.yaml", gpus=1)


def serve_args(path: Path, gpus: int | None) -> tuple[dict, dict, dict]:
    from ray.serve.schema import ServeDeploySchema

    from serve.app import AppArgs
    from serve.app import load_config as load_serve

    ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))  # what `serve deploy` checks
    args, deps, http = load_serve(path)
    AppArgs.model_validate(args)
    assert set(deps) == {"Ingress", "Generator"}
    for dep in deps.values():
        auto = dep["autoscaling_config"]
        assert 1 <= auto["min_replicas"] <= auto["max_replicas"] and auto["target_ongoing_requests"] > 0
    assert deps["Generator"]["ray_actor_options"].get("num_gpus") == gpus
    if gpus:
        assert args["require_api_key"] is True  # a proxy on every interface needs a key
    return args, deps, http


def test_quickstart_configs_sections_are_valid_stage_configs():
    for name in ("quickstart.yaml", "quickstart_quick.yaml"):
        raw = yaml.safe_load((ROOT / "configs" / name).read_text())
        cfg = quickstart.merge_quickstart(quickstart.DEFAULTS, raw)
        teacher.check_config(load_config(teacher.DEFAULTS, "teacher", None, cfg["teacher"]))
        train.check_config(load_config(train.DEFAULTS, "train", None, cfg["train"]))
        ev = load_config(evaluate.DEFAULTS, "evaluate", None, cfg["evaluate"])
        evaluate.check_config({**ev, "sampler": "filled in by the quickstart"})
