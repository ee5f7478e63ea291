"""Typed, strict configuration: one model per stage, nested under `Config`.

Load with `load_config("configs/demo.yaml")`. Unknown keys and bad values raise
`ConfigError`, whose message names the field (e.g. `train.beta`) and the fix.
Relative paths in the file (workdir, manifest, model path) are resolved against the
config file's own directory, so a config works from any current directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from regdpo.hashing import short_hash


class ConfigError(ValueError):
    """A config file or value is wrong; the message says which field and how to fix it."""


class _Strict(BaseModel):
    # allow_inf_nan=False: every float field refuses .inf and .nan (YAML spells them `.inf`,
    # `.nan`), which would otherwise pass `gt=0`-style bounds and fail or poison a run later.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def runtime(default: Any = ..., **kwargs: Any) -> Any:
    """A field that says where or how fast work runs, not what it produces (devices, batch
    sizes, process counts, checkpoint cadence). Runtime fields are left out of every
    fingerprint, so changing them never redoes finished work."""
    return Field(default, json_schema_extra={"runtime": True}, **kwargs)


def fingerprint_payload(model: BaseModel) -> dict[str, Any]:
    """The model's values without its runtime fields (recursively): what shapes a stage's output."""
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        if (info.json_schema_extra or {}).get("runtime"):
            continue
        value = getattr(model, name)
        out[name] = fingerprint_payload(value) if isinstance(value, BaseModel) else _jsonable(value)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return fingerprint_payload(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


# Shared field declarations. Ranges are what a run can use: a value outside one fails at load
# time naming the field, instead of failing (or producing garbage) hours into a run.
SEED: Any = Field(default=0, ge=0, lt=2**63)  # int64: every RNG takes it
# classifier-free guidance: 1 = none; Wan uses ~5; far above, the sampler saturates or overflows
GUIDANCE: Any = Field(default=5.0, ge=1, le=50, description="classifier-free guidance scale: 1 = none")
FLOW_SHIFT: Any = Field(default=None, gt=0, le=100, description="the sampler's timestep shift (default: the model's)")
# A unit stage publishes while at most this share of its units failed (and not all of them);
# past it the stage fails, naming the reasons (regdpo/stages/accounting.py).
MAX_FAILED: Any = runtime(0.1, ge=0, le=1, description="share of units that may fail with the stage still "
                                                       "publishing (the rest; failed units are retried next run)")


class LoraConfig(_Strict):
    rank: int = Field(default=16, ge=1, le=1024)
    alpha: float = Field(default=16.0, gt=0, le=10_000)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


class ModelConfig(_Strict):
    """Which base model. `preset: tiny` builds a seeded tiny model of the same diffusers classes;
    otherwise `path` is a local diffusers model directory (nothing is downloaded)."""

    family: Literal["wan-t2v", "wan-i2v"] = "wan-t2v"
    preset: Literal["tiny"] | None = None
    path: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = runtime("auto", description="where the model runs: auto (cuda if available), cpu, cuda, cuda:1")
    max_sequence_length: int = Field(default=512, ge=1, le=4096)
    seed: int = SEED

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.preset is None) == (self.path is None):
            raise ValueError("set exactly one of model.preset (e.g. 'tiny') or model.path (a local diffusers model directory)")
        return self


class VideoSpec(_Strict):
    """The training clip spec: every clip is normalised to this (ingest) and generated at it."""

    fps: float = Field(default=16.0, gt=0, le=240)
    num_frames: int = Field(default=81, ge=1, le=1025)
    height: int = Field(default=480, ge=16, le=4096)
    width: int = Field(default=832, ge=16, le=4096)

    @model_validator(mode="after")
    def _wan_shapes(self) -> "VideoSpec":
        # Wan's VAE compresses time 4x with a causal first frame: F = 4k + 1.
        if (self.num_frames - 1) % 4 != 0:
            raise ValueError(f"video.num_frames must be 4k+1 (e.g. 9, 17, 81); got {self.num_frames}")
        for name in ("height", "width"):
            if getattr(self, name) % 16 != 0:
                raise ValueError(f"video.{name} must be a multiple of 16 (VAE x8, patch x2); got {getattr(self, name)}")
        return self


class IngestConfig(_Strict):
    manifest: str = Field(description="a CSV, parquet or JSONL manifest (path, caption[, start_s, end_s]), "
                                      "or a folder of videos with same-named .txt captions")
    min_side: int = Field(default=64, ge=1, le=4096, description="reject inputs whose shorter side is below this")
    heldout_fraction: float = Field(default=0.1, ge=0, lt=1)
    min_heldout: int = Field(default=1, ge=0, le=1_000_000)
    max_clips_per_video: int = Field(default=1, ge=1, le=10_000)
    allow_gif: bool = True
    allow_symlinks_outside: bool = Field(
        default=False, description="follow symlinks in the manifest folder that point outside it")
    num_workers: int = runtime(1, ge=1, le=1024, description="decoding processes")
    work_item_size: int = runtime(32, ge=1, description="manifest rows per work item")
    max_failed_fraction: float = MAX_FAILED


class GenerateConfig(_Strict):
    num_inference_steps: int = Field(default=50, ge=1, le=1000)
    guidance_scale: float = GUIDANCE
    negative_prompt: str = ""
    flow_shift: float | None = FLOW_SHIFT
    num_negatives: int = Field(default=1, ge=1, le=64, description="K negatives per clip -> K pairs")
    batch_size: int = runtime(1, ge=1, description="clips per denoiser call")
    devices: list[str] | None = runtime(None, description="one process per device; default: every visible GPU, "
                                                          "else model.device")
    work_item_size: int = runtime(16, ge=1, description="clips per work item (a Prefect task, a device's turn)")
    max_failed_fraction: float = MAX_FAILED
    seed: int = SEED


class EncodeConfig(_Strict):
    samples_per_shard: int = runtime(256, ge=1, description="pairs per new shard file")
    batch_size: int = runtime(2, ge=1, description="videos per VAE call")
    devices: list[str] | None = runtime(None, description="one process per device; default: every visible GPU, "
                                                          "else model.device")
    work_item_size: int = runtime(64, ge=1, description="pairs per work item")
    max_failed_fraction: float = MAX_FAILED
    latent_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class TimestepConfig(_Strict):
    sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = Field(default=0.0, ge=-10, le=10)
    logit_std: float = Field(default=1.0, gt=0, le=10)
    shift: float = Field(default=1.0, gt=0, le=100)


class DivergenceConfig(_Strict):
    """When a training run counts as diverged and stops: nothing it trained since is checkpointed
    or exported, the stage fails, and a previously published train/ stays."""

    max_loss: float = Field(default=1e6, gt=0, description="stop when a step's loss exceeds this (checked every "
                                                           "step; Reg-DPO's loss starts near beta/2 x the error)")
    max_weight_abs: float = Field(default=100.0, gt=0,
                                  description="stop when a trained weight's |value| exceeds this (checked every "
                                              "train.log_every steps and before every checkpoint; LoRA weights stay "
                                              "near 1, a base model's own weights must lie below it)")


class TrainConfig(_Strict):
    """Reg-DPO training. Fields marked runtime say where and how fast it runs (processes,
    accumulation split, loader workers, checkpoint cadence, how the reference is held): they are
    in no fingerprint, and the trajectory does not depend on them."""

    objective: Literal["reg-dpo", "dpo", "sft"] = "reg-dpo"
    beta: float = Field(default=1000.0, gt=0, le=1e6)
    r_mode: Literal["dgr", "constant"] = "dgr"
    r_scale: float = Field(default=1.0, ge=0, le=1000, description="k in r = k * DGR (r_mode: dgr)")
    r_constant: float = Field(default=0.0, ge=0, le=1e6, description="r when r_mode: constant")
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    timesteps: TimestepConfig = Field(default_factory=TimestepConfig)
    learning_rate: float = Field(default=1e-4, gt=0, le=1, description="AdamW's; above 1 no run trains")
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    warmup_steps: int = Field(default=0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="after warmup: constant, or cosine down to min_lr_ratio x learning_rate at max_steps")
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    ema_decay: float | None = Field(default=None, gt=0, lt=1,
                                    description="keep an EMA of the trained weights (exported as final/); e.g. 0.999")
    max_steps: int = Field(default=1000, ge=1, description="optimizer steps on the current shard set")
    batch_size: int = Field(default=1, ge=1, description="pairs per optimizer step over all processes (global batch)")
    grad_clip: float = Field(default=1.0, gt=0, le=1e6)
    seed: int = SEED
    resume: Literal["continue", "fresh"] = runtime(
        "continue", description="continue: a finished or interrupted run with the same settings continues from its "
                                "last checkpoint (also over an enlarged shard set); fresh: start at step 0")
    reference: Literal["auto", "adapters-off", "copy", "precomputed"] = runtime(
        "auto", description="how the DPO reference is held: auto = adapters-off for LoRA, copy for full fine-tuning")
    reference_offload: bool = runtime(False, description="copy reference: keep it on the CPU between uses")
    num_processes: int = runtime(1, ge=1, description="processes (GPUs) the train stage launches with torchrun")
    parallelism: Literal["ddp", "fsdp"] = runtime("ddp", description="ddp: replicate; fsdp: FSDP2 per transformer block")
    gradient_accumulation_steps: int = runtime(1, ge=1, description="micro-batches per optimizer step and process")
    loader_workers: int = runtime(2, ge=0, le=256, description="DataLoader worker processes per training process")
    max_nonfinite_steps: int = runtime(3, ge=1, description="abort after this many skipped (non-finite) steps in a row")
    log_every: int = runtime(10, ge=1, description="steps between progress log lines and TensorBoard points")
    checkpoint_every: int = runtime(500, ge=1)
    keep_checkpoints: int = runtime(2, ge=1)
    gradient_checkpointing: bool = runtime(False)
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig, json_schema_extra={"runtime": True})

    @model_validator(mode="after")
    def _r(self) -> "TrainConfig":
        if self.r_mode == "constant" and self.objective == "reg-dpo" and self.r_constant == 0:
            raise ValueError("train.r_constant is 0 with r_mode: constant, which is plain DPO; set r_constant > 0 or objective: dpo")
        if self.r_mode == "dgr" and self.objective == "reg-dpo" and self.r_scale == 0:
            raise ValueError("train.r_scale is 0 with r_mode: dgr, which is plain DPO; set r_scale > 0 (1: r = DGR) or "
                             "objective: dpo")
        if self.reference == "adapters-off" and self.finetune != "lora":
            raise ValueError("train.reference adapters-off needs train.finetune: lora; use copy or precomputed for full "
                             "fine-tuning (or auto)")
        split = self.num_processes * self.gradient_accumulation_steps
        if self.batch_size % split != 0:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be divisible by train.num_processes x "
                             f"train.gradient_accumulation_steps ({self.num_processes} x "
                             f"{self.gradient_accumulation_steps}); it is the global number of pairs per step")
        return self

    @property
    def reference_mode(self) -> str:
        """`reference` with auto resolved."""
        if self.reference != "auto":
            return self.reference
        return "adapters-off" if self.finetune == "lora" else "copy"


class BootstrapConfig(_Strict):
    """Paired bootstrap over held-out pairs (regdpo/eval/stats.py)."""

    num_resamples: int = Field(default=2000, ge=100, le=1_000_000, description="resamples for means over pairs (cheap)")
    set_resamples: int = Field(default=400, ge=50, le=100_000,
                               description="resamples for statistics of whole sets: each costs two Fréchet distances")
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    seed: int = SEED
    min_clips_for_sets: int = Field(
        default=5, ge=2,
        description="fewest clips for an interval on a statistic of a whole set (Fréchet distance); below it, no verdict")


class EvalSamplesConfig(_Strict):
    """Evaluation's own sampler: changing it redoes evaluation only, never the negatives."""

    num_samples: int = Field(default=4, ge=0, le=10_000,
                             description="held-out captions sampled with base and tuned (0: none)")
    num_inference_steps: int = Field(default=50, ge=1, le=1000)
    guidance_scale: float = GUIDANCE
    negative_prompt: str = ""
    flow_shift: float | None = FLOW_SHIFT
    seed: int = SEED


class FeatureExtractorConfig(_Strict):
    """Features for the Fréchet distance: `proxy` (offline pixel statistics, labelled a proxy), or a
    local transformers model directory: `clip` (per-frame CLIP image embeddings, FID-style) or
    `videomae` (clip-level VideoMAE features, FVD-style). Nothing is downloaded."""

    kind: Literal["proxy", "clip", "videomae"] = "proxy"
    path: str | None = None
    batch_size: int = runtime(16, ge=1, description="frames (clip) or clips (videomae) per forward pass")

    @model_validator(mode="after")
    def _path(self) -> "FeatureExtractorConfig":
        if self.kind == "proxy" and self.path is not None:
            raise ValueError("evaluate.feature_extractor.path is set but kind is proxy; set kind: clip or videomae, "
                             "or remove the path")
        if self.kind != "proxy":
            if self.path is None:
                raise ValueError(f"evaluate.feature_extractor.kind {self.kind} needs path: a local transformers "
                                 "model directory")
            if not Path(self.path).is_absolute():
                raise ValueError(f"evaluate.feature_extractor.path must be an absolute path; got {self.path!r}")
        return self


class ScorerConfig(_Strict):
    """A number computed on every evaluation sample and its caption (regdpo/eval/scorers.py):
    `world`, the synthetic world's rule-based quality score (regdpo/world), or `callable`, your
    own function `(video uint8 (F, H, W, 3), caption) -> number` (or a mapping of names to
    numbers) from a local Python file (`path`) or an importable `module`, never unpickled. With
    `options`, `function(**options)` is called once and must return that scorer (e.g. a reward
    model that loads its checkpoint once). The report gives base, tuned and the change with an
    interval over the sampled captions."""

    kind: Literal["world", "callable"]
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$",
                             description="the metric's name in the report (default: world, or the function's name)")
    path: str | None = Field(default=None, description="callable: a .py file (relative to the config file)")
    module: str | None = Field(default=None, description="callable: an importable module, e.g. mypkg.rewards")
    function: str | None = Field(default=None, description="callable: the function (or factory) in it")
    options: dict[str, Any] | None = Field(default=None, description="callable: keyword arguments of the factory")
    better: Literal["higher", "lower"] = "higher"

    @model_validator(mode="after")
    def _source(self) -> "ScorerConfig":
        given = [k for k in ("path", "module", "function", "options") if getattr(self, k) is not None]
        if self.kind == "world":
            if given:
                raise ValueError(f"evaluate.scorers: kind world takes no {', '.join(given)} (those are for kind callable)")
            if self.better != "higher":
                raise ValueError("evaluate.scorers: the world score is better when higher; remove `better`")
            return self
        if self.function is None or not self.function.isidentifier():
            raise ValueError("evaluate.scorers: kind callable needs `function`, the name of the function in the file "
                             "or module")
        if (self.path is None) == (self.module is None):
            raise ValueError("evaluate.scorers: kind callable needs exactly one of `path` (a .py file) or `module` "
                             "(an importable module name)")
        if self.path is not None and not self.path.endswith(".py"):
            raise ValueError(f"evaluate.scorers: path must be a Python file (.py); got {self.path!r}")
        return self

    @property
    def metric(self) -> str:
        return self.name or ("world" if self.kind == "world" else str(self.function))


class EvaluateConfig(_Strict):
    timesteps: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    seed: int = Field(default=1234, ge=0, lt=2**63)
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)
    samples: EvalSamplesConfig = Field(default_factory=EvalSamplesConfig)
    feature_extractor: FeatureExtractorConfig = Field(default_factory=FeatureExtractorConfig)
    scorers: list[ScorerConfig] = Field(default_factory=list,
                                        description="numbers computed on each sample and its caption (world, callable)")

    @model_validator(mode="after")
    def _t(self) -> "EvaluateConfig":
        if not self.timesteps or any(not 0 < t < 1 for t in self.timesteps):
            raise ValueError("evaluate.timesteps must be a non-empty list of values strictly between 0 and 1")
        if self.scorers and self.samples.num_samples == 0:
            raise ValueError("evaluate.scorers score samples, but evaluate.samples.num_samples is 0; set it >= 1")
        names = [s.metric for s in self.scorers]
        if len(set(names)) < len(names):
            raise ValueError(f"evaluate.scorers: two scorers are named alike ({', '.join(names)}); give each a "
                             "distinct `name`")
        return self


class Config(_Strict):
    """Root config. `workdir` holds every stage's outputs (layout in docs/DESIGN.md)."""

    workdir: str
    seed: int = SEED
    model: ModelConfig
    video: VideoSpec = Field(default_factory=VideoSpec)
    ingest: IngestConfig
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir)

    def section_fingerprint(self, *names: str) -> str:
        """Stable hash of the named top-level sections (e.g. 'model', 'video', 'ingest'),
        runtime fields (devices, batch sizes, ...) left out."""
        payload = {n: fingerprint_payload(getattr(self, n)) for n in names}
        return short_hash(payload)


def _fields_at(loc: tuple) -> list[str]:
    """The keys valid where `loc` points (a section's fields), for a "did you mean" hint."""
    model: Any = Config
    for part in loc[:-1]:
        info = getattr(model, "model_fields", {}).get(str(part))
        if info is None:
            return []
        model = info.annotation
    return list(getattr(model, "model_fields", {}))


def _suggestion(loc: tuple) -> str:
    import difflib

    close = difflib.get_close_matches(str(loc[-1]), _fields_at(loc), n=1, cutoff=0.75)
    if not close:
        return "remove it or check its spelling (see configs/demo.yaml)"
    return f"did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?"


# pydantic prefixes the message of a ValueError raised in a validator with its kind
_PREFIXES = ("Value error, ", "Assertion failed, ")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        for prefix in _PREFIXES:
            msg = msg.removeprefix(prefix)
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key; {_suggestion(e['loc'])}")
        elif e["type"] == "missing":
            lines.append(f"  {field}: required; add it")
        elif e["type"] == "value_error":
            # a cross-field rule: its message names its fields and the fix itself
            lines.append(f"  {msg}" if msg.startswith(f"{field}.") or field == "(root)" else f"  {field}: {msg}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {field}: {msg}{got_s}")
    return "\n".join(lines)


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    def fix(p: str | None) -> str | None:
        if p is None or Path(p).is_absolute():
            return p
        return str((base / p).resolve())

    raw = dict(raw)
    if isinstance(raw.get("workdir"), str):
        raw["workdir"] = fix(raw["workdir"])
    for section, key in (("ingest", "manifest"), ("model", "path")):
        sec = raw.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str):
            raw[section] = {**sec, key: fix(sec[key])}
    ev = raw.get("evaluate")
    if isinstance(ev, dict) and isinstance(ev.get("scorers"), list):
        raw["evaluate"] = {**ev, "scorers": [{**s, "path": fix(s["path"])} if isinstance(s, dict) and
                                             isinstance(s.get("path"), str) else s for s in ev["scorers"]]}
    return raw


def path_problems(manifest: Any, model_path: Any) -> list[str]:
    """What is wrong with the two input paths a config names (each a message naming the field and
    the fix); checked with the config's own errors, so a run hears of every problem at once."""
    problems = []
    if isinstance(manifest, str) and not Path(manifest).exists():
        problems.append(f"ingest.manifest {manifest} does not exist: set it to a manifest (CSV, parquet, JSONL) or "
                        "a folder of videos with same-named .txt captions")
    if isinstance(model_path, str):
        root = Path(model_path)
        if not root.is_dir() or not (root / "model_index.json").is_file():
            what = "does not exist" if not root.exists() else "is not a diffusers model directory (no model_index.json)"
            problems.append(f"model.path {root} {what}: point it at a local diffusers model directory "
                            "(nothing is downloaded)")
    return problems


def config_from_dict(raw: dict[str, Any], *, source: str = "<dict>", base_dir: Path | None = None) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (workdir, model, ingest, ...)")
    if base_dir is not None:
        raw = _resolve_paths(raw, base_dir)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        paths = path_problems((raw.get("ingest") or {}).get("manifest") if isinstance(raw.get("ingest"), dict) else None,
                              (raw.get("model") or {}).get("path") if isinstance(raw.get("model"), dict) else None)
        raise ConfigError("\n".join([_format_errors(err, source), *(f"  {p}" for p in paths)])) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config; `overrides` maps dotted keys (e.g. 'train.max_steps') to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(raw, source=str(path), base_dir=path.parent.resolve())


def save_resolved(cfg: Config, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write the fully resolved config (defaults filled in) next to a stage's outputs."""
    out = Path(directory) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return out
