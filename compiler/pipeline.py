"""The build pipeline: a table of stages run per model, cached by content, published by one atomic rename."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from pydantic import BaseModel
from tokenizers import Tokenizer

from compiler import partition_files, random_init
from compiler.folders import install_once, remove_abandoned, retired_name, work_folder
from compiler.checkpoint import Checkpoint
from compiler.errors import BuildError
from compiler.recipe import LoadedRecipe, ModelSource, Recipe, calibration_text, recipe_json
from compiler.stages import build_engine, calibrate, export, load, lower, lower_tensorrt, partition, quantize, quantize_experts, verify
from runtime import tensorrt_library
from runtime.artifact import MANIFEST_NAME, EngineEntry, EngineProfile, FileEntry, GenerationEntry, Manifest, ModelEntry, StageRecord, read_manifest, sha256_of
from runtime.errors import MoeccError

ROLES = ("main", "draft")
TOKENIZER_FILE = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class BuildContext:
    """What stages may read besides their model's checkpoint: the recipe and the calibration text."""

    loaded: LoadedRecipe
    calibration_text: str
    tokenizer: Path  # shared by main and draft

    @functools.cached_property
    def calibration_sha256(self) -> str:
        return hashlib.sha256(self.calibration_text.encode()).hexdigest()

    @functools.cached_property
    def calibration_ids(self) -> list[int]:
        """The calibration text tokenized once per build; calibrate reads its start, verify its end."""
        return Tokenizer.from_file(str(self.tokenizer)).encode(self.calibration_text).ids


StageOutputs = dict[str, Path | list[Path]]  # stage name -> its output folder (a per-partition stage: their list, in partition order)


def _no_inputs(outputs: StageOutputs, context: BuildContext) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Stage:
    name: str
    version: str  # bump when the stage writes something different for the same inputs
    run: Callable[..., BaseModel]  # run(checkpoint, config, out_dir, progress, **inputs) -> result
    config_for: Callable[[BuildContext, ModelSource], BaseModel]  # the model's own source may override recipe-wide settings
    inputs_for: Callable[[StageOutputs, BuildContext], dict[str, Any]] = _no_inputs  # earlier outputs it reads
    applies: Callable[[Recipe], bool] = lambda recipe: True  # a stage for a target the recipe does not list is skipped
    # Run once per expert partition, each run cached apart; config_for then also takes the partition, and
    # later stages get the runs' output folders as a list.
    per_partition: bool = False


def _window(context: BuildContext) -> int:
    """Tokens per forward pass over the calibration text: no more than the exported model can hold."""
    recipe = context.loaded.recipe
    return min(recipe.calibrate.window, recipe.export.max_sequence_length)


def _model_dir(outputs: StageOutputs, stages: tuple[str, ...] = ("lower", "quantize", "export")) -> Path:
    """The folder holding the latest model of `stages` (by default the CPU's: lowered, quantized, or the export)."""
    return next(outputs[stage] for stage in stages if stage in outputs and (outputs[stage] / export.MODEL_FILE).is_file())


def _targets_tensorrt(recipe: Recipe) -> bool:
    return "tensorrt" in recipe.targets


def _lower_tensorrt_config(context: BuildContext, source: ModelSource) -> lower_tensorrt.LowerTensorRTConfig:
    recipe = context.loaded.recipe
    return lower_tensorrt.LowerTensorRTConfig(
        precision=recipe.tensorrt.precision, text_sha256=context.calibration_sha256, tokens=min(recipe.verify.tokens, 1024), window=_window(context),
        max_perplexity_increase=recipe.verify.max_perplexity_increase, min_top1_agreement=recipe.verify.min_top1_agreement,
    )


def _engine_profiles(recipe: Recipe) -> list[EngineProfile]:
    """Prefill (prompt chunks), decode (one token) and verify (a draft's proposals plus one) over the whole context."""
    longest = recipe.export.max_sequence_length
    batch = (1, 1, recipe.tensorrt.max_batch_size)
    past = (0, longest // 2, longest - 1)
    prefill = min(recipe.tensorrt.prefill_tokens, longest)
    generation = recipe.generation
    verify_tokens = 1 + max(generation.max_draft_length, generation.draft_length if isinstance(generation.draft_length, int) else 1)
    return [
        EngineProfile(name="prefill", batch=batch, tokens=(1, max(1, prefill // 2), prefill), past=(0, 0, longest - 1)),
        EngineProfile(name="decode", batch=batch, tokens=(1, 1, 1), past=past),
        EngineProfile(name="verify", batch=batch, tokens=(2, verify_tokens, verify_tokens), past=past),
    ]


def _build_engine_config(context: BuildContext, source: ModelSource) -> build_engine.BuildEngineConfig:
    recipe = context.loaded.recipe
    library = tensorrt_library.load()
    return build_engine.BuildEngineConfig(
        flavour=library.flavour, version=library.version,
        compute_capabilities=list(recipe.tensorrt.compute_capabilities) if library.targets_compute_capabilities else [],
        precision=recipe.tensorrt.precision, profiles=_engine_profiles(recipe),
        weight_streaming=recipe.tensorrt.weight_streaming, strip_weights=recipe.tensorrt.strip_weights,
    )


def _calibrate_config(context: BuildContext, source: ModelSource) -> calibrate.CalibrateConfig:
    settings = context.loaded.recipe.calibrate
    return calibrate.CalibrateConfig(
        text_sha256=context.calibration_sha256, max_tokens=settings.max_tokens, window=_window(context),
        min_tokens_per_expert=settings.min_tokens_per_expert, rare_experts=settings.rare_experts,
    )


def _quantize_config(context: BuildContext, source: ModelSource) -> quantize.QuantizeConfig:
    settings = source.quantize or context.loaded.recipe.quantize
    return quantize.QuantizeConfig(
        weights=settings.weights, method=settings.method, block_size=settings.block_size,
        classes=settings.classes.model_dump(exclude_none=True),
        hot_experts=settings.hot_experts,
        activations=settings.activations, activation_range=settings.activation_range, smoothquant=settings.smoothquant,
        partition_precision=dict(enumerate(context.loaded.recipe.partition.precision or ())), kv_cache=settings.kv_cache,
        # The draft's numerics never reach the output; the main model's must not depend on a call's width.
        integer_products=source is not context.loaded.recipe.main,
    )


def _quantize_experts_config(context: BuildContext, source: ModelSource, partition: int) -> quantize_experts.QuantizeExpertsConfig:
    settings = _quantize_config(context, source)
    return quantize_experts.QuantizeExpertsConfig(
        partition=partition, experts=settings.classes.get("experts", settings.weights), hot_experts=settings.hot_experts,
        own_precision=settings.partition_precision.get(partition), method=settings.method, block_size=settings.block_size,
    )


STAGES: tuple[Stage, ...] = (
    Stage("load", load.VERSION, load.run, lambda c, source: load.LoadConfig()),
    Stage(
        "export",
        export.VERSION,
        export.run,
        lambda c, source: export.ExportConfig(precision=c.loaded.recipe.export.precision, max_sequence_length=c.loaded.recipe.export.max_sequence_length),
    ),
    Stage(
        "calibrate",
        calibrate.VERSION,
        calibrate.run,
        _calibrate_config,
        lambda outputs, c: {"export_dir": outputs["export"], "ids": c.calibration_ids},
    ),
    Stage(
        "partition",
        partition.VERSION,
        partition.run,
        # partition.precision is for the quantize stages: the plan does not depend on it, so it stays cached when it changes
        lambda c, source: partition.PartitionConfig(**c.loaded.recipe.partition.model_dump(mode="json", exclude={"precision"})),
        lambda outputs, c: {"calibrate_dir": outputs["calibrate"]},
    ),
    Stage(
        "quantize_experts",
        quantize_experts.VERSION,
        quantize_experts.run,
        _quantize_experts_config,
        lambda outputs, c: {"export_dir": outputs["export"], "calibrate_dir": outputs["calibrate"], "partition_dir": outputs["partition"]},
        per_partition=True,
    ),
    Stage(
        "quantize",
        quantize.VERSION,
        quantize.run,
        _quantize_config,
        lambda outputs, c: {
            "export_dir": outputs["export"], "calibrate_dir": outputs["calibrate"], "partition_dir": outputs["partition"],
            "experts_dirs": outputs["quantize_experts"],
        },
    ),
    Stage(
        "lower",
        lower.VERSION,
        lower.run,
        lambda c, source: lower.LowerConfig(expert_parts=c.loaded.recipe.cpu.expert_parts),
        lambda outputs, c: {"model_dir": _model_dir(outputs)},
    ),
    Stage(
        "verify",
        verify.VERSION,
        verify.run,
        lambda c, source: verify.VerifyConfig(
            text_sha256=c.calibration_sha256, tokens=c.loaded.recipe.verify.tokens,
            window=_window(c),
            max_perplexity_increase=c.loaded.recipe.verify.max_perplexity_increase, min_top1_agreement=c.loaded.recipe.verify.min_top1_agreement,
        ),
        lambda outputs, c: {"export_dir": outputs["export"], "candidate_dir": _model_dir(outputs), "ids": c.calibration_ids},
    ),
    Stage(
        "lower_tensorrt",
        lower_tensorrt.VERSION,
        lower_tensorrt.run,
        _lower_tensorrt_config,
        # From the quantized model, not the CPU lowering: TensorRT gets the experts whole.
        lambda outputs, c: {"model_dir": _model_dir(outputs, ("quantize", "export")), "export_dir": outputs["export"], "ids": c.calibration_ids},
        _targets_tensorrt,
    ),
    Stage("build", build_engine.VERSION, build_engine.run, _build_engine_config, lambda outputs, c: {"lowered_dir": outputs["lower_tensorrt"]}, _targets_tensorrt),
)


class BuildObserver(Protocol):
    """Instruments the caller passes in (progress bars, logs); the stages themselves never print."""

    def stage_started(self, model: str, stage: str) -> None: ...
    def stage_progress(self, done: int, total: int) -> None: ...
    def stage_finished(self, record: StageRecord) -> None: ...


class _Silent:
    def stage_started(self, model: str, stage: str) -> None:
        pass

    def stage_progress(self, done: int, total: int) -> None:
        pass

    def stage_finished(self, record: StageRecord) -> None:
        pass


def source_digest() -> str:
    """sha256 over moecc's own Python sources: a code change that comes without a stage VERSION bump
    still gives every stage a new cache key (stage VERSION says when a stage's output changed)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*(root / "compiler").rglob("*.py"), *(root / "runtime").rglob("*.py")]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    """What made the build, in every cache key and in the manifest: moecc's sources and the libraries whose output it writes."""
    versions = {"python": platform.python_version(), "moecc-source": source_digest()}
    for package in ("moecc", "onnx", "onnx-ir", "onnxruntime", "numpy", "safetensors", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class StageCache:
    """Finished stage outputs under root/STAGE/KEY; an entry appears by atomic rename once complete."""

    def __init__(self, root: Path):
        self.root = root

    def lookup(self, stage: str, key: str) -> tuple[Path, dict] | None:
        folder = self.root / stage / key
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        # A cached file altered since it was written would poison every later build: check it, else redo the stage.
        if any(not (folder / name).is_file() or sha256_of(folder / name) != digest for name, digest in meta["files"].items()):
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return folder, meta["result"]

    def store(self, stage: str, key: str, produce: Callable[[Path], BaseModel]) -> tuple[Path, dict]:
        parent = self.root / stage
        remove_abandoned(parent)
        work = work_folder(parent, key[:12])
        try:
            result = json.loads(produce(work).model_dump_json())
            files = {p.name: sha256_of(p) for p in sorted(work.iterdir())}
            (work / "meta.json").write_text(json.dumps({"result": result, "files": files}, indent=1))
            final = parent / key
            install_once(work, final)  # a concurrent build of the same stage may have stored it first
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return final, result


@contextlib.contextmanager
def _named(where: str) -> Iterator[None]:
    """Say which model (and stage) an expected error came from: a derived draft's checkpoint folder is the main model's."""
    try:
        yield
    except MoeccError as exc:
        raise type(exc)(f"{where}: {exc.message}", hint=exc.hint) from None


def _run_model(role: str, context: BuildContext, cache: StageCache, observer: BuildObserver, tools: dict) -> tuple[Checkpoint, list[StageRecord], StageOutputs]:
    loaded = context.loaded
    source = getattr(loaded.recipe, role)
    with _named(f"{role} model"):
        checkpoint = Checkpoint(
            getattr(loaded, f"{role}_checkpoint"), allow_pickle=source.allow_pickle, layers=source.layers, experts_per_token=source.experts_per_token
        )
    upstream = _digest({"checkpoint": checkpoint.digests()})
    records, outputs = [], {}

    def run_stage(stage: Stage, config: BaseModel, upstream: str, label: str) -> tuple[StageRecord, Path]:
        config_json = json.loads(config.model_dump_json())
        key = _digest({"stage": stage.name, "version": stage.version, "config": config_json, "upstream": upstream, "tools": tools})
        observer.stage_started(role, label)
        started = time.perf_counter()
        hit = cache.lookup(stage.name, key)
        if hit is None:
            with _named(f"{role} model, {stage.name} stage"):
                folder_out, result = cache.store(stage.name, key, lambda out: stage.run(checkpoint, config, out, observer.stage_progress, **stage.inputs_for(outputs, context)))
        else:
            folder_out, result = hit
        record = StageRecord(
            model=role, stage=stage.name, config=config_json, result=result,
            seconds=round(time.perf_counter() - started, 4), cached=hit is not None, cache_key=key,
        )
        observer.stage_finished(record)
        records.append(record)
        return record, folder_out

    for stage in (stage for stage in STAGES if stage.applies(loaded.recipe)):
        if stage.per_partition:
            # Every partition's run hangs off the same upstream, so one partition's change leaves the others cached.
            runs = [
                run_stage(stage, stage.config_for(context, source, part), upstream, f"{stage.name} p{part}")
                for part in range(loaded.recipe.partition.partitions if checkpoint.dims.num_experts else 1)
            ]
            outputs[stage.name] = [folder for _, folder in runs]  # in partition order
            upstream = _digest([record.cache_key for record, _ in runs])
        else:
            record, outputs[stage.name] = run_stage(stage, stage.config_for(context, source), upstream, stage.name)
            upstream = record.cache_key
    return checkpoint, records, outputs


def _eos_token_id(checkpoint: Checkpoint, tokenizer_path: Path) -> int | None:
    eos = checkpoint.config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is not None:
        return int(eos)
    vocab = json.loads(tokenizer_path.read_text(encoding="utf-8")).get("added_tokens", [])
    return next((token["id"] for token in vocab if token.get("content") == END_OF_TEXT), None)


ENGINE_FOLDER = "tensorrt"


def _partitioned(records: list[StageRecord]) -> bool:
    """Whether the model's experts were split over several partitions (their weights then get files of their own)."""
    plan = next(r.result for r in records if r.stage == "partition")
    return plan["partitions"] > 1 and bool(plan["layers"])


def _engine_entry(role: str, records: list[StageRecord]) -> EngineEntry | None:
    built = next((r.result for r in records if r.stage == "build"), None)
    if built is None:
        return None
    folder = f"{role}/{ENGINE_FOLDER}"
    return EngineEntry(
        path=f"{folder}/{build_engine.ENGINE_FILE}", onnx_path=f"{folder}/{export.MODEL_FILE}", layers_path=f"{folder}/{build_engine.LAYERS_FILE}",
        **{key: built[key] for key in ("flavour", "version", "compute_capabilities", "precision", "profiles", "builder_flags", "build_seconds", "size")},
    )


def _model_entry(role: str, checkpoint: Checkpoint, records: list[StageRecord]) -> ModelEntry:
    loaded, exported, quantized = (next(r.result for r in records if r.stage == name) for name in ("load", "export", "quantize"))
    dims = checkpoint.dims
    return ModelEntry(
        path=f"{role}/{export.MODEL_FILE}",
        architecture=loaded["architecture"],
        precision=quantized["precision"] if quantized["precision"] != "fp32" else exported["precision"],
        activations=exported["precision"],
        kv_cache="int8" if quantized.get("kv_cache") == "int8" else exported["precision"],
        session_options=quantized.get("session_options", {}),
        num_layers=dims.num_layers,
        num_kv_heads=dims.num_kv_heads,
        head_dim=dims.head_dim,
        vocab_size=dims.vocab_size,
        max_sequence_length=exported["max_sequence_length"],
        parameters=loaded["parameters"],
        engine=_engine_entry(role, records),
        expert_layers=quantized.get("expert_layers", []),
    )


def _tokenizer(loaded: LoadedRecipe) -> Path:
    paths = [folder / TOKENIZER_FILE for folder in (loaded.main_checkpoint, loaded.draft_checkpoint)]
    for path in paths:
        if not path.is_file():
            raise BuildError(f"{path.parent}: no {TOKENIZER_FILE}", hint="the checkpoint folder must hold its tokenizer")
    if sha256_of(paths[0]) != sha256_of(paths[1]):
        raise BuildError("the main and draft checkpoints have different tokenizers", hint="speculative decoding needs one shared vocabulary")
    return paths[0]


def _publish(staging: Path, final: Path) -> None:
    """Replace `final` with `staging` by renames, so a reader never sees a half-written artifact."""
    retired = None
    if final.exists():
        retired = retired_name(final)
        os.rename(final, retired)
    os.rename(staging, final)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


@dataclass(frozen=True)
class BuildReport:
    artifact: Path
    manifest: Manifest
    seconds: float


def with_generated_weights(loaded: LoadedRecipe, cache_root: Path) -> LoadedRecipe:
    """Point models whose recipe asks for random weights at their generated checkpoint."""
    folders = {}
    for role in ROLES:
        seed = getattr(loaded.recipe, role).random_init_seed
        if seed is not None:
            folders[f"{role}_checkpoint"] = random_init.materialize(getattr(loaded, f"{role}_checkpoint"), seed, cache_root)
    return loaded.model_copy(update=folders)


def check_built_from(artifact: Path, loaded: LoadedRecipe) -> Manifest:
    """The manifest of an artifact built from the checkpoints of `loaded` (a recipe after with_generated_weights);
    one built from others is refused, before any of its models is opened: a benchmark would compare two different
    models (with small-coder's recipe and tiny-coder's artifact, greedy agreement was 0.07 against transformers,
    0.03 against onnxruntime-genai)."""
    manifest = read_manifest(artifact)
    for role in ROLES:
        source = getattr(loaded.recipe, role)
        checkpoint = Checkpoint(getattr(loaded, f"{role}_checkpoint"), source.allow_pickle, source.layers, source.experts_per_token)
        differing = sorted(name for name, digest in checkpoint.digests().items() if manifest.inputs.get(role, {}).get(name) != digest)
        if differing:  # the identity the build records: config.json, weight files, and what a derived draft cuts
            raise MoeccError(f"{artifact} was not built from {loaded.path}'s {role} checkpoint ({', '.join(differing)} differ)",
                             hint=f"build it with `moecc build {loaded.path}`, or name one built from it with --artifact")  # both callers, benchmark scripts, take --artifact
    return manifest


def build(loaded: LoadedRecipe, output_root: Path, observer: BuildObserver | None = None, cache_root: Path | None = None) -> BuildReport:
    """Run every stage for the main and draft models, then assemble and publish the artifact."""
    observer = observer or _Silent()
    started = time.perf_counter()
    tools = tool_versions()
    cache = StageCache(cache_root or output_root / ".cache")
    loaded = with_generated_weights(loaded, cache.root)
    tokenizer = _tokenizer(loaded)
    context = BuildContext(loaded, calibration_text(loaded), tokenizer)
    results = {role: _run_model(role, context, cache, observer, tools) for role in ROLES}
    main_dims, draft_dims = results["main"][0].dims, results["draft"][0].dims
    if main_dims.vocab_size != draft_dims.vocab_size:
        raise BuildError(f"main vocabulary {main_dims.vocab_size} differs from draft vocabulary {draft_dims.vocab_size}")

    output_root.mkdir(parents=True, exist_ok=True)
    remove_abandoned(output_root)  # what a killed build of any recipe left in the output folder
    staging = work_folder(output_root, f"staging-{loaded.recipe.name}")
    try:
        for role, (_, records, outputs) in results.items():
            (staging / role).mkdir()
            if _partitioned(records):
                partition_files.save_partitioned(_model_dir(outputs), staging / role)
            else:
                for name in (export.MODEL_FILE, export.DATA_FILE):
                    shutil.copyfile(_model_dir(outputs) / name, staging / role / name)
            if "build" in outputs:
                engine_folder = staging / role / ENGINE_FOLDER
                engine_folder.mkdir()
                for stage, names in (("lower_tensorrt", (export.MODEL_FILE, export.DATA_FILE)), ("build", (build_engine.ENGINE_FILE, build_engine.LAYERS_FILE))):
                    for name in names:
                        shutil.copyfile(outputs[stage] / name, engine_folder / name)
        shutil.copyfile(tokenizer, staging / TOKENIZER_FILE)
        files = {
            path.relative_to(staging).as_posix(): FileEntry(sha256=sha256_of(path), size=path.stat().st_size)
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        recipe = loaded.recipe
        manifest = Manifest(
            schema_version=1,
            name=recipe.name,
            moecc_version=tools["moecc"],
            recipe=recipe_json(recipe),
            recipe_sha256=loaded.sha256,
            inputs={role: checkpoint.digests() for role, (checkpoint, _, _) in results.items()},
            tools=tools,
            stages=[record for _, records, _ in results.values() for record in records],
            models={role: _model_entry(role, checkpoint, records) for role, (checkpoint, records, _) in results.items()},
            tokenizer=TOKENIZER_FILE,
            generation=GenerationEntry(
                draft_length=recipe.generation.draft_length, max_draft_length=recipe.generation.max_draft_length,
                max_new_tokens=recipe.generation.max_new_tokens,
                temperature=recipe.generation.temperature,
                eos_token_id=_eos_token_id(results["main"][0], tokenizer),
            ),
            files=files,
        )
        # The manifest is written last: a folder without it is never taken for an artifact.
        (staging / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
        final = output_root / recipe.name
        _publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BuildReport(artifact=final, manifest=manifest, seconds=time.perf_counter() - started)
