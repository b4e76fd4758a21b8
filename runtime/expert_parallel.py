"""Expert parallelism on ONNX Runtime: the main model cut at its MoE layers, each partition's experts run apart.

A partitioned artifact lists, per MoE layer, where the cut goes (ExpertLayer in the manifest): the dense
part of the model computes the layer's tokens, router logits and mixing weights (each token's routing
weights, zero outside its top k); every partition turns the tokens that selected one of its experts into
its share of the layer's output; the shares add up, in the order the whole model adds them, to the value
the dense part continues from. So the dense part becomes one session per segment between MoE layers
(segment s holds the attention of layer s and its KV cache), and each partition a worker that receives
only the rows of its tokens. On CPU this is the correctness reference for multi-device serving, where a
worker is one device; the dispatch (rows selected, shares scattered back and summed) is what a serving
system's all-to-all does.

Each sub-model is cut from the artifact's graph by onnx.utils.Extractor; its weights stay in the
artifact's data files, which ONNX Runtime reads from the model's folder. A worker holds one session per
MoE layer: ONNX Runtime needs every input of a session on each call, and a layer's experts run when
that layer's tokens arrive.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort

from runtime.artifact import ExpertLayer, ModelEntry
from runtime.decoder import POSITIONS_INPUT, KvCache, KvState, check_external_data, check_inputs, check_last, positions_input, right_padded, session_options
from runtime.errors import ArtifactError
from runtime.kernels.session import EXTERNAL_FOLDER, Kernels, use_kernels



@dataclass(frozen=True)
class SubModel:
    """A session over part of the graph, and the names it takes and gives."""

    session: ort.InferenceSession
    inputs: list[str]
    outputs: list[str]


def _typed(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """The model with a type for each of the cut's values: from ONNX shape inference, else (outputs of contrib
    ops, which it skips) the element type of the producer's first typed input, as for every contrib op moecc uses."""
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types |= {t.name: t.data_type for t in graph.initializer}
    for node in graph.node:
        for output in node.output:
            if output and output not in types:
                first = next((types[name] for name in node.input if name in types), None)
                if first is not None:
                    types[output] = first
    for name in sorted(names - {v.name for v in (*graph.input, *graph.output, *graph.value_info)}):
        if name not in types:
            raise ArtifactError(f"expert-parallel cut: no type known for value {name!r} of the main model")
        graph.value_info.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    return model


def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    return {output: index for index, node in enumerate(graph.node) for output in node.output if output}


def _expert_nodes(graph: onnx.GraphProto, producers: dict[str, int], layer: ExpertLayer) -> set[int]:
    """Nodes between the layer's cut inputs and its output: the experts of every partition and the sum of their shares.

    Refused when they are not a closed piece of the graph (they read a value other than the cut's inputs and
    constants, or a value they compute is read elsewhere): the workers could not compute them apart."""
    stop = {layer.tokens, layer.router_logits, layer.mixing}
    graph_inputs = {value.name for value in graph.input}
    found, pending = set(), [layer.output]
    while pending:
        name = pending.pop()
        if name in graph_inputs:
            raise ArtifactError(f"expert-parallel cut: the experts of layer {layer.layer} read the model input {name!r}")
        if name in stop or name not in producers or producers[name] in found:
            continue
        found.add(producers[name])
        pending += graph.node[producers[name]].input
    inside = {output for index in found for output in graph.node[index].output} - {layer.output}
    for index, node in enumerate(graph.node):
        if index not in found and inside.intersection(node.input):
            raise ArtifactError(f"expert-parallel cut: node {node.name or node.op_type}, outside the experts of layer {layer.layer}, reads a value they compute")
    return found


def _segments(graph: onnx.GraphProto, layers: list[ExpertLayer]) -> list[tuple[list[str], list[str], list[str]]]:
    """(inputs, outputs, KV outputs) of the dense segments: segment s runs after the experts of layers[s-1] and
    before those of layers[s]; its outputs are what later parts read, and the logits."""
    producers = _producers(graph)
    for layer in layers:
        for name in (layer.tokens, layer.router_logits, layer.mixing, layer.output, *(o for p in layer.partitions for o in p.outputs)):
            if name not in producers:
                raise ArtifactError(f"expert-parallel cut: layer {layer.layer} names value {name!r}, which the main model does not compute")
    experts = set().union(*(_expert_nodes(graph, producers, layer) for layer in layers))
    segment_of_value = {layer.output: position + 1 for position, layer in enumerate(layers)}
    segment_of_node: dict[int, int] = {}
    for index, node in enumerate(graph.node):  # nodes are stored in topological order
        if index in experts:
            continue
        segment = max((segment_of_value.get(name, 0) for name in node.input if name), default=0)
        segment_of_node[index] = segment
        for output in node.output:
            segment_of_value[output] = segment
    initializers = {t.name for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    segments = []
    for segment in range(len(layers) + 1):
        nodes = [graph.node[i] for i, s in segment_of_node.items() if s == segment]
        produced = {o for node in nodes for o in node.output if o}
        inputs = sorted({name for node in nodes for name in node.input if name and name not in produced and name not in initializers})
        consumed_elsewhere = {name for i, node in enumerate(graph.node) if segment_of_node.get(i) != segment for name in node.input}
        outputs = sorted(name for name in produced if name in consumed_elsewhere or name == "logits")
        segments.append((inputs, outputs, sorted(name for name in produced & graph_outputs if name != "logits")))
    return segments


class ExpertParallelDecoder:
    """The main model as dense segments and one worker per partition; caches are KvCaches whose calls run the cut model."""

    chains_greedily = False  # proposals are a draft's, one call each (KvCache.greedy_chain)

    def __init__(self, artifact: Path, entry: ModelEntry, allowed_files: set[str], threads: int | None = None, kernels: Kernels = "auto"):
        if not entry.expert_layers:
            raise ArtifactError(
                f"{artifact}: the main model's experts are not partitioned", hint="build with partition.partitions > 1, or load with placement='single'"
            )
        model_path = artifact / entry.path
        model = check_external_data(artifact, entry.path, allowed_files)  # the data stays on disk, read by ONNX Runtime
        check_inputs(model_path, model)
        options = session_options(entry.session_options, threads)
        options.add_session_config_entry(EXTERNAL_FOLDER, str(model_path.parent))
        self.kernels = use_kernels(model_path, model, entry.head_dim, options, kernels)
        layers = entry.expert_layers
        segments = _segments(model.graph, layers)
        cut = {name for inputs, outputs, _ in segments for name in (*inputs, *outputs)}
        cut |= {name for layer in layers for name in (layer.tokens, layer.router_logits, layer.mixing, *(o for p in layer.partitions for o in p.outputs))}
        extractor = onnx.utils.Extractor(_typed(model, cut))

        def open_part(inputs: list[str], outputs: list[str], kv_outputs: tuple[str, ...] = ()) -> SubModel:
            part = extractor.extract_model(inputs, [*outputs, *kv_outputs])
            used = {name for node in part.graph.node for name in node.input}
            if not used.issuperset(inputs):  # e.g. float experts read the mixing weights, not the router logits
                inputs = [name for name in inputs if name in used]
                part = extractor.extract_model(inputs, [*outputs, *kv_outputs])
            session = ort.InferenceSession(part.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return SubModel(session, inputs, outputs)

        self.entry = entry
        self.layers = layers
        # Traffic: token rows sent to each (partition, position of the layer), and tokens through each layer.
        self.rows_sent: Counter[tuple[int, int]] = Counter()
        self.tokens_seen: Counter[int] = Counter()
        self._count = threading.Lock()
        self.segments = [open_part(inputs, outputs, kv) for inputs, outputs, kv in segments]
        # A partition's worker: its experts of each layer, by (partition, position of the layer).
        self.experts = {
            (part.partition, position): open_part([layer.tokens, layer.router_logits, layer.mixing], part.outputs)
            for position, layer in enumerate(layers) for part in layer.partitions
        }

    def new_cache(self, capacity: int | None = None) -> KvCache:
        return KvCache(self, capacity or self.entry.max_sequence_length)

    def partitions_per_token(self) -> float:
        """Partitions a token was sent to per MoE layer, on average so far: copies of its hidden state sent out (and back)."""
        with self._count:
            return sum(self.rows_sent.values()) / max(1, sum(self.tokens_seen.values()))

    def bind(self, batch: int, capacity: int) -> SegmentBuffers:
        return SegmentBuffers(self, batch, capacity)

    def dispatch(self, position: int, values: dict[str, np.ndarray], real: np.ndarray) -> np.ndarray:
        """One MoE layer: each partition's worker gets the rows whose top k includes one of its experts; returns
        the summed shares. `real` marks the token rows that are not a padded call's padding (left at zero)."""
        layer = self.layers[position]
        tokens, mixing = values[layer.tokens], values[layer.mixing]
        selected = [np.flatnonzero(real & (mixing[:, part.columns] != 0).any(axis=1)) for part in layer.partitions]
        with self._count:
            self.tokens_seen[position] += int(real.sum())
            for part, rows in zip(layer.partitions, selected):
                self.rows_sent[part.partition, position] += rows.size
        total = None
        for part, rows in zip(layer.partitions, selected):
            worker = self.experts[part.partition, position]
            if rows.size:
                feeds = {name: np.ascontiguousarray(values[name][rows]) for name in worker.inputs}
                results = worker.session.run(worker.outputs, feeds)
            else:
                results = []
            for index in range(len(part.outputs)):
                share = np.zeros_like(tokens)
                if rows.size:
                    share[rows] = results[index]
                total = share if total is None else total + share
        return total


class SegmentBuffers:
    """One cache's KvState, each layer's buffers bound as past and present of the segment holding its attention."""

    def __init__(self, decoder: ExpertParallelDecoder, batch: int, capacity: int):
        self.decoder = decoder
        self.state = KvState(decoder.entry, batch, capacity)
        self.bindings = []
        for segment in decoder.segments:
            binding = segment.session.io_binding()
            for name in segment.outputs:  # bound first, so get_outputs() starts with them in this order
                binding.bind_output(name, "cpu")
            self.state.bind(binding, set(segment.inputs))
            self.bindings.append(binding)

    def run(self, rows: list[list[int]], cached: list[int], last: list[int]) -> np.ndarray:
        """One call through every segment and partition: each row's new tokens after its `cached` ones; returns
        the logits [B,N,V] at each row's last[row] last new tokens (as BoundBuffers.run)."""
        new = [len(tokens) for tokens in rows]
        check_last(new, last)
        input_ids = right_padded(rows, max(new))
        self.state.set_lengths(cached, new, input_ids.shape[1])
        real = (np.arange(input_ids.shape[1]) < np.asarray(new)[:, None]).reshape(-1)  # token rows [B*S] of the MoE layers
        values = {"input_ids": input_ids, POSITIONS_INPUT: positions_input(new, last)}
        decoder = self.decoder
        for position, (segment, binding) in enumerate(zip(decoder.segments, self.bindings)):
            if position:
                layer = decoder.layers[position - 1]
                values[layer.output] = decoder.dispatch(position - 1, values, real)
            for name in segment.inputs:
                if name in values:
                    binding.bind_cpu_input(name, values[name])
            for name in segment.outputs:  # ONNX Runtime allocates them at this call's shapes
                binding.bind_output(name, "cpu")
            segment.session.run_with_iobinding(binding)
            values.update(zip(segment.outputs, (value.numpy() for value in binding.get_outputs()[: len(segment.outputs)])))
        return values["logits"]
