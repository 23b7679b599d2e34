"""Every job's configuration: one pydantic model per job, the one place that holds its keys, their
defaults and their checks. `configs/*.yaml` are documented examples of these keys;
`jointgen <job> --print-config` prints the merged, validated config of a command line.

    model defaults < preset (quickstart --quick) < --config FILE < the job's flags < --set key=value

`--set` values are parsed as YAML (`3`, `1e-3`, `null`, `true`, `[1, 2]`); a dotted key reaches into a
nested section (`--set train.steps=2000` for the quickstart). An unknown key or a bad value fails at load,
before Ray starts, with a ValueError naming the key. The decoding keys of the teacher, generate and
evaluate jobs (temperature, top_p, policy, block_length, threshold, kv_cache, ...) are checked by
`sampler.settings.DecodeSettings`, which each job builds from them (`.decode`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ray_jobs.common import Dtype
from sampler.settings import DecodeSettings, Fill, KVCache, Mode, Order, Policy

# An integer >= 1; strict: `true` or 2.5 is not a count
Count = Annotated[int, Field(strict=True, ge=1)]
Int = Annotated[int, Field(strict=True)]


class JobConfig(BaseModel):
    """A job's config: frozen once loaded; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    job: ClassVar[str]


C = TypeVar("C", bound=JobConfig)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def describe(error: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line per problem, each naming its key (`prefix` + the key's dotted path)."""
    lines = []
    for err in error.errors(include_url=False):
        key = prefix + ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r}; known keys: {', '.join(model.model_fields)}")
        elif err["type"] == "value_error":  # our own checks raise "key: message"
            lines.append(f"{key}: {err['ctx']['error']}" if err["loc"] else f"{prefix}{err['ctx']['error']}")
        else:
            lines.append(f"{key}: {err['msg']} (got {err['input']!r})")
    return "; ".join(lines)


def validate(model: type[C], values: C | Mapping[str, Any] | None) -> C:
    """`values` (a mapping of config keys; missing keys take the defaults) as a `model`."""
    if isinstance(values, model):
        return values
    try:
        return model.model_validate(dict(values or {}))
    except ValidationError as e:
        raise ValueError(f"{model.job}: {describe(e, model)}") from None


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers override earlier ones; nested mappings are merged key by key."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def parse_sets(items: Sequence[str] | None) -> dict[str, Any]:
    """`--set key=value` items as a nested mapping."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: value is not valid YAML ({e})") from e
        *parents, last = key.strip().split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def load(model: type[C], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
         sets: Sequence[str] | None = None, preset: Mapping[str, Any] | None = None) -> C:
    """preset < YAML file < `overrides` (None values ignored: flags not given) < `--set` items."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return validate(model, merge(preset or {}, read_yaml(path) if path else {}, given, parse_sets(sets)))


def to_yaml(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def decode_settings(cfg: BaseModel, **fixed: Any) -> DecodeSettings:
    """The DecodeSettings of a config's decoding keys, with `fixed` values the job decides itself."""
    try:
        return DecodeSettings.from_mapping({**dict(cfg), **fixed})
    except ValidationError as e:
        raise ValueError(describe(e, DecodeSettings)) from None


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

CLI_ONLY = ("config", "set", "print_config", "json", "quick")  # flags that are not config keys


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The flags every job shares."""
    parser.add_argument("--config", help="YAML config file (keys as in configs/*.yaml); flags override it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key (value parsed as YAML; a.b=1 for nested keys); "
                             "repeatable")
    parser.add_argument("--print-config", action="store_true",
                        help="print the merged, validated config as YAML and exit")


def run_cli(model: type[C], args: argparse.Namespace, run: Callable[[C], Any], show: Callable[[Any], None],
            preset: Mapping[str, Any] | None = None) -> int:
    """The body of every `jointgen <job>`: config from the flags -> run -> show the result. Bad input
    exits with 2 and one line naming the problem (ShardError and CheckpointError are ValueErrors)."""
    overrides = {k: v for k, v in vars(args).items() if k not in CLI_ONLY}
    try:
        cfg = load(model, args.config, overrides, args.set, preset)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        result = run(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"jointgen {model.job}: error: {e}", file=sys.stderr)
        return 2
    show(result)
    return 0


# ---------------------------------------------------------------------------------------------
# The jobs
# ---------------------------------------------------------------------------------------------


class TeacherConfig(JobConfig):
    """`jointgen teacher` (ray_jobs/teacher.py): exact trajectories on Ray actors -> Parquet shards."""

    job: ClassVar[str] = "teacher"
    backbone: str | None = None  # checkpoint dir or hub id owner/name[@revision]; None = the embedded one
    dtype: Dtype | None = None  # None = the checkpoint's dtype (bf16 checkpoints decode in bf16)
    prompts: str | None = None  # None = unconditional ([BOS]); else a .jsonl or .parquet file of prompts
    prompt_field: str = "prompt"  # JSONL key / Parquet column with the prompt text (optional "id" alongside)
    chat: bool = False  # apply the tokenizer's chat template to prompts
    num_trajectories: Count | None = None  # None = 1024 unconditional, one per prompt with a prompt file
    gen_length: Count = 64  # tokens per trajectory, one per full pass
    # decoding (always exact: one token per full pass; checked by DecodeSettings)
    temperature: float = 1.0
    top_p: float = 1.0
    policy: Policy = "entropy"
    block_length: int | None = None  # semi-autoregressive blocks; None = the whole generation
    kv_cache: KVCache = "none"  # an approximate cache makes the trajectories approximate too
    batch_size: Count = 32  # trajectories per batched decode
    chunk_size: Count = 128  # trajectories per shard (the unit of work, retry and resume)
    seed: Int = 0
    out: str = "runs/teacher"
    actors: Count | None = None  # None = one per GPU, or one per CPU core without GPUs
    cpus_per_actor: float = Field(0.5, ge=0)  # fractional on small machines (a whole core starves the driver)
    gpus_per_actor: float | None = Field(None, ge=0)  # None = 1 when the cluster has GPUs, else 0
    torch_threads: Count | None = None  # None = CPU cores / actors
    max_restarts: int = Field(3, ge=0)  # Ray restarts of a dead actor
    chunk_retries: int = Field(3, ge=0)  # resubmissions of one chunk after its actor died
    on_bad_shard: Literal["redo", "refuse"] = "redo"  # a corrupt / foreign shard: decode again, or stop
    ray_address: str | None = None  # None = RAY_ADDRESS or a local cluster
    ray_num_cpus: Count | None = None  # CPUs of a local cluster (None = all)
    progress: bool = True

    @property
    def decode(self) -> DecodeSettings:
        return decode_settings(self, mode="exact", stop_at_eos=False)

    @model_validator(mode="after")
    def _decoding(self) -> TeacherConfig:
        self.decode  # noqa: B018  (checks the decoding keys)
        return self


class TrainConfig(JobConfig):
    """`jointgen train` (ray_jobs/train.py): the joint sampler fitted on teacher shards with Ray Train."""

    job: ClassVar[str] = "train"
    data: str | list[str] = "runs/teacher"  # teacher output dir(s) (manifest.json + shards); a,b for several
    backbone: str | None = None  # None = the backbone recorded in the teacher manifest (embedded if none)
    dtype: Dtype | None = None  # None = float32 on CPU, bfloat16 on GPU
    out: str = "runs/train"
    run_name: str = "train"  # Ray Train run name; the same out + run_name resumes
    storage_path: str | None = None  # Ray Train checkpoints; None = <out>/ray; s3://... or NFS on clusters
    workers: Count = 2
    cpus_per_worker: float = Field(0.5, ge=0)  # fractional on small machines; GPUs: one per worker
    use_gpu: bool | None = None  # None = when the cluster has GPUs
    torch_threads: Count | None = None  # None = 1 per worker on CPU
    steps: Count = 2000
    batch_size: Count = 32  # global windows per step (split across workers)
    k_max: Count = 7  # largest unroll depth K
    k_weighting: Literal["inverse", "uniform"] = "inverse"  # P(K) ~ 1/K, or uniform
    init: Literal["random", "backbone"] = "random"  # backbone: decoder layers from the backbone's last ones
    sampler_layers: Count = 1  # decoder layers of the sampler (docs/method.md); a resume must keep it
    loss_depths: Literal["last", "all"] = "last"  # KL after K steps only (the paper), or at every depth
    eos_window_keep: float = Field(1.0, gt=0, le=1)  # keep-probability of windows writing only EOS tokens
    next_targets: Count | None = None  # None = the KL at every masked position; n = the next n in order
    lr: float = Field(5.0e-5, gt=0)
    warmup_steps: Int = Field(250, ge=0)  # linear warm-up, then the schedule
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up; cosine ends at lr * min_lr_ratio
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine only: the last step's lr over `lr`
    norm_out_lr_scale: float = Field(10.0, gt=0)  # lr of the output norm (the zero-initialised gate) over lr
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: list[float] = Field([0.9, 0.999], min_length=2, max_length=2)
    grad_clip: float = Field(1.0, gt=0)
    bf16: bool | None = None  # None = bf16 autocast on GPU, off on CPU (true pays on CPUs with bf16 units)
    val_fraction: float = Field(0.05, ge=0, lt=1)  # held-out trajectories (by traj_id hash)
    val_every: Count = 250
    val_windows_per_depth: Count = 64
    val_k_max: Count | None = None  # None = k_max
    checkpoint_every: Count = 250
    keep_checkpoints: Count = 2
    max_failures: Int = Field(2, ge=-1)  # worker failures recovered from the latest checkpoint (-1: any)
    log_every: Count = 10
    seed: Int = 0
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "jointgen"
    ray_address: str | None = None  # None = RAY_ADDRESS or a local cluster
    ray_num_cpus: Count | None = None
    progress: bool = True
    fail_at_step: Count | None = None  # fault injection: the last rank kills its own process here

    @model_validator(mode="after")
    def _batch_fits(self) -> TrainConfig:
        if self.batch_size < self.workers:
            raise ValueError(f"batch_size: {self.batch_size} is smaller than workers ({self.workers})")
        return self


class GenerateConfig(JobConfig):
    """`jointgen generate` (ray_jobs/generate.py): batch generation over a prompt file with Ray Data."""

    job: ClassVar[str] = "generate"
    backbone: str | None = None  # checkpoint dir (Dream / LLaDA layout) or hub id; None = the embedded one
    dtype: Dtype | None = None  # None = the checkpoint's dtype
    sampler: str | None = None  # joint sampler dir (from `jointgen train`); needed for mode joint
    prompts: str | None = None  # JSONL / Parquet: a `prompt` or `messages` column, optional `id`, `suffix`
    num_samples: Count | None = 64  # unconditional samples when prompts is None
    chat: bool = False  # wrap text prompts in the tokenizer's chat template
    out: str = "runs/generate"  # rerunning with the same directory completes only the missing prompt ids
    # decoding (checked by DecodeSettings)
    mode: Mode = "joint"
    k: int = 4  # tokens per full pass (exact: always 1)
    gen_length: Count = 48
    temperature: float = 1.0
    top_p: float = 1.0
    policy: Policy = "entropy"
    block_length: int | None = None
    stop_at_eos: bool = True
    threshold: float | None = None  # None = fixed k; else confidence-threshold decoding (marginal / joint)
    kv_cache: KVCache = "none"
    order: Order = "rescore"  # joint, fixed k: rescore every candidate after a sampler step, or planned
    fill: Fill = "k"  # joint with a threshold: the sampler fills to k, or takes only what it made sure
    seed: Int = 0
    # Ray
    ray_address: str | None = None  # None = RAY_ADDRESS or a local cluster
    ray_num_cpus: Count | None = None
    batch_size: Count = 16  # rows per generate() call in an actor
    actors: Count = 1  # actor pool size (one per GPU on a cluster)
    cpus_per_actor: float = Field(0.5, ge=0)  # fractional on 2 cores (1 CPU per actor deadlocks the pool)
    gpus_per_actor: float = Field(0, ge=0)
    torch_threads: Count | None = None  # torch threads in each actor (None: Ray's default for the actor)
    progress: bool = True

    @property
    def decode(self) -> DecodeSettings:
        return decode_settings(self)

    @model_validator(mode="after")
    def _consistent(self) -> GenerateConfig:
        if self.decode.mode == "joint" and not self.sampler:
            raise ValueError("sampler: mode joint needs a sampler directory (from `jointgen train`)")
        if not self.prompts and not self.num_samples:
            raise ValueError("num_samples: give a prompt file (prompts) or num_samples >= 1")
        return self


class EvaluateConfig(JobConfig):
    """`jointgen evaluate` (ray_jobs/evaluate.py): quality against speed of exact / marginal / joint, at
    fixed k and with confidence thresholds."""

    job: ClassVar[str] = "evaluate"
    backbone: str | None = None  # None = the embedded backbone
    dtype: Dtype | None = None  # generation dtype; None = the checkpoint's
    sampler: str | None = None  # joint sampler dir (required for joint rows)
    judge: str | None = "auto"  # auto = the embedded judge if present and of the backbone's vocabulary
    judge_backend: Literal["torch", "vllm", "auto"] = "torch"  # auto = vllm when it imports
    ks: list[Count] = Field([1, 2, 4, 8], min_length=1)  # fixed k of the marginal and joint sets
    # families: marginal@k, joint@k, planned@k (joint, order planned) for k in ks; threshold (marginal, tau
    # in thresholds, at most threshold_k per pass); hybrid (joint with tau, k in hybrid_ks); hybrid-planned
    # (the same with order "planned") and sure (with fill "sure"), both opt-in. The last four run only when
    # thresholds is non-empty.
    methods: list[Literal["marginal", "joint", "planned", "threshold", "hybrid", "hybrid-planned",
                          "sure"]] = ["marginal", "joint", "planned", "threshold", "hybrid"]
    thresholds: list[Annotated[float, Field(gt=0, le=1)]] = [0.9, 0.7, 0.5]  # confidence taus; [] = none
    threshold_k: Annotated[int, Field(strict=True, ge=2)] = 8  # the most tokens per pass of a threshold set
    hybrid_ks: list[Annotated[int, Field(strict=True, ge=2)]] = [4, 8]  # k of the joint+threshold sets
    # language: unconditional samples (or a prompt file), fixed length
    num_samples: Int = Field(256, ge=10)  # per set; MAUVE needs at least 10
    language_prompts: str | None = None  # JSONL / Parquet; None = unconditional
    gen_length: Count = 48
    # decoding of every set (checked by DecodeSettings)
    temperature: float = 1.0
    top_p: float = 1.0
    policy: Policy = "entropy"
    block_length: int | None = None
    kv_cache: KVCache = "none"
    seed: Int = 0
    reference_seed: Int = 100003  # the second exact draw: MAUVE's reference
    # tasks: checkable answers, stop at EOS
    tasks: str | None = "auto"  # auto = the embedded task prompts for a backbone trained on them; a JSONL
    task_prompts: Count = 150  # how many task prompts to use
    task_gen_length: Count = 24
    task_temperature: float = 1.0
    # metrics
    mauve_features: list[Literal["judge", "minilm", "hf"]] = ["judge", "minilm"]  # hf: hf_features_model
    judge_feature_layer: Int = -1  # -1 = the last layer (as MAUVE uses GPT-2's); b >= 1 = block b's output
    hf_features_model: str | None = None  # a local HF causal LM dir (e.g. gpt2-large), never downloaded
    mauve_seeds: list[Int] = [1, 2, 3, 4, 5]  # k-means seeds: their spread is the MAUVE error bar
    train_summary: str | None = None  # run_train's summary.json (or its out dir): held-out KL per depth
    # Ray
    out: str = "runs/evaluate"
    batch_size: Count = 64
    judge_batch_size: Count = 32
    actors: Count = 1
    cpus_per_actor: float = Field(0.5, ge=0)
    gpus_per_actor: float = Field(0, ge=0)
    torch_threads: Count | None = None  # None = all cores / actors on CPU (one actor times methods alike)
    ray_address: str | None = None
    ray_num_cpus: Count | None = None
    progress: bool = True

    def decode(self, mode: str, k: int, *, task: bool, threshold: float | None = None,
               order: str = "rescore", fill: str = "k") -> DecodeSettings:
        """The decoding of one set: language samples run to gen_length, task answers stop at EOS."""
        return decode_settings(self, mode=mode, k=k, stop_at_eos=task, threshold=threshold, order=order,
                               fill=fill, temperature=self.task_temperature if task else self.temperature)

    @property
    def sweeps(self) -> dict[str, list[tuple[int, float]]]:
        """(k, tau) of the threshold sets ("threshold": marginal, "hybrid": joint, "hybrid-planned": joint
        with order "planned", "sure": joint with fill "sure") that run."""
        taus = sorted(set(self.thresholds), reverse=True)  # the surest (slowest) first
        return {"threshold": [(self.threshold_k, t) for t in taus] if "threshold" in self.methods else [],
                **{m: [(k, t) for t in taus for k in sorted(set(self.hybrid_ks))] if m in self.methods else []
                   for m in ("hybrid", "hybrid-planned", "sure")}}

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: Any) -> Any:
        if isinstance(values, Mapping) and "threshold" in values:
            raise ValueError("threshold: replaced by `thresholds` (a list of taus, swept beside fixed k), "
                             "`threshold_k` and `hybrid_ks`")
        return values

    @model_validator(mode="after")
    def _consistent(self) -> EvaluateConfig:
        self.decode("marginal", max(self.ks), task=False)
        try:
            self.decode("exact", 1, task=True)
        except ValueError as e:  # its only own value is task_temperature
            raise ValueError(f"task_{e}") from None
        sampler_sweeps = [v for m, v in self.sweeps.items() if m != "threshold"]  # all but marginal's
        joint_rows = {"joint", "planned"} & set(self.methods) or any(sampler_sweeps)
        if joint_rows and not self.sampler:
            raise ValueError("sampler: joint rows need a sampler directory (from `jointgen train`)")
        if self.judge_feature_layer != -1 and self.judge_feature_layer < 1:
            raise ValueError(f"judge_feature_layer: -1 (the last layer) or a block number >= 1, got "
                             f"{self.judge_feature_layer}")
        if "hf" in self.mauve_features and not self.hf_features_model:
            raise ValueError("hf_features_model: mauve_features 'hf' needs a local model directory")
        return self


class QuickstartConfig(JobConfig):
    """`jointgen quickstart` (ray_jobs/quickstart.py): teacher -> train -> evaluate under one directory.
    The teacher / train / evaluate sections override those jobs' defaults (any of their keys); each is
    checked at load as that job checks it. The stage configs are `teacher_runs()`, `train_config()` and
    `evaluate_config()`."""

    job: ClassVar[str] = "quickstart"
    out: str = "runs/quickstart"
    backbone: str | None = None  # None = the embedded backbone (the judge and task prompts come with it)
    gen_length: Count = 32  # tokens per language sample, teacher and evaluation alike
    seed: Int = 0
    teacher_task_share: float = Field(0.4, ge=0, le=1)  # share of teacher trajectories on task prompts
    task_gen_length: Count = 16  # tokens per task answer (teacher and evaluation)
    # sized for 14-16 minutes on 2 CPU cores (README); a larger run: --set train.steps=3000
    # --set evaluate.num_samples=2000 --set evaluate.ks=[1,2,4,8] (the shipped sampler: 16000 steps)
    teacher: dict[str, Any] = {"num_trajectories": 1600, "batch_size": 100, "chunk_size": 200}
    train: dict[str, Any] = {
        "steps": 900, "batch_size": 32, "lr": 1.0e-3, "warmup_steps": 50, "k_max": 7, "eos_window_keep": 0.1,
        "next_targets": 4,
        "bf16": True,  # autocast: 2.1x the windows/s of float32 on a CPU with bf16 units (avx512_bf16)
        "val_every": 200, "checkpoint_every": 200, "val_windows_per_depth": 64,
    }
    evaluate: dict[str, Any] = {"ks": [1, 2, 4], "num_samples": 300, "task_prompts": 300,
                                "batch_size": 100, "thresholds": [0.9], "hybrid_ks": [4]}  # a small sweep
    ray_address: str | None = None  # None = RAY_ADDRESS or a local cluster
    ray_num_cpus: Count | None = None
    progress: bool = True

    @field_validator("teacher", "train", "evaluate", mode="before")
    @classmethod
    def _over_defaults(cls, section: Any, info: Any) -> dict[str, Any]:
        """A section given in a file or --set changes the keys it names; the others keep the defaults."""
        if not isinstance(section, Mapping):
            raise ValueError(f"a mapping of {info.field_name} config keys, got {section!r}")
        return {**cls.model_fields[info.field_name].default, **section}

    @model_validator(mode="after")
    def _stages(self) -> QuickstartConfig:
        self.teacher_runs()
        self.evaluate_config()  # train_config() is part of it
        return self

    def _stage(self, model: type[C], values: dict[str, Any]) -> C:
        try:
            return model.model_validate(values)
        except ValidationError as e:
            raise ValueError(describe(e, model, prefix=f"{model.job}.")) from None

    @property
    def root(self) -> Path:
        return Path(self.out).resolve()

    def _common(self) -> dict[str, Any]:
        return {"ray_address": self.ray_address, "ray_num_cpus": self.ray_num_cpus, "progress": self.progress}

    def teacher_rows(self) -> dict[str, int]:
        """Teacher trajectories on unconditional ("language") and on task prompts."""
        n = int(self.teacher.get("num_trajectories") or 1024)
        n_task = int(round(n * self.teacher_task_share))
        return {"language": n - n_task, "tasks": n_task}

    def teacher_runs(self) -> list[tuple[str, TeacherConfig]]:
        """(prompt kind, config) of each teacher run: task answers get their own run with a short
        gen_length, so that their dependencies are not drowned in windows that only fill an EOS tail."""
        runs = []
        for name, subdir, gen_length in (("language", "teacher", self.gen_length),
                                         ("tasks", "teacher_tasks", self.task_gen_length)):
            rows = self.teacher_rows()[name]
            if rows:
                runs.append((name, self._stage(TeacherConfig, {
                    "backbone": self.backbone, "gen_length": gen_length, "seed": self.seed,
                    "prompts": str(self.root / f"teacher_prompts_{name}.jsonl"),
                    "out": str(self.root / subdir), **self._common(), **self.teacher,
                    "num_trajectories": rows})))
        return runs

    def train_config(self) -> TrainConfig:
        data = [tcfg.out for _, tcfg in self.teacher_runs()]
        return self._stage(TrainConfig, {"data": data, "backbone": self.backbone,
                                         "out": str(self.root / "train"), "seed": self.seed,
                                         **self._common(), **self.train})

    def evaluate_config(self) -> EvaluateConfig:
        train_out = Path(self.train_config().out).resolve()  # where run_train exports the sampler
        return self._stage(EvaluateConfig, {
            "backbone": self.backbone, "sampler": str(train_out / "sampler"),
            "train_summary": str(train_out / "summary.json"), "gen_length": self.gen_length,
            "task_gen_length": self.task_gen_length, "seed": self.seed, "out": str(self.root / "evaluate"),
            **self._common(), **self.evaluate})


# `jointgen quickstart --quick`: every stage small, a few minutes on 2 cores (configs/quickstart_quick.yaml)
QUICK: dict[str, Any] = {
    "out": "runs/quickstart-quick",
    "teacher": {"num_trajectories": 320, "batch_size": 80, "chunk_size": 80},
    "train": {"steps": 120, "val_every": 60, "checkpoint_every": 60, "val_windows_per_depth": 32},
    "evaluate": {"num_samples": 100, "task_prompts": 60, "batch_size": 50, "mauve_seeds": [1, 2]},
}
