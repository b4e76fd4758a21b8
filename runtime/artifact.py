"""The artifact format: manifest schema, and the checks that run before anything in an artifact is deserialized."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from runtime.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"  # optional: a signature of the manifest (which lists every other file's digest)
_REBUILD = "rebuild it with `moecc build RECIPE`"


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Record):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


# ONNX Runtime session settings an artifact may ask for, and their allowed values: nothing else is applied.
SESSION_OPTIONS = {
    # Keep DequantizeLinear -> MatMul in float: the fused integer kernel's results for a token change with
    # how many tokens share the call, which would make speculative verification differ from plain decoding.
    "session.disable_quant_qdq": {"1"},
}


Range = tuple[int, int, int]  # min, opt, max


class EngineProfile(_Record):
    """One optimization profile: the shapes an engine is built for; the runtime picks a profile by tokens per call."""

    name: Literal["prefill", "decode", "verify"]
    batch: Range
    tokens: Range  # new tokens per row and call
    past: Range  # cached tokens per row


class EngineEntry(_Record):
    """A serialized TensorRT engine of one model, and what it was built by and for (checked before it is deserialized)."""

    path: str  # the engine file
    onnx_path: str  # the lowered ONNX model it was built from (appended-KV contract, standard ops)
    layers_path: str  # the network's layers as parsed, one per line
    flavour: Literal["tensorrt", "tensorrt_rtx"]
    version: str
    compute_capabilities: list[str]  # e.g. sm86; empty: the GPU it was built on (full TensorRT)
    precision: Literal["fp16", "fp32"]  # of activations and the KV cache
    profiles: list[EngineProfile]
    builder_flags: list[str]
    build_seconds: float
    size: int


class PartitionOutputs(_Record):
    """One partition's experts in one MoE layer: which columns of the layer's mixing weights are theirs, and the values
    holding their share of the layer's output (one per precision among them)."""

    partition: int
    columns: list[int]  # positions of the partition's experts among the layer's (kept) experts
    outputs: list[str]


class ExpertLayer(_Record):
    """Where a partitioned MoE layer can be cut: the values entering its experts and the one their shares add up to.

    mixing holds each token's routing weights over the layer's experts, zero outside its top k; the output is
    the sum of every partition's outputs, in the listed order.
    """

    layer: int
    tokens: str  # [T, hidden]
    router_logits: str  # [T, experts]
    mixing: str  # [T, experts]
    output: str  # [T, hidden]
    partitions: list[PartitionOutputs]


class ModelEntry(_Record):
    """One exported decoder: where it is and what the runtime needs to drive its KV cache."""

    path: str
    architecture: str
    precision: str  # of the weights, e.g. fp32, fp16, int4-rtn-b32
    activations: Literal["fp32", "fp16"]  # dtype of activations (and of the KV cache unless kv_cache says otherwise)
    kv_cache: Literal["fp32", "fp16", "int8"] | None = None  # dtype of the KV cache; None (older manifests): the activations'
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_sequence_length: int
    parameters: int
    session_options: dict[str, str] = {}  # keys and values from SESSION_OPTIONS
    engine: EngineEntry | None = None  # the tensorrt target's engine, when the recipe builds one
    expert_layers: list[ExpertLayer] = []  # the MoE layers' cuts, when the experts are split over partitions

    @property
    def kv_precision(self) -> str:
        return self.kv_cache or self.activations

    @field_validator("session_options")
    @classmethod
    def _known_session_options(cls, options: dict[str, str]) -> dict[str, str]:
        for key, value in options.items():
            if value not in SESSION_OPTIONS.get(key, set()):
                raise ValueError(f"session option {key}={value!r} is not one moecc applies")
        return options


class StageRecord(_Record):
    model: str
    stage: str
    config: dict[str, Any]
    result: dict[str, Any]
    seconds: float
    cached: bool
    cache_key: str


class GenerationEntry(_Record):
    draft_length: int | Literal["auto"]  # auto: chosen per step from measured acceptance and call costs
    max_draft_length: int = 8  # the longest an automatic draft length may be (a prompt lookup's, every step)
    max_new_tokens: int
    temperature: float
    eos_token_id: int | None


class Manifest(_Record):
    schema_version: Literal[1]
    name: str
    moecc_version: str
    recipe: dict[str, Any]
    recipe_sha256: str
    inputs: dict[str, dict[str, str]]  # model role -> checkpoint file -> sha256
    tools: dict[str, str]
    stages: list[StageRecord]
    models: dict[str, ModelEntry]
    tokenizer: str
    generation: GenerationEntry
    files: dict[str, FileEntry]


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_relative(name: str) -> None:
    pure = PurePosixPath(name)
    if not name or "\\" in name or pure.is_absolute() or ".." in pure.parts or name != pure.as_posix():
        raise ArtifactError(f"manifest lists a path outside the artifact: {name!r}", hint=_REBUILD)


def _listing(root: Path) -> set[str]:
    """Every file under root as a relative POSIX path; a symlink or a hard link anywhere is refused.

    A hard link can make an artifact file the same file as one outside the artifact (ONNX's CVE-2024-27318
    read files through them), and a change to either would change the other after the digests were checked.
    """
    found = set()
    for folder, subfolders, files in os.walk(root):
        for entry in (*subfolders, *files):
            path = Path(folder, entry)
            info = path.lstat()
            mode = info.st_mode
            if stat.S_ISLNK(mode):
                raise ArtifactError(f"{path}: symbolic links are not allowed in an artifact", hint=_REBUILD)
            if entry in files and not stat.S_ISREG(mode):
                raise ArtifactError(f"{path}: not a regular file", hint=_REBUILD)
            if entry in files and info.st_nlink > 1:
                raise ArtifactError(f"{path}: hard links are not allowed in an artifact", hint="copy the artifact instead of linking its files")
            if entry in files:
                found.add(path.relative_to(root).as_posix())
    return found


def read_manifest(root: Path) -> Manifest:
    """Parse and validate manifest.json without checking the files it lists."""
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifact directory", hint=_REBUILD)
    if path.is_symlink() or not path.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST_NAME}; this is not a finished artifact", hint=_REBUILD)
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest ({exc})", hint=_REBUILD) from None
    if isinstance(data, dict) and data.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: manifest schema version {data.get('schema_version')!r}, this runtime reads {SCHEMA_VERSION}", hint=_REBUILD
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ArtifactError(f"{path}: invalid manifest: field '{field}': {first['msg']}", hint=_REBUILD) from None


def verify_artifact(root: str | Path) -> Manifest:
    """Check schema, paths, symlinks, sizes and digests of every file; raise ArtifactError on the first problem."""
    root = Path(root)
    manifest = read_manifest(root)
    for name in manifest.files:
        _check_relative(name)
    present = _listing(root) - {MANIFEST_NAME, SIGNATURE_NAME}
    missing = sorted(set(manifest.files) - present)
    if missing:
        raise ArtifactError(f"{root}: file {missing[0]} listed in the manifest is missing", hint=_REBUILD)
    unlisted = sorted(present - set(manifest.files))
    if unlisted:
        raise ArtifactError(f"{root}: file {unlisted[0]} is not listed in the manifest", hint=_REBUILD)
    engines = [model.engine for model in manifest.models.values() if model.engine is not None]
    referenced = [model.path for model in manifest.models.values()] + [manifest.tokenizer]
    referenced += [path for engine in engines for path in (engine.path, engine.onnx_path, engine.layers_path)]
    for name in referenced:
        _check_relative(name)
        if name not in manifest.files:
            raise ArtifactError(f"{root}: manifest refers to {name}, which it does not list", hint=_REBUILD)
    for name, entry in sorted(manifest.files.items()):
        path = root / name
        size = path.stat().st_size
        if size != entry.size:
            raise ArtifactError(f"{path}: size {size} bytes, manifest says {entry.size}; the file is truncated or altered", hint=_REBUILD)
        if sha256_of(path) != entry.sha256:
            raise ArtifactError(f"{path}: sha256 does not match the manifest; the file was altered", hint=_REBUILD)
    return manifest
