"""The shared decoder graph builder: one function per building block, weights streamed lazily.

Legend for shape comments: B batch, S new tokens, P cache capacity, T = B*S tokens, H hidden,
Q query width (heads*D), K key/value width (kv heads*D), D head dim, E experts, I expert width, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import onnx_ir as ir

from compiler.architectures import Architecture, ModelDims, MoeLayout, RopeScaling

OPSET = 21
MS_DOMAIN = "com.microsoft"
WeightSource = Callable[[str], np.ndarray]  # reads one checkpoint tensor as float32
PRECISIONS = {"fp32": (np.float32, ir.DataType.FLOAT), "fp16": (np.float16, ir.DataType.FLOAT16)}


@dataclass(frozen=True)
class IoNames:
    """Input and output names of an exported decoder (the runtime reads them from the manifest)."""

    input_ids: str = "input_ids"
    seqlens_k: str = "seqlens_k"
    total_sequence_length: str = "total_sequence_length"
    query_seqlens: str = "query_seqlens"
    logit_positions: str = "logit_positions"
    logits: str = "logits"

    @staticmethod
    def past(layer: int, kind: str) -> str:
        return f"past_key_values.{layer}.{kind}"

    @staticmethod
    def present(layer: int, kind: str) -> str:
        return f"present.{layer}.{kind}"


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A constant registered in the graph under `name`."""
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


class _StreamedTensor(ir.LazyTensor):
    """A weight written to external data block by block (one expert at a time), never whole in memory."""

    def __init__(self, blocks: Callable[[], Iterator[np.ndarray]], dtype: np.dtype, ir_dtype: ir.DataType, shape: tuple[int, ...], name: str):
        super().__init__(lambda: ir.tensor(np.concatenate(list(self._cast(blocks())))), ir_dtype, ir.Shape(shape), name=name)
        self._blocks = blocks
        self._np_dtype = dtype

    def _cast(self, blocks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        for block in blocks:
            yield np.ascontiguousarray(block, dtype=self._np_dtype)

    def tofile(self, file) -> None:
        for block in self._cast(self._blocks()):
            file.write(block.tobytes())


class _Builder:
    """A tape plus the model's initializers, each a LazyTensor evaluated only when the model is saved."""

    def __init__(self, read: WeightSource, precision: str):
        self.tape = ir.tape.Tape()
        self.read = read
        self.dtype, self.ir_dtype = PRECISIONS[precision]  # of weights and activations
        self.initializers: list[ir.Value] = []

    def op(self, op_type: str, inputs, attributes=None, *, domain: str = "", outputs: int = 1, name: str | None = None):
        if outputs == 1:
            return self.tape.op(op_type, inputs, attributes, domain=domain, name=name)
        return self.tape.op_multi_out(op_type, inputs, attributes, domain=domain, num_outputs=outputs, name=name)

    def _add(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.initializers.append(value)
        return value

    def lazy(self, name: str, shape: tuple[int, ...], produce: Callable[[], np.ndarray]) -> ir.Value:
        # Each weight is read from the memory-mapped checkpoint and transformed only while it is written out.
        tensor = ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(produce(), dtype=self.dtype)), self.ir_dtype, ir.Shape(shape), name=name)
        return self._add(name, tensor)

    def streamed(self, name: str, shape: tuple[int, ...], blocks: Callable[[], Iterator[np.ndarray]]) -> ir.Value:
        """A weight whose bytes are produced block by block along its first axis."""
        return self._add(name, _StreamedTensor(blocks, self.dtype, self.ir_dtype, shape, name))

    def weight(self, name: str, shape: tuple[int, ...]) -> ir.Value:
        return self.lazy(name, shape, lambda: self.read(name))

    def transposed(self, name: str, shape: tuple[int, ...]) -> ir.Value:
        """A Linear weight [out, in] stored as the MatMul operand [in, out]."""
        return self.lazy(name + ".T", shape[::-1], lambda: self.read(name).T)

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        return self._add(name, ir.tensor(array, name=name))


def _linear(b: _Builder, x: ir.Value, name: str, shape: tuple[int, int], bias: bool = False) -> ir.Value:
    """x @ W^T (+ bias) for a Linear weight [out, in]."""
    y = b.op("MatMul", [x, b.transposed(name + ".weight", shape)])
    return b.op("Add", [y, b.weight(name + ".bias", shape[:1])]) if bias else y


def _rms_norm(b: _Builder, x: ir.Value, weight: str, dims: ModelDims, size: int) -> ir.Value:
    return b.op("SimplifiedLayerNormalization", [x, b.weight(weight, (size,))], {"axis": -1, "epsilon": dims.rms_norm_eps})


def _residual_rms_norm(b: _Builder, update: ir.Value, residual: ir.Value, weight: str, dims: ModelDims) -> tuple[ir.Value, ir.Value]:
    """(norm(residual + update), residual + update) in one kernel, instead of an Add and a norm per block."""
    normed, _, _, total = b.op(
        "SkipSimplifiedLayerNormalization", [update, residual, b.weight(weight, (dims.hidden_size,))], {"epsilon": dims.rms_norm_eps},
        domain=MS_DOMAIN, outputs=4,
    )
    return normed, total


def _inverse_frequencies(rope: RopeScaling, head_dim: int) -> np.ndarray:
    inv_freq = 1.0 / rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [D/2]
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        # Llama 3.1: slow the low frequencies by `factor`, keep the high ones, blend the band between.
        wavelength = 2 * np.pi / inv_freq
        low_band = rope.original_max_positions / rope.low_freq_factor
        high_band = rope.original_max_positions / rope.high_freq_factor
        smooth = (rope.original_max_positions / wavelength - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        return np.where(wavelength > low_band, inv_freq / rope.factor, np.where(wavelength < high_band, inv_freq, blended))
    return inv_freq


def _rope_caches(b: _Builder, dims: ModelDims, max_positions: int) -> tuple[ir.Value, ir.Value]:
    inv_freq = _inverse_frequencies(dims.rope, dims.head_dim)
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)  # [P, D/2]
    return b.const("rope.cos", np.cos(angles).astype(b.dtype)), b.const("rope.sin", np.sin(angles).astype(b.dtype))


def _attention(b: _Builder, arch: Architecture, dims: ModelDims, h: ir.Value, layer: int, io: dict, rope) -> ir.Value:
    p = f"model.layers.{layer}.self_attn."
    d, q_width, kv_width = dims.head_dim, dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    widths = (q_width, kv_width, kv_width)
    projections = [p + name for name in ("q_proj", "k_proj", "v_proj")]
    # One MatMul for q, k and v: a decode step reads the three weights in one pass (measured 18 % faster
    # than three MatMuls on the benchmark-size model's shapes).
    packed = b.lazy(p + "qkv_proj.weight.T", (dims.hidden_size, sum(widths)), lambda: np.concatenate([b.read(n + ".weight").T for n in projections], axis=1))
    qkv = b.op("MatMul", [h, packed])  # [B,S,Q+2K]
    if dims.attention_bias:
        qkv = b.op("Add", [qkv, b.lazy(p + "qkv_proj.bias", (sum(widths),), lambda: np.concatenate([b.read(n + ".bias") for n in projections]))])
    if arch.qk_norm:
        q, k, v = b.op("Split", [qkv, b.const(f"layers.{layer}.qkv_widths", np.array(widths, dtype=np.int64))], {"axis": -1}, outputs=3)
        per_head = b.const(f"layers.{layer}.per_head_shape", np.array([0, 0, -1, d], dtype=np.int64))
        flat = b.const(f"layers.{layer}.flat_shape", np.array([0, 0, -1], dtype=np.int64))
        q = b.op("Reshape", [_rms_norm(b, b.op("Reshape", [q, per_head]), p + "q_norm.weight", dims, d), flat])  # [B,S,Q]
        k = b.op("Reshape", [_rms_norm(b, b.op("Reshape", [k, per_head]), p + "k_norm.weight", dims, d), flat])  # [B,S,K]
    else:
        q, k, v = qkv, None, None  # GroupQueryAttention takes q, k and v packed in one input
    cos, sin = rope
    past_key, past_value = io["past"][layer]
    # Past and present share one preallocated buffer [B, kv heads, P, D] when the runtime binds them together;
    # seqlens_k tells each sequence's valid length, so a rollback only moves that length. query_seqlens tells
    # each sequence's new tokens in a right-padded call, so a batch's rows can each take several (a verify
    # block, a draft's catch-up) or none in one call.
    unused = [None] * 7  # position_ids, attention_bias, head_sink, k_scale, v_scale, q_norm_weight, k_norm_weight
    attn, present_key, present_value = b.op(
        "GroupQueryAttention",
        [q, k, v, past_key, past_value, io["seqlens_k"], io["total_sequence_length"], cos, sin, *unused, io["query_seqlens"]],
        {"num_heads": dims.num_heads, "kv_num_heads": dims.num_kv_heads, "do_rotary": 1, "rotary_interleaved": 0},
        domain=MS_DOMAIN,
        outputs=3,
    )  # [B,S,Q]
    present_key.name, present_value.name = IoNames.present(layer, "key"), IoNames.present(layer, "value")
    io["present"].extend([present_key, present_value])
    return b.op("MatMul", [attn, b.transposed(p + "o_proj.weight", (dims.hidden_size, q_width))])  # [B,S,H]


def _dense_mlp(b: _Builder, h: ir.Value, prefix: str, width: int, hidden: int) -> ir.Value:
    names = [prefix + "gate_proj.weight", prefix + "up_proj.weight"]
    # Gate and up in one MatMul, one pass over both weights per step (as for q, k and v).
    packed = b.lazy(prefix + "gate_up_proj.weight.T", (hidden, 2 * width), lambda: np.concatenate([b.read(n).T for n in names], axis=1))
    gate, up = b.op("Split", [b.op("MatMul", [h, packed]), b.const(prefix + "gate_up_widths", np.array([width, width], dtype=np.int64))], {"axis": -1}, outputs=2)
    silu = b.op("Mul", [gate, b.op("Sigmoid", [gate])])
    return _linear(b, b.op("Mul", [silu, up]), prefix + "down_proj", (hidden, width))  # [B,S,H]


def _moe_mlp(b: _Builder, layout: MoeLayout, dims: ModelDims, h: ir.Value, layer: int) -> ir.Value:
    p = f"model.layers.{layer}.{layout.block}."
    e, i, hidden = dims.num_experts, dims.intermediate_size, dims.hidden_size

    # Expert weights stream one expert at a time, so export memory does not grow with the number of experts.
    def fc1() -> Iterator[np.ndarray]:
        for expert in range(e):
            # ORT's fused SwiGLU reads fc1 rows as gate, up, gate, up, ...: interleave the two projections.
            block = np.empty((1, 2 * i, hidden), dtype=np.float32)  # [1,2I,H] of [E,2I,H]
            block[0, 0::2] = b.read(f"{p}experts.{expert}.{layout.gate}.weight")
            block[0, 1::2] = b.read(f"{p}experts.{expert}.{layout.up}.weight")
            yield block

    def fc2() -> Iterator[np.ndarray]:
        for expert in range(e):
            yield b.read(f"{p}experts.{expert}.{layout.down}.weight")[None]  # [1,H,I] of [E,H,I]

    tokens = b.op("Reshape", [h, b.const(f"layers.{layer}.tokens_shape", np.array([-1, hidden], dtype=np.int64))])  # [T,H]
    router_logits = b.op("MatMul", [tokens, b.transposed(p + "gate.weight", (e, hidden))])  # [T,E]
    mixed = b.op(
        "MoE",
        [tokens, router_logits, b.streamed(p + "experts.fc1", (e, 2 * i, hidden), fc1), None, b.streamed(p + "experts.fc2", (e, hidden, i), fc2)],
        {
            "k": dims.experts_per_token,
            "activation_type": "swiglu",
            "swiglu_fusion": 1,
            "activation_alpha": 1.0,
            "activation_beta": 0.0,
            # 1: softmax, top-k, renormalise the k weights; 0: top-k of the full softmax.
            "normalize_routing_weights": int(dims.norm_topk_prob),
        },
        domain=MS_DOMAIN,
    )  # [T,H]
    mixed = b.op("Reshape", [mixed, b.op("Shape", [h])])  # [B,S,H]
    if not layout.shared_expert:
        return mixed
    # Qwen2-MoE: a dense expert for every token, scaled by a sigmoid gate of its own.
    shared = _dense_mlp(b, h, p + "shared_expert.", dims.shared_expert_size, hidden)  # [B,S,H]
    scale = b.op("Sigmoid", [_linear(b, h, p + "shared_expert_gate", (1, hidden))])  # [B,S,1]
    return b.op("Add", [mixed, b.op("Mul", [shared, scale])])


def build_decoder(arch: Architecture, dims: ModelDims, read: WeightSource, max_sequence_length: int, precision: str = "fp32") -> ir.Model:
    """The decoder with KV cache as an ONNX model whose weights are read from `read` only when saved.

    Weights, activations and the KV cache are in `precision`; logits are always float32.
    """
    b = _Builder(read, precision)
    batch, seq, past = ir.SymbolicDim("batch"), ir.SymbolicDim("sequence"), ir.SymbolicDim("past_sequence")
    names = IoNames()
    input_ids = ir.Value(name=names.input_ids, shape=ir.Shape([batch, seq]), type=ir.TensorType(ir.DataType.INT64))
    seqlens_k = ir.Value(name=names.seqlens_k, shape=ir.Shape([batch]), type=ir.TensorType(ir.DataType.INT32))
    total = ir.Value(name=names.total_sequence_length, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT32))
    query_seqlens = ir.Value(name=names.query_seqlens, shape=ir.Shape([batch]), type=ir.TensorType(ir.DataType.INT32))
    # GatherND's indices: no Unsqueeze node in every call (a node costs a small model a few microseconds).
    logit_positions = ir.Value(name=names.logit_positions, shape=ir.Shape([batch, ir.SymbolicDim("kept"), 1]), type=ir.TensorType(ir.DataType.INT64))
    kv_shape = ir.Shape([batch, dims.num_kv_heads, past, dims.head_dim])
    io = {
        "seqlens_k": seqlens_k,
        "total_sequence_length": total,
        "query_seqlens": query_seqlens,
        "past": [
            tuple(ir.Value(name=IoNames.past(layer, kind), shape=kv_shape, type=ir.TensorType(b.ir_dtype)) for kind in ("key", "value"))
            for layer in range(dims.num_layers)
        ],
        "present": [],
    }
    rope = _rope_caches(b, dims, max_sequence_length)
    x = b.op("Gather", [b.weight("model.embed_tokens.weight", (dims.vocab_size, dims.hidden_size)), input_ids])  # [B,S,H]
    h = _rms_norm(b, x, "model.layers.0.input_layernorm.weight", dims, dims.hidden_size)  # x: the residual stream, h: its norm
    for layer in range(dims.num_layers):
        p = f"model.layers.{layer}."
        h, x = _residual_rms_norm(b, _attention(b, arch, dims, h, layer, io, rope), x, p + "post_attention_layernorm.weight", dims)
        mlp = _moe_mlp(b, arch.moe, dims, h, layer) if arch.moe else _dense_mlp(b, h, p + "mlp.", dims.intermediate_size, dims.hidden_size)
        following = f"model.layers.{layer + 1}.input_layernorm.weight" if layer + 1 < dims.num_layers else "model.norm.weight"
        h, x = _residual_rms_norm(b, mlp, x, following, dims)
    # Logits only at the positions the caller asks for (N per row, e.g. a prompt's last token and a verify
    # block's k + 1): the head is the largest matrix of a small model and a prompt's logits over a 152k
    # vocabulary would take gigabytes, while the decoding loop reads a handful of rows.
    h = b.op("GatherND", [h, logit_positions], {"batch_dims": 1})  # [B,N,H]
    head = "model.embed_tokens.weight" if dims.tie_word_embeddings else "lm_head.weight"
    logits = b.op("MatMul", [h, b.transposed(head, (dims.vocab_size, dims.hidden_size))])
    if b.ir_dtype != ir.DataType.FLOAT:
        logits = b.op("Cast", [logits], {"to": ir.DataType.FLOAT})
    logits.name = names.logits  # [B,N,V]

    graph = ir.Graph(
        inputs=[input_ids, seqlens_k, total, query_seqlens, logit_positions, *(value for pair in io["past"] for value in pair)],
        outputs=[logits, *io["present"]],
        nodes=b.tape.nodes,
        initializers=b.initializers,
        opset_imports={"": OPSET, MS_DOMAIN: 1},
        name=arch.name,
    )
    return ir.Model(graph, ir_version=10, producer_name="moecc")
