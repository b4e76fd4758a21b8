"""The architecture registry: each supported family is a description over shared building blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compiler.errors import CheckpointError


@dataclass(frozen=True)
class Architecture:
    """What distinguishes one decoder family from another; everything else is shared."""

    name: str
    hf_class: str  # the `architectures` entry of config.json
    qk_norm: bool  # RMSNorm over each head of q and k before RoPE
    moe: bool  # every layer's MLP is a routed mixture of experts
    norm_topk_prob_default: bool = True


REGISTRY: dict[str, Architecture] = {
    arch.hf_class: arch
    for arch in (
        Architecture(name="qwen3_moe", hf_class="Qwen3MoeForCausalLM", qk_norm=True, moe=True),
        Architecture(name="qwen3", hf_class="Qwen3ForCausalLM", qk_norm=True, moe=False),
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
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int


def architecture_of(config: dict[str, Any]) -> Architecture:
    names = config.get("architectures") or []
    for name in names:
        if name in REGISTRY:
            return REGISTRY[name]
    supported = ", ".join(sorted(REGISTRY))
    raise CheckpointError(f"unsupported architecture {names or config.get('model_type')!r}; supported: {supported}")


def _rope_theta(config: dict[str, Any]) -> float:
    # transformers 5 nests RoPE settings under rope_parameters; transformers 4 has rope_theta at the top.
    parameters = config.get("rope_parameters") or {}
    theta = parameters.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise CheckpointError("config.json has no rope_theta (nor rope_parameters.rope_theta)")
    rope_type = parameters.get("rope_type", "default")
    if rope_type != "default":
        raise CheckpointError(f"RoPE scaling {rope_type!r} is not supported yet; supported: default")
    return float(theta)


def dims_of(arch: Architecture, config: dict[str, Any]) -> ModelDims:
    def need(*keys: str) -> Any:
        # The first spelling present wins: transformers 4 and 5 name some fields differently.
        for key in keys:
            if key in config:
                return config[key]
        raise CheckpointError(f"config.json lacks {keys[0]!r}, which {arch.hf_class} needs")

    num_heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    return ModelDims(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_layers=int(need("num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads", num_heads)),
        head_dim=int(config.get("head_dim") or hidden // num_heads),
        intermediate_size=int(need("moe_intermediate_size") if arch.moe else need("intermediate_size")),
        num_experts=int(need("num_experts", "num_local_experts")) if arch.moe else 0,
        experts_per_token=int(need("num_experts_per_tok")) if arch.moe else 0,
        norm_topk_prob=bool(config.get("norm_topk_prob", arch.norm_topk_prob_default)),
        rope_theta=_rope_theta(config),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
    )


def expected_tensors(arch: Architecture, dims: ModelDims) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must hold, with its shape (all experts of all layers)."""
    h, d, v = dims.hidden_size, dims.head_dim, dims.vocab_size
    q, kv, inter = dims.num_heads * d, dims.num_kv_heads * d, dims.intermediate_size
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
        if arch.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
        mlps = [f"{p}mlp.experts.{e}." for e in range(dims.num_experts)] if arch.moe else [p + "mlp."]
        if arch.moe:
            shapes[p + "mlp.gate.weight"] = (dims.num_experts, h)
        for mlp in mlps:
            shapes |= {mlp + "gate_proj.weight": (inter, h), mlp + "up_proj.weight": (inter, h), mlp + "down_proj.weight": (h, inter)}
    return shapes
