"""Build recipes: YAML loaded safely into frozen, typed objects; errors name the field and the line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compiler import corpus
from compiler.errors import RecipeError
from runtime.speculative import MAX_DRAFT_LENGTH

STDLIB_HELDOUT = "stdlib:heldout"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class ExportConfig(_Frozen):
    precision: Literal["fp32", "fp16"] = Field(default="fp32", description="fp16 halves the size; for GPU targets")
    max_sequence_length: int = Field(default=2048, gt=0, le=1 << 20)


class CpuSettings(_Frozen):
    """Lowering for onnxruntime's CPU kernels."""

    expert_parts: Literal[1, 2, 4] = Field(
        default=2, description="split every expert's intermediate width into this many sub-experts, so one token's experts spread over the threads"
    )


class TensorRTSettings(_Frozen):
    """Engines for the tensorrt target, built when `targets` lists it."""

    precision: Literal["fp16", "fp32"] = Field(default="fp16", description="activations and KV cache in the engine")
    compute_capabilities: tuple[Annotated[str, Field(pattern=r"^sm[0-9]{2,3}$")], ...] = Field(
        default=("sm86", "sm89"), min_length=1, description="GPUs TensorRT-RTX builds for (full TensorRT builds for the GPU it runs on)"
    )
    max_batch_size: int = Field(default=1, ge=1, le=256)
    prefill_tokens: int = Field(default=512, ge=1, description="the longest prompt chunk one call reads")
    weight_streaming: bool = Field(default=False, description="let the runtime stream weights from host memory")
    strip_weights: bool = Field(default=False, description="engine without weights, refitted from the artifact's ONNX at load")


class PartitionSettings(_Frozen):
    """The expert placement plan, from the routing measured on the calibration text."""

    partitions: int = Field(default=1, ge=1, le=4096, description="shards per MoE layer (devices for expert parallelism)")
    strategy: Literal["contiguous", "balanced"] = Field(default="balanced", description="experts by index, or by measured load")
    hot_share: float | None = Field(default=None, gt=0.0, le=1.0, description="hot tier: experts with at least this share of their layer's routed tokens")
    hot_count: int | None = Field(default=None, ge=0, description="hot tier: the most routed experts of each layer")
    prune_below_share: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="opt-in: drop experts routed less than this share of their layer's tokens (the verify gate decides)"
    )
    precision: tuple[Literal["int8", "int4"], ...] | None = Field(
        default=None, description="expert weight precision per partition (one per partition), overriding the quantize rules for experts"
    )

    @model_validator(mode="after")
    def _one_tier_rule(self) -> "PartitionSettings":
        if self.hot_share is not None and self.hot_count is not None:
            raise ValueError("give hot_share or hot_count, not both")
        if self.precision is not None and len(self.precision) != self.partitions:
            raise ValueError(f"precision lists {len(self.precision)} partitions; partitions is {self.partitions}")
        return self


class CalibrateSettings(_Frozen):
    text: str = Field(default="stdlib:heldout", description="a file or folder relative to the recipe, or stdlib:heldout")
    max_tokens: int = Field(default=16384, gt=0)
    window: int = Field(default=256, gt=0, le=8192)
    min_tokens_per_expert: int = Field(default=16, ge=0, description="experts routed fewer tokens are reported")
    rare_experts: Literal["all_tokens", "routed_only"] = Field(
        default="all_tokens", description="what rarely routed experts are calibrated on: every token of their layer, or only theirs"
    )


Precision = Literal["fp32", "int8", "int4"]


class ClassRules(_Frozen):
    """Weight precision by tensor class, overriding `weights`; the router defaults to fp32."""

    attention: Precision | None = None
    router: Precision | None = None
    shared_expert: Precision | None = None
    mlp: Precision | None = Field(default=None, description="dense MLP of dense models (drafts)")
    lm_head: Precision | None = None
    experts: Precision | None = None


class QuantizeSettings(_Frozen):
    weights: Precision = Field(default="fp32", description="precision of every weight not ruled otherwise; routers stay in float")
    method: Literal["rtn", "gptq"] = Field(default="rtn", description="round to nearest, or GPTQ with calibrated second moments")
    block_size: Literal[16, 32, 64, 128] = 32
    classes: ClassRules = ClassRules()
    hot_experts: Literal["fp32", "int8", "int4"] | None = Field(default=None, description="precision of the experts in the partition plan's hot tier")
    activations: Literal["fp32", "int8"] = Field(default="fp32", description="int8: static activation scales for INT8 dense weights (W8A8)")
    activation_range: Literal["minmax", "percentile", "entropy"] = "percentile"
    smoothquant: float | None = Field(default=None, gt=0.0, lt=1.0, description="SmoothQuant alpha; with activations: int8 and activation_range: minmax")
    kv_cache: Literal["auto", "int8"] = Field(
        default="auto", description="auto: keys and values in the activations' float type; int8: per-channel scales calibrated on the calibration text (cpu target)"
    )

    @model_validator(mode="after")
    def _smoothquant_needs_minmax_int8_activations(self) -> "QuantizeSettings":
        if self.smoothquant is not None and (self.activations != "int8" or self.activation_range != "minmax"):
            # Only the min-max range of a smoothed input follows from per-channel maxima; the others need the data again.
            raise ValueError("smoothquant needs activations: int8 and activation_range: minmax")
        return self


class ModelSource(_Frozen):
    """Where one model of the pair comes from."""

    checkpoint: str = Field(description="checkpoint folder, relative to the recipe file")
    allow_pickle: bool = Field(default=False, description="accept pickle .bin weights, loaded with torch weights_only")
    layers: int | None = Field(
        default=None, ge=1, description="keep only the first N layers (with the final norm and head): a draft derived from the main model"
    )
    random_init_seed: int | None = Field(
        default=None, ge=0, description="generate random weights from the folder's config.json with this seed (speed and size work)"
    )
    experts_per_token: int | None = Field(
        default=None, ge=1, description="route each token to this many experts instead of the checkpoint's: a cheaper derived draft"
    )
    quantize: QuantizeSettings | None = Field(default=None, description="this model's own quantization, instead of the recipe's")


class VerifySettings(_Frozen):
    tokens: int = Field(default=8192, gt=1, description="held-out tokens, from the end of the calibrate text")
    max_perplexity_increase: float = Field(default=0.05, ge=0.0)
    min_top1_agreement: float = Field(default=0.8, ge=0.0, le=1.0)


class GenerationDefaults(_Frozen):
    draft_length: Annotated[int, Field(ge=1, le=MAX_DRAFT_LENGTH)] | Literal["auto"] = Field(
        default="auto", description="proposals per step, or auto: chosen per step from measured acceptance and costs"
    )
    max_draft_length: int = Field(default=8, ge=1, le=MAX_DRAFT_LENGTH, description="the longest an automatic draft length may be (a prompt lookup's, every step)")
    max_new_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)


class Recipe(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    main: ModelSource
    draft: ModelSource
    targets: tuple[Literal["cpu", "tensorrt"], ...] = Field(default=("cpu",), min_length=1)
    export: ExportConfig = ExportConfig()
    cpu: CpuSettings = CpuSettings()
    tensorrt: TensorRTSettings = TensorRTSettings()
    calibrate: CalibrateSettings = CalibrateSettings()
    partition: PartitionSettings = PartitionSettings()
    quantize: QuantizeSettings = QuantizeSettings()
    verify: VerifySettings = VerifySettings()
    generation: GenerationDefaults = GenerationDefaults()


class LoadedRecipe(_Frozen):
    """A validated recipe with its checkpoint folders resolved and the hash of its text."""

    recipe: Recipe
    path: Path
    sha256: str
    main_checkpoint: Path
    draft_checkpoint: Path


def _line_of(root: yaml.Node | None, location: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at a pydantic error location (deepest node that exists)."""
    node, line = root, None
    for key in location:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            matches = [(k, v) for k, v in node.value if k.value == key]
            node = matches[0][1] if matches else None
            if matches:
                line = matches[0][0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            node = None
    return line if line is not None or root is None else root.start_mark.line + 1


_UNION_MEMBER_TAGS = {"int", "constrained-int", "float", "str", "bool"}  # pydantic names the union member a value failed


def _is_field(part: Any) -> bool:
    return not (isinstance(part, str) and (part.startswith("function-") or "[" in part or part in _UNION_MEMBER_TAGS))


def _describe(error: dict[str, Any], root: yaml.Node | None, source: Path) -> tuple[str, str]:
    """Where and what: ("r.yaml:7: field 'generation.draft_length'", "Input should be a valid integer")."""
    location = tuple(part for part in error["loc"] if _is_field(part))
    field = ".".join(str(part) for part in location) or "(top level)"
    line = _line_of(root, location)
    where = f"{source}:{line}" if line else str(source)
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key '{field}'", ""
    if kind == "missing":
        return f"{where}: missing required key '{field}'", ""
    return f"{where}: field '{field}'", error["msg"].removeprefix("Value error, ")  # a validator's own message reads alone


def _messages(errors: list[dict[str, Any]], root: yaml.Node | None, source: Path) -> str:
    """One message per field; a value that fits no member of a union lists what each member wanted."""
    details: dict[str, list[str]] = {}
    for error in errors:
        head, detail = _describe(error, root, source)
        details.setdefault(head, []).append(detail)
    return "; ".join(head + (": " + " or ".join(d for d in parts if d) if any(parts) else "") for head, parts in details.items())


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Parse and validate a recipe file; every failure is a RecipeError naming the field and line."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {source}", hint="check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {source}: {exc}") from None
    try:
        data = yaml.safe_load(text)  # refuses python/* tags and any other unsafe construction
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # the node tree keeps line numbers
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{source}{line}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of keys to values, got {type(data).__name__}")
    try:
        # JSON mode keeps strict typing (no "4" for 4) while accepting YAML lists for tuples.
        recipe = Recipe.model_validate_json(json.dumps(data, default=str))
    except ValidationError as exc:
        raise RecipeError(_messages(exc.errors(), root, source)) from None

    def checkpoint_folder(role: str) -> Path:
        folder = (source.parent / getattr(recipe, role).checkpoint).resolve()
        if not folder.is_dir():
            line = _line_of(root, (role, "checkpoint"))
            raise RecipeError(
                f"{source}:{line}: field '{role}.checkpoint': checkpoint folder not found: {folder}",
                hint="paths are relative to the recipe file",
            )
        return folder

    calibration = recipe.calibrate.text
    if calibration != STDLIB_HELDOUT and not (source.parent / calibration).exists():
        line = _line_of(root, ("calibrate", "text"))
        raise RecipeError(f"{source}:{line}: field 'calibrate.text': calibration text not found: {source.parent / calibration}")

    tiered = recipe.partition.hot_share is not None or recipe.partition.hot_count is not None
    for location, settings in (("quantize",), recipe.quantize), (("main", "quantize"), recipe.main.quantize), (("draft", "quantize"), recipe.draft.quantize):
        if settings is None:
            continue

        def field(key: str, location: tuple[str, ...] = location) -> str:
            return f"{source}:{_line_of(root, (*location, key))}: field '{'.'.join((*location, key))}'"

        if settings.hot_experts is not None and not tiered:
            raise RecipeError(f"{field('hot_experts')}: there is no hot tier to apply it to", hint="set partition.hot_share or partition.hot_count")
        if settings.kv_cache == "int8":
            kv_cache = field("kv_cache")
            # ONNX Runtime's CPU attention reads an INT8 cache beside float32 activations; TensorRT engines
            # keep their own cache, in tensorrt.precision.
            if recipe.export.precision != "fp32":
                raise RecipeError(f"{kv_cache}: an int8 KV cache needs export.precision: fp32")
            if "tensorrt" in recipe.targets:
                raise RecipeError(
                    f"{kv_cache}: an int8 KV cache is for the cpu target only",
                    hint="TensorRT engines keep their KV cache in tensorrt.precision; build the int8 cache from a cpu-only recipe",
                )

    return LoadedRecipe(
        recipe=recipe,
        path=source.resolve(),
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        main_checkpoint=checkpoint_folder("main"),
        draft_checkpoint=checkpoint_folder("draft"),
    )


def calibration_text(loaded: LoadedRecipe) -> str:
    """The calibration text a recipe names: the held-out standard library, one file, or every text file of a folder."""
    text = loaded.recipe.calibrate.text
    if text == STDLIB_HELDOUT:
        paths = corpus.stdlib_files("heldout")
    else:
        target = loaded.path.parent / text
        paths = sorted(p for p in target.rglob("*") if p.is_file() and p.suffix in (".py", ".txt", ".md")) if target.is_dir() else [target]
    return "\n".join(corpus.read_text(path) for path in paths)


def recipe_json(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain JSON data, for the manifest and cache keys."""
    return json.loads(recipe.model_dump_json())
