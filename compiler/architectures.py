"""The architecture registry: each supported family is a description over shared building blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compiler.errors import CheckpointError


@dataclass(frozen=True)
class MoeLayout:
    """Where a family keeps its routed experts and how it routes."""

    block: str  # the MLP module name inside a layer: "mlp" or "block_sparse_moe"
    gate: str  # projection names inside one expert
    up: str
    down: str
    renormalize: bool | None  # renormalise the top-k weights; None: read `norm_topk_prob` from config.json
    shared_expert: bool = False  # a dense expert every token uses, scaled by sigmoid(shared_expert_gate)


@dataclass(frozen=True)
class Architecture:
    """What distinguishes one decoder family from another; everything else is shared."""

    name: str
    hf_class: str  # the `architectures` entry of config.json
    qk_norm: bool  # RMSNorm over each head of q and k before RoPE
    attention_bias: bool | None  # bias on q, k, v; None: read `attention_bias` from config.json
    moe: MoeLayout | None = None


_SWIGLU_NAMES = dict(gate="gate_proj", up="up_proj", down="down_proj")

REGISTRY: dict[str, Architecture] = {
    arch.hf_class: arch
    for arch in (
        Architecture("qwen3_moe", "Qwen3MoeForCausalLM", qk_norm=True, attention_bias=None, moe=MoeLayout("mlp", renormalize=None, **_SWIGLU_NAMES)),
        Architecture(
            "qwen2_moe", "Qwen2MoeForCausalLM", qk_norm=False, attention_bias=True,
            moe=MoeLayout("mlp", renormalize=None, shared_expert=True, **_SWIGLU_NAMES),
        ),
        Architecture("mixtral", "MixtralForCausalLM", qk_norm=False, attention_bias=False, moe=MoeLayout("block_sparse_moe", "w1", "w3", "w2", renormalize=True)),
        Architecture("qwen3", "Qwen3ForCausalLM", qk_norm=True, attention_bias=None),
        Architecture("qwen2", "Qwen2ForCausalLM", qk_norm=False, attention_bias=True),
        Architecture("llama", "LlamaForCausalLM", qk_norm=False, attention_bias=None),
    )
}


@dataclass(frozen=True)
class ModelDims:
    """Sizes and options read from config.json, in the names the graph builder uses."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width, or each expert's width on an MoE
    num_experts: int  # 0 on a dense model
    experts_per_token: int
    norm_topk_prob: bool
    shared_expert_size: int  # 0 without a shared expert
    attention_bias: bool
    rope: RopeScaling
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int


def architecture_of(config: dict[str, Any]) -> Architecture:
    names = config.get("architectures") or []
    for name in names:
        if name in REGISTRY:
            return REGISTRY[name]
    if not names:  # a config saved without a model (Config.save_pretrained): its model_type, as transformers' Auto classes read it
        for arch in REGISTRY.values():
            if arch.name == config.get("model_type"):
                return arch
    supported = ", ".join(sorted(REGISTRY))
    raise CheckpointError(f"unsupported architecture {names or config.get('model_type')!r}; supported: {supported}")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequencies: the default, or a scaling that stretches them for longer contexts."""

    theta: float
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


_ROPE_KINDS = ("default", "linear", "llama3")


def _rope(config: dict[str, Any]) -> RopeScaling:
    # transformers 5 nests RoPE settings under rope_parameters; transformers 4 has rope_theta at the top
    # and the scaling under rope_scaling (with "type" in older files).
    parameters = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = parameters.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise CheckpointError("config.json has no rope_theta (nor rope_parameters.rope_theta)")
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if kind not in _ROPE_KINDS:
        raise CheckpointError(f"RoPE scaling {kind!r} is not supported yet; supported: {', '.join(_ROPE_KINDS)}")
    return RopeScaling(
        theta=float(theta),
        kind=kind,
        factor=float(parameters.get("factor", 1.0)),
        low_freq_factor=float(parameters.get("low_freq_factor", 1.0)),
        high_freq_factor=float(parameters.get("high_freq_factor", 4.0)),
        original_max_positions=int(parameters.get("original_max_position_embeddings") or config.get("max_position_embeddings", 8192)),
    )


def dims_of(arch: Architecture, config: dict[str, Any]) -> ModelDims:
    def need(*keys: str) -> Any:
        # The first spelling present wins: transformers 4 and 5 name some fields differently.
        for key in keys:
            if config.get(key) is not None:
                return config[key]
        raise CheckpointError(f"config.json lacks {keys[0]!r}, which {arch.hf_class} needs")

    moe = arch.moe
    if moe is not None and (config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1):
        raise CheckpointError(f"{arch.hf_class} with dense layers between MoE layers (mlp_only_layers, decoder_sparse_step) is not supported yet")
    num_heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    if moe is None:
        renormalize = False
    elif moe.renormalize is None:
        renormalize = bool(config.get("norm_topk_prob", False))
    else:
        renormalize = moe.renormalize
    return ModelDims(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_layers=int(need("num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or hidden // num_heads),
        intermediate_size=int(need("moe_intermediate_size", "intermediate_size") if moe else need("intermediate_size")),
        num_experts=int(need("num_experts", "num_local_experts")) if moe else 0,
        experts_per_token=int(need("num_experts_per_tok")) if moe else 0,
        norm_topk_prob=renormalize,
        shared_expert_size=int(need("shared_expert_intermediate_size")) if moe and moe.shared_expert else 0,
        attention_bias=arch.attention_bias if arch.attention_bias is not None else bool(config.get("attention_bias", False)),
        rope=_rope(config),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
    )


def _swiglu(prefix: str, names: MoeLayout | None, width: int, hidden: int) -> dict[str, tuple[int, ...]]:
    gate, up, down = (names.gate, names.up, names.down) if names else ("gate_proj", "up_proj", "down_proj")
    return {f"{prefix}{gate}.weight": (width, hidden), f"{prefix}{up}.weight": (width, hidden), f"{prefix}{down}.weight": (hidden, width)}


def expected_tensors(arch: Architecture, dims: ModelDims) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must hold, with its shape (all experts of all layers)."""
    h, d, v = dims.hidden_size, dims.head_dim, dims.vocab_size
    q, kv = dims.num_heads * d, dims.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not dims.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for layer in range(dims.num_layers):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
        }
        if dims.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,)}
        if arch.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
        moe = arch.moe
        if moe is None:
            shapes |= _swiglu(p + "mlp.", None, dims.intermediate_size, h)
            continue
        block = f"{p}{moe.block}."
        shapes[block + "gate.weight"] = (dims.num_experts, h)
        for expert in range(dims.num_experts):
            shapes |= _swiglu(f"{block}experts.{expert}.", moe, dims.intermediate_size, h)
        if moe.shared_expert:
            shapes |= _swiglu(block + "shared_expert.", None, dims.shared_expert_size, h)
            shapes[block + "shared_expert_gate.weight"] = (1, h)
    return shapes
