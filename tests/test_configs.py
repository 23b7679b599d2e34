"""Every committed config is checked against the code that reads it, so none can rot silently:
cluster.yaml against Ray's cluster-launcher schema; each job YAML under configs/ through its job's config
model (keys, values, decoding settings); each Serve YAML against Serve's schema and our application's
arguments; input paths must exist in the repository, live on the cluster's shared storage, or be the
output of the stage before them in the same directory (teacher -> train -> generate / evaluate / serve).
Then the loading itself: unknown keys and bad values fail naming the key, layers override in order, and
`--print-config` prints the merged config. Nothing here starts Ray."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from ray_jobs.config import (
    QUICK,
    EvaluateConfig,
    GenerateConfig,
    JobConfig,
    QuickstartConfig,
    TeacherConfig,
    TrainConfig,
    load,
    validate,
)
from sampler.backbone import parse_hub_id
from sampler.settings import DecodeSettings

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
SHARED = "/mnt/shared"  # the shared storage cluster.yaml mounts on every node
BACKBONES = ("dream-7b-base", "dream-7b-instruct", "llada-8b-base", "embedded")
INPUTS = ("backbone", "prompts", "data", "sampler", "judge", "tasks", "language_prompts",
          "hf_features_model", "train_summary")
MODELS: dict[str, type[JobConfig]] = {"teacher": TeacherConfig, "train": TrainConfig,
                                      "generate": GenerateConfig, "evaluate": EvaluateConfig,
                                      "quickstart": QuickstartConfig}


def job_of(path: Path) -> str:
    return path.stem.split("_")[0]  # teacher_small -> teacher, quickstart_quick -> quickstart


def load_job(path: Path, **overrides) -> JobConfig:
    return load(MODELS[job_of(path)], path, overrides)  # an unknown key or a bad value raises, naming it


def test_cluster_yaml_passes_the_cluster_launchers_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` checks first
    nodes = raw["available_node_types"]
    assert raw["head_node_type"] in nodes
    assert sum(n.get("min_workers", 0) for n in nodes.values()) <= raw["max_workers"]
    init, setup = " ".join(raw["initialization_commands"]), " ".join(raw["setup_commands"])
    assert "mount -t nfs4" in init and SHARED in init, "the shared storage is mounted on every host"
    assert f"-v {SHARED}:{SHARED}" in raw["docker"]["run_options"], "and seen by the container"
    (target,) = raw["file_mounts"]
    assert f"pip install -q -e \"{target}[" in setup, "the project installed from where it is mounted"
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["max_workers"] = "eight"
    with pytest.raises(Exception, match="max_workers"):
        validate_config(prepare_config(broken))


def test_cluster_yaml_against_rays_schema_file_as_written():
    """The file itself (before the launcher fills in defaults) against the schema the installed Ray ships;
    what the rsync of the working tree leaves out; the hub CLI of current huggingface_hub."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    text = (ROOT / "cluster.yaml").read_text()
    raw = yaml.safe_load(text)
    jsonschema.validate(raw, schema)
    for key, bad in (("rsync_exclude", ".venv"), ("rsync_excludes", [".venv"])):  # a string; a misspelt key
        with pytest.raises(jsonschema.ValidationError, match=key):
            jsonschema.validate(raw | {key: bad}, schema)
    assert {".git", ".venv", "runs"} <= set(raw["rsync_exclude"]) and raw["rsync_filter"] == [".gitignore"]
    assert "huggingface-cli" not in text and "hf download " in text  # gone from current huggingface_hub


def test_cluster_environment_satisfies_the_projects_python_and_ray():
    """The container image's Python and Ray versions (its tag: <ray>-py<3XY>-gpu) against pyproject.toml;
    hub ids resolve into one cache on the shared storage."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    docker = yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]
    repo, tag = docker["image"].split(":")
    ray_version, py, platform = tag.split("-")
    assert repo == "rayproject/ray" and platform == "gpu" and py.startswith("py3")
    assert f"3.{py[3:]}" in SpecifierSet(project["requires-python"]), f"{docker['image']}: Python too old"
    (ray_req,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "ray"]
    assert ray_version in ray_req.specifier, f"{docker['image']}: Ray outside {ray_req}"
    assert f"-e HF_HOME={SHARED}/huggingface" in docker["run_options"]


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem != "serve" and job_of(p) != "quickstart"],
                         ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_job_config_keys_values_and_paths(path):
    raw = yaml.safe_load(path.read_text())
    given = {}
    if job_of(path) in ("generate", "evaluate") and raw.get("sampler") is None:
        with pytest.raises(ValueError, match="sampler"):  # joint rows: on a laptop it comes from --sampler
            load_job(path)
        given = {"sampler": "runs/train/sampler"}
    cfg = load_job(path, **given)
    assert all(getattr(cfg, key) == value for key, value in (raw | given).items()), "a value changed on load"
    if isinstance(cfg, TeacherConfig | GenerateConfig):
        assert isinstance(cfg.decode, DecodeSettings)
    for key in INPUTS:
        value = getattr(cfg, key, None)
        if value in (None, "auto", "none"):
            continue
        for item in str(value).split(","):  # train's data may name several teacher directories
            if item.startswith("/"):
                assert item.startswith(SHARED + "/"), f"{path.name}: {key} {item} is not on shared storage"
            elif key in ("backbone", "judge") and parse_hub_id(item) and not (ROOT / item).exists():
                continue  # a hub id: resolved through the Hugging Face cache
            elif not item.startswith("runs/"):  # runs/...: the laptop pipeline's own outputs
                assert (ROOT / item).exists(), f"{path.name}: {key} {item} does not exist in the repo"
    if cfg.out.startswith("/"):
        assert cfg.out.startswith(SHARED + "/"), f"{path.name}: out must be on shared storage"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_each_backbone_has_every_stage_and_the_stages_chain(backbone):
    """configs/<backbone>/: teacher, train, generate, evaluate and serve; each stage reads what the
    previous one writes, and backbone / sampler paths agree across the files."""
    d = ROOT / "configs" / backbone
    assert sorted(p.stem for p in d.glob("*.yaml")) == ["evaluate", "generate", "serve", "teacher", "train"]
    cfg = {job: load_job(d / f"{job}.yaml") for job in ("teacher", "train", "generate", "evaluate")}
    sampler_dir = str(Path(cfg["train"].out) / "sampler")  # run_train exports the sampler there
    assert cfg["train"].data == cfg["teacher"].out
    assert cfg["generate"].sampler == cfg["evaluate"].sampler == sampler_dir
    assert cfg["evaluate"].train_summary == cfg["train"].out
    assert cfg["generate"].backbone == cfg["evaluate"].backbone == cfg["teacher"].backbone
    assert len({c.out for c in cfg.values()}) == 4, "every stage writes its own directory"
    assert all(c.gpus_per_actor == 1 for job, c in cfg.items() if job != "train")
    assert cfg["train"].use_gpu is True and cfg["train"].bf16 is True
    args = serve_args(d / "serve.yaml", gpus=1)[0]
    assert args["backbone"] == cfg["teacher"].backbone and args["sampler"] == sampler_dir


def test_instruct_configs_use_the_papers_decoding():
    """Dream-v0-Instruct-7B as in the paper: MetaMathQA-style chat prompts, temperature 0.1, top-p 0.9,
    256 tokens, for the teacher, generation, evaluation and serving alike."""
    d = ROOT / "configs" / "dream-7b-instruct"
    t = load_job(d / "teacher.yaml")
    assert (t.chat, t.decode.temperature, t.decode.top_p, t.gen_length) == (True, 0.1, 0.9, 256)
    assert t.num_trajectories == 20000 and t.prompt_field == "query"
    g = load_job(d / "generate.yaml")
    assert (g.chat, g.decode.temperature, g.decode.top_p, g.gen_length) == (True, 0.1, 0.9, 256)
    e = load_job(d / "evaluate.yaml")
    task = e.decode("joint", 4, task=True)
    assert (task.temperature, task.top_p, task.stop_at_eos, e.task_gen_length) == (0.1, 0.9, True, 256)
    s = serve_args(d / "serve.yaml", gpus=1)[0]["defaults"]
    assert (s["temperature"], s["top_p"], s["max_tokens"]) == (0.1, 0.9, 256)
    for name in ("dream-7b-base", "llada-8b-base"):  # the base setting: 100K x 127 tokens, temperature 1
        b = load_job(ROOT / "configs" / name / "teacher.yaml")
        assert (b.num_trajectories, b.gen_length, b.temperature, b.prompts) == (100000, 127, 1.0, None)
        tr = load_job(ROOT / "configs" / name / "train.yaml")
        assert (tr.lr, tr.warmup_steps, tr.batch_size, tr.k_max, tr.grad_clip) == (5e-5, 250, 32, 7, 1.0)


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
        assert dep["graceful_shutdown_timeout_s"] >= 60  # downscaling lets running streams finish
    assert deps["Generator"]["ray_actor_options"].get("num_gpus") == gpus
    if gpus:
        assert args["require_api_key"] is True  # a proxy on every interface needs a key
    return args, deps, http


def test_quickstart_configs_and_their_stage_sections():
    full = load(QuickstartConfig, ROOT / "configs" / "quickstart.yaml")
    assert full == QuickstartConfig(), "configs/quickstart.yaml is the default run"
    assert yaml.safe_load((ROOT / "configs" / "quickstart_quick.yaml").read_text()) == QUICK
    quick = load(QuickstartConfig, ROOT / "configs" / "quickstart_quick.yaml")
    assert quick == load(QuickstartConfig, preset=QUICK)
    # each stage's config: the section's keys over the shared ones, every one checked by its job's model
    (lang, teacher), (tasks, teacher_tasks) = quick.teacher_runs()
    assert (lang, tasks) == ("language", "tasks")
    assert (teacher.num_trajectories, teacher_tasks.num_trajectories) == (192, 128)  # 320 x 0.4 on tasks
    assert (teacher.gen_length, teacher_tasks.gen_length, teacher.batch_size) == (32, 16, 80)
    train = quick.train_config()
    assert train.data == [teacher.out, teacher_tasks.out] and (train.steps, train.lr) == (120, 1e-3)
    assert train.warmup_steps == 50, "a section given in a file keeps the default section's other keys"
    ev = quick.evaluate_config()
    assert ev.sampler == str(Path(train.out).resolve() / "sampler") and ev.mauve_seeds == [1, 2]
    assert (ev.ks, ev.num_samples, ev.gen_length, ev.task_gen_length) == ([1, 2, 4], 100, 32, 16)
    assert (ev.thresholds, ev.hybrid_ks) == ([0.9], [4]), "the quickstart sweeps one threshold"
    assert EvaluateConfig(sampler="s").thresholds == [0.9, 0.7, 0.5], "`jointgen evaluate`: the full sweep"


@pytest.mark.parametrize("model, key, value", [
    (TeacherConfig, "gen_length", 0), (TeacherConfig, "policy", "best"), (TeacherConfig, "on_bad_shard", "x"),
    (TeacherConfig, "batch_size", True), (TeacherConfig, "kv_cache", "full"), (TeacherConfig, "dtype", "fp8"),
    (TrainConfig, "lr", 0), (TrainConfig, "val_fraction", 1.0), (TrainConfig, "wandb", "yes"),
    (TrainConfig, "adam_betas", [0.9]), (GenerateConfig, "top_p", 1.5), (GenerateConfig, "temperature", -1),
    (GenerateConfig, "k", 0), (GenerateConfig, "threshold", -0.5), (GenerateConfig, "mode", "greedy"),
    (EvaluateConfig, "ks", [0, 2]), (EvaluateConfig, "methods", ["beam"]), (EvaluateConfig, "num_samples", 3),
    (EvaluateConfig, "task_temperature", -1), (EvaluateConfig, "judge_feature_layer", 0),
    (EvaluateConfig, "thresholds", [1.5]), (EvaluateConfig, "hybrid_ks", [1]),
    (EvaluateConfig, "threshold", 0.9),  # replaced by thresholds: the error says so
    (QuickstartConfig, "teacher_task_share", 1.5),
])
def test_bad_values_fail_at_load_naming_the_key(model, key, value):
    given = {"sampler": "runs/train/sampler"} if model in (GenerateConfig, EvaluateConfig) else {}
    validate(model, given)  # the same config without the bad value loads
    with pytest.raises(ValueError, match=rf"^{model.job}: {key}\b"):
        validate(model, given | {key: value})


@pytest.mark.parametrize("job", sorted(MODELS))
def test_unknown_keys_fail_naming_the_key(job, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gen_lenght: 12\n")
    with pytest.raises(ValueError, match=f"{job}: unknown config key 'gen_lenght'"):
        load(MODELS[job], bad)


def test_generate_yaml_with_top_p_above_one_fails_at_load(tmp_path):
    text = (ROOT / "configs" / "generate.yaml").read_text()
    bad = text.replace("\ntop_p: 1.0", "\ntop_p: 1.5").replace("\nsampler: null", "\nsampler: s")
    assert bad.count("1.5") == text.count("1.5") + 1 and "sampler: s" in bad
    conf = tmp_path / "generate.yaml"
    conf.write_text(bad)
    with pytest.raises(ValueError, match=r"generate: top_p: Input should be less than or equal to 1"):
        load(GenerateConfig, conf)


def test_stage_sections_of_the_quickstart_are_checked_at_load():
    with pytest.raises(ValueError, match=r"quickstart: train\.steps: Input should be greater"):
        load(QuickstartConfig, sets=["train.steps=0"])
    with pytest.raises(ValueError, match=r"quickstart: unknown config key 'teacher\.gen_lenght'"):
        load(QuickstartConfig, sets=["teacher.gen_lenght=3"])
    with pytest.raises(ValueError, match=r"quickstart: evaluate\.top_p"):
        load(QuickstartConfig, sets=["evaluate.top_p=2"])
    with pytest.raises(ValueError, match=r"quickstart: train: a mapping"):
        load(QuickstartConfig, sets=["train=3"])
    assert load(QuickstartConfig, sets=["train.steps=2000"]).train_config().steps == 2000


def test_layers_override_in_order_and_decoding_keys_reach_the_settings(tmp_path):
    conf = tmp_path / "g.yaml"
    conf.write_text("mode: marginal\nk: 3\ngen_length: 10\nkv_cache: prefix\n")
    cfg = load(GenerateConfig, conf, {"gen_length": 12, "k": None}, ["gen_length=14", "threshold=0.9"])
    assert (cfg.gen_length, cfg.k) == (14, 3)  # --set > flags > file; a flag not given (None) is no layer
    assert cfg.decode == DecodeSettings(mode="marginal", k=3, stop_at_eos=True, threshold=0.9,
                                        kv_cache="prefix")
    assert load(GenerateConfig, conf, sets=["mode=exact"]).decode.k == 1  # exact: one token per full pass
    ev = validate(EvaluateConfig, {"sampler": "s", "kv_cache": "dual"})
    joint = DecodeSettings(mode="joint", k=4, threshold=0.8, kv_cache="dual")
    assert ev.decode("joint", 4, task=False, threshold=0.8) == joint
    assert ev.decode("exact", 1, task=False) == DecodeSettings(mode="exact", kv_cache="dual")
    teacher = validate(TeacherConfig, {"temperature": 0.5, "block_length": 8})
    assert teacher.decode == DecodeSettings(mode="exact", temperature=0.5, block_length=8)


def test_print_config_prints_the_merged_config_and_exits(tmp_path, capsys):
    from ray_jobs import generate, quickstart, teacher

    conf = tmp_path / "t.yaml"
    conf.write_text("gen_length: 10\nseed: 3\n")
    assert teacher.main(["--config", str(conf), "--gen-length", "12", "--set", "chunk_size=7",
                         "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == TeacherConfig(gen_length=12, seed=3, chunk_size=7).model_dump()
    assert quickstart.main(["--quick", "--set", "train.steps=7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["out"] == "runs/quickstart-quick" and printed["train"]["steps"] == 7
    assert printed["train"]["val_every"] == 60 and printed["train"]["lr"] == 1e-3
    assert generate.main(["--print-config", "--set", "top_p=1.5", "--sampler", "s"]) == 2
    assert "generate: top_p" in capsys.readouterr().err
