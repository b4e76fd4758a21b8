"""One exported decoder on ONNX Runtime, and its KV cache: preallocated, bound in place, rolled back by length."""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from runtime.artifact import ModelEntry
from runtime.errors import ArtifactError
from runtime.kernels.fused_decoder import GREEDY_STEPS, GREEDY_TOKENS, MAX_CHAIN
from runtime.kernels.session import Kernels, open_session

KV_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}
SPIN_AFTER_CALL_US = 100
LENGTH_INPUTS = ("seqlens_k", "total_sequence_length", "query_seqlens")  # the lengths GroupQueryAttention reads
POSITIONS_INPUT = "logit_positions"  # [B, N, 1]: the positions of a call whose logits it returns, N per row


def kv_names(num_layers: int) -> list[tuple[str, str]]:
    """(past input, present output) names per layer and kind, in the model's order."""
    return [(f"past_key_values.{layer}.{kind}", f"present.{layer}.{kind}") for layer in range(num_layers) for kind in ("key", "value")]


def kv_bytes_per_position(entry: ModelEntry) -> int:
    """Bytes the KV cache holds per token of context: every layer's key and value for each KV head."""
    return entry.num_layers * 2 * entry.num_kv_heads * entry.head_dim * np.dtype(KV_DTYPES[entry.kv_precision]).itemsize


def check_capacity(total: int, capacity: int) -> None:
    if total > capacity:
        raise ValueError(f"sequence of {total} tokens exceeds the KV cache capacity of {capacity}")


def check_external_data(artifact: Path, model: str, allowed: set[str]) -> onnx.ModelProto:
    """Refuse external-data references of the artifact's `model` that leave the artifact or name a file the
    manifest does not list; returns the model's graph without its weights."""
    model_path = artifact / model
    proto = onnx.load(str(model_path), load_external_data=False)
    folder, root = model_path.parent, artifact.resolve()
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        resolved = (folder / location).resolve()
        if not resolved.is_relative_to(root) or resolved.relative_to(root).as_posix() not in allowed:
            raise ArtifactError(f"{model_path}: tensor {tensor.name} points at external data {location!r} outside the artifact")
    return proto


def session_options(entries: dict[str, str], threads: int | None = None) -> ort.SessionOptions:
    """How every session of an artifact's model is created, by the runtime and by the build's verify stage."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Workers spin between the nodes of one call (waking a sleeping thread per node costs more than many
    # small nodes take), and for a bounded time after it: long enough to catch the next call of a decoding
    # loop, short enough not to steal the cores for long from the other model of a speculative pair.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_AFTER_CALL_US))
    for key, value in entries.items():  # validated against the allowed set when the manifest was read
        options.add_session_config_entry(key, value)
    return options


def check_inputs(model_path: Path, proto: onnx.ModelProto) -> None:
    """Refuse a decoder exported before its attention took each row's new-token count (query_seqlens) or
    before it returned logits only where asked (logit_positions)."""
    inputs = {value.name for value in proto.graph.input}
    missing = sorted({*LENGTH_INPUTS, POSITIONS_INPUT} - inputs)
    if missing:
        raise ArtifactError(f"{model_path}: exported by an older moecc (its inputs lack {', '.join(missing)})", hint="rebuild it with `moecc build RECIPE`")


class Decoder:
    """A stateless ONNX Runtime session; all per-sequence state lives in a KvCache, so threads can share it."""

    def __init__(self, artifact: Path, entry: ModelEntry, allowed_files: set[str], threads: int | None = None, kernels: Kernels = "auto"):
        model_path = artifact / entry.path
        model = check_external_data(artifact, entry.path, allowed_files)
        check_inputs(model_path, model)
        self.session, self.kernels = open_session(model_path, model, entry.head_dim, session_options(entry.session_options, threads), kernels)
        self.entry = entry
        # moecc.FusedDecoder proposes greedy tokens after a call in the same call (see KvCache.greedy_chain).
        self.chains_greedily = GREEDY_STEPS in {value.name for value in self.session.get_inputs()}

    def new_cache(self, capacity: int | None = None) -> KvCache:
        return KvCache(self, capacity or self.entry.max_sequence_length)

    def bind(self, batch: int, capacity: int) -> BoundBuffers:
        return BoundBuffers(self, batch, capacity)


SMALL_CALL = 16  # new tokens per row up to which a call's ids, logit positions and logits live in preallocated, bound buffers
_PADDING = array("q", bytes(8 * SMALL_CALL))  # zeros after a row's tokens in a small call


class KvState:
    """One cache's key/value buffers [B, kv heads, capacity, D] per layer, each both past and present, and the
    row lengths: the attention (ONNX Runtime's GroupQueryAttention or moecc's kernel, which keeps its
    contract) writes the new keys and values in place when past and present share a buffer, reads each row's
    length after the call from seqlens_k (length - 1) and its number of new tokens from query_seqlens; a
    call's input is right-padded to its longest row."""

    def __init__(self, entry: ModelEntry, batch: int, capacity: int):
        self.capacity = capacity
        shape = (batch, entry.num_kv_heads, capacity, entry.head_dim)
        # The bindings point into these OrtValues (which share the arrays' memory): they live as long as the cache.
        self.kv = {names: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=KV_DTYPES[entry.kv_precision])) for names in kv_names(entry.num_layers)}
        seqlens_k, total, query_seqlens = np.zeros(batch, dtype=np.int32), np.zeros((), dtype=np.int32), np.zeros(batch, dtype=np.int32)
        arrays = {"seqlens_k": seqlens_k, "total_sequence_length": total, "query_seqlens": query_seqlens}
        self.lengths = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
        # Written through memoryviews: a decode step's few integers, where a numpy call per write would cost
        # microseconds each (the model's call leaves numpy's code and data out of cache).
        self._seqlens_k, self._total, self._query_seqlens = memoryview(seqlens_k), memoryview(total.reshape(1)), memoryview(query_seqlens)

    def bind(self, binding: ort.IOBinding, inputs: set[str]) -> None:
        """Bind the buffers and lengths a session with these inputs reads."""
        for (past, present), buffer in self.kv.items():
            if past in inputs:
                binding.bind_ortvalue_input(past, buffer)
                binding.bind_ortvalue_output(present, buffer)
        for name, value in self.lengths.items():
            if name in inputs:
                binding.bind_ortvalue_input(name, value)

    def set_lengths(self, cached: list[int], new: list[int], width: int) -> None:
        """Each row's cached tokens and new tokens in a call `width` tokens wide. Every row, even one with nothing
        new, needs room for the whole width after its cached tokens (GroupQueryAttention's rule for padded calls)."""
        check_capacity(max(cached) + width, self.capacity)
        total = 0
        for row, (length, count) in enumerate(zip(cached, new)):
            end = length + count
            if end == 0:
                raise ValueError(f"row {row} has neither cached nor new tokens; fill every row (prefill) before feeding some")
            self._seqlens_k[row] = end - 1  # a row with nothing new keeps its length
            self._query_seqlens[row] = count
            total = max(total, end)
        self._total[0] = total


def check_last(new: list[int], last: list[int]) -> None:
    """Refuse, before anything is written, a row asking for the logits of more tokens than it feeds."""
    for row, (count, wanted) in enumerate(zip(new, last)):
        if not 0 <= wanted <= count:
            raise ValueError(f"row {row}: logits asked for its last {wanted} tokens, of {count} fed")


def fill_positions(out: np.ndarray, new: list[int], last: list[int]) -> None:
    """Row r of `out` [B, N] gets the positions of its last[r] last new tokens, in order, then repeats a valid
    position up to N (logits the caller ignores). The rows are checked (check_last)."""
    for row, (count, wanted) in enumerate(zip(new, last)):
        out[row, :wanted] = range(count - wanted, count)
        out[row, wanted:] = max(count - 1, 0)


def positions_input(new: list[int], last: list[int]) -> np.ndarray:
    """A call's logit_positions [B, N, 1] in an array of its own, N = max(last) or 1; the rows are checked (check_last)."""
    positions = np.empty((len(new), max(max(last), 1), 1), dtype=np.int64)
    fill_positions(positions[..., 0], new, last)
    return positions


class BoundBuffers:
    """An IO binding of the whole model over one cache's KvState.

    Decode and verify calls (up to SMALL_CALL new tokens per row) write their ids, logit positions and logits
    into one preallocated buffer each, viewed at the call's shape and bound once per shape: no OrtValue per
    call and no wrapping of every output on the way back; the caller gets a copy of the logits.
    """

    def __init__(self, decoder: Decoder, batch: int, capacity: int):
        self.decoder = decoder
        self.batch = batch
        self.binding = decoder.session.io_binding()
        self.binding.bind_output("logits", "cpu")  # bound first: get_outputs()[0] is the logits
        self.state = KvState(decoder.entry, batch, capacity)
        self.state.bind(self.binding, {value.name for value in decoder.session.get_inputs()})
        self._values = []  # keeps the bound OrtValues alive as long as the binding uses them
        self._ids = np.zeros(batch * SMALL_CALL, dtype=np.int64)
        self._ids_memory = memoryview(self._ids).cast("B").cast("q")  # a decode step writes its token here without a numpy call
        self._positions = np.zeros(batch * SMALL_CALL, dtype=np.int64)
        self._logits = np.zeros(0, dtype=np.float32)  # batch * SMALL_CALL * vocabulary, on the first small call
        self._views: dict[tuple[str, int], tuple[np.ndarray, ort.OrtValue]] = {}  # (name, S or N) -> its view
        self._bound: dict[str, int] = {}  # what each name is bound to now: N, or -1 for an array ORT owns
        self._filled: tuple | None = None  # (N, new, last) of the positions in the buffer: decode steps reuse them
        self._small_call: tuple[int, int] | None = None  # (S, N) the small-call views are bound at now
        self._small_views: tuple[np.ndarray, np.ndarray] | None = None  # their logit positions and logits
        self._steps: memoryview | None = None  # a call's greedy steps, written in place, where the model chains them
        if decoder.chains_greedily:
            steps, self.chained = np.zeros(1, dtype=np.int64), np.full((batch, MAX_CHAIN), -1, dtype=np.int64)
            self._values += [ort.OrtValue.ortvalue_from_numpy(steps.reshape(())), ort.OrtValue.ortvalue_from_numpy(self.chained)]
            self.binding.bind_ortvalue_input(GREEDY_STEPS, self._values[-2])
            self.binding.bind_ortvalue_output(GREEDY_TOKENS, self._values[-1])
            self._steps = memoryview(steps)
            self._greedy_tokens = memoryview(self.chained).cast("B").cast("q")  # read without a numpy call

    def _bound_view(self, name: str, size: int) -> np.ndarray:
        """The leading [B, size(, V or 1)] view of a flat buffer (contiguous at every size, so one buffer serves
        them all), bound to `name` unless it already is."""
        if (name, size) not in self._views:
            if name == "logits":
                vocab = self.decoder.entry.vocab_size
                if not self._logits.size:
                    self._logits = np.zeros(self.batch * SMALL_CALL * vocab, dtype=np.float32)
                view = self._logits[: self.batch * size * vocab].reshape(self.batch, size, vocab)
            elif name == "input_ids":
                view = self._ids[: self.batch * size].reshape(self.batch, size)
            else:
                view = self._positions[: self.batch * size].reshape(self.batch, size, 1)
            value = ort.OrtValue.ortvalue_from_numpy(view)  # shares the view's memory
            self._values.append(value)
            self._views[name, size] = view, value
        view, value = self._views[name, size]
        if self._bound.get(name) != size:
            (self.binding.bind_ortvalue_output if name == "logits" else self.binding.bind_ortvalue_input)(name, value)
            self._bound[name] = size
        return view

    def run(self, rows: list[list[int]], cached: list[int], last: list[int], greedy_steps: int = 0) -> np.ndarray:
        """One call: each row's new tokens after its `cached` ones, right-padded to the longest row; returns the
        logits [B,N,V] at each row's last[row] last new tokens, N = max(last) or 1 (the caller's to keep; a row's
        positions beyond its own last[row] hold nothing it asked for). With `greedy_steps` (a model that chains
        them, one row), the call then proposes that many tokens greedily into `chained` [0, :greedy_steps]."""
        logits = self._call(rows, cached, last, greedy_steps)
        return logits.copy() if logits is not None else self.binding.get_outputs()[0].numpy()  # the buffer is refilled by the next call

    def greedy(self, tokens: list[int], cached: int, last: int, greedy_steps: int = 0) -> list[int]:
        """run() for one row of a model that chains greedily, for its greedy tokens alone: the argmax at each of its
        `last` (at most MAX_CHAIN) last new tokens, or with `greedy_steps`, its proposals. No logits are copied out."""
        self._call([tokens], [cached], [last], greedy_steps)
        return self._greedy_tokens[: greedy_steps or last].tolist()

    def _call(self, rows: list[list[int]], cached: list[int], last: list[int], greedy_steps: int) -> np.ndarray | None:
        """run()'s call; returns a small call's logits in the bound buffer, None where ONNX Runtime allocated them."""
        new = [len(tokens) for tokens in rows]
        check_last(new, last)
        if self._steps is not None:
            self._steps[0] = greedy_steps
        elif greedy_steps:
            raise ValueError("this model does not chain greedy proposals")
        width, kept = max(new), max(max(last), 1)
        self.state.set_lengths(cached, new, width)
        if width <= SMALL_CALL:
            if self._small_call != (width, kept):  # a decode loop's calls keep one shape for many steps
                self._small_views = self._bound_view(POSITIONS_INPUT, kept), self._bound_view("logits", kept)
                self._bound_view("input_ids", width)
                self._small_call = width, kept
            positions, logits = self._small_views
            for row, tokens in enumerate(rows):  # into the flat buffer, as the [B, width] view lays it out
                ids = array("q", tokens)
                ids.extend(_PADDING[: width - len(ids)])
                self._ids_memory[row * width : (row + 1) * width] = ids
            if self._filled != (kept, new, last):
                fill_positions(positions[..., 0], new, last)
                self._filled = (kept, new, list(last))
            self.decoder.session.run_with_iobinding(self.binding)
            return logits
        for name, values in (("input_ids", right_padded(rows, width)), (POSITIONS_INPUT, positions_input(new, last))):  # a prompt: arrays of its own
            self.binding.bind_cpu_input(name, values)
            self._bound[name] = -1
        self.binding.bind_output("logits", "cpu")
        self._bound["logits"] = -1
        self._small_call = None
        self.decoder.session.run_with_iobinding(self.binding)
        return None


def shared_prefix_length(cached: list[int], tokens: list[int]) -> int:
    common = min(len(cached), len(tokens))
    if cached[:common] == tokens[:common]:  # the usual case, compared in C
        return common
    return next(i for i, (a, b) in enumerate(zip(cached, tokens)) if a != b)


def _sync(cached: list[int], tokens: list[int]) -> list[int]:
    """Roll `cached` back (in place) to its longest prefix shared with `tokens`; return the tokens still to feed."""
    del cached[shared_prefix_length(cached, tokens) :]
    return tokens[len(cached) :]


class TokenLedger:
    """A single-sequence cache as the decoding loop sees it (ONNX Runtime's, or the appended-KV caches of the
    TensorRT path): the tokens whose keys and values it holds, where a rollback only shortens the list."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.ids: list[int] = []

    def __len__(self) -> int:
        return len(self.ids)

    def keep(self, length: int) -> None:
        """Roll back to the first `length` tokens; the stale keys beyond are overwritten by the next call."""
        del self.ids[length:]

    def sync(self, tokens: list[int]) -> list[int]:
        """Roll back to the longest prefix shared with `tokens`; return the tokens still to be fed."""
        return _sync(self.ids, tokens)

    def feed(self, tokens: list[int], last: int | None = None) -> np.ndarray:
        """Run the new tokens after the cached ones; returns the logits [last, V] after the `last` last of them
        (all by default): a prompt's prefill asks for one, a verify block for k + 1."""
        raise NotImplementedError

    def greedy_tokens(self, tokens: list[int], last: int) -> list[int]:
        """feed(), for the argmax after each of the `last` last tokens alone (a greedy verify's judge)."""
        return self.feed(tokens, last).argmax(axis=-1).tolist()

    def greedy_chain(self, tokens: list[int], count: int) -> list[int]:
        """Run `tokens` after the cached ones, then propose `count` tokens greedily (each the argmax after the
        one before), caching each but the last; returns the proposals."""
        logits = self.feed(tokens, last=1)[-1]
        chain = [int(logits.argmax())]
        while len(chain) < count:
            chain.append(int(self.feed(chain[-1:])[-1].argmax()))
        return chain

    def _check_room(self, new_tokens: int) -> None:
        check_capacity(len(self.ids) + new_tokens, self.capacity)


class KvCache(TokenLedger):
    """One sequence's cache [1, kv heads, capacity, head dim] per layer, bound by its decoder (whole or cut at its experts)."""

    def __init__(self, decoder, capacity: int):
        super().__init__(capacity)
        self.buffers = decoder.bind(1, capacity)

    def feed(self, tokens: list[int], last: int | None = None) -> np.ndarray:
        """Run the new tokens through the model after the cached ones; returns the logits [last, V] after the
        `last` last of them (all by default)."""
        last = len(tokens) if last is None else last
        logits = self.buffers.run([tokens], [len(self.ids)], [last])
        self.ids.extend(tokens)
        return logits[0, :last]

    def greedy_tokens(self, tokens: list[int], last: int) -> list[int]:
        if not self.buffers.decoder.chains_greedily or last > MAX_CHAIN:
            return super().greedy_tokens(tokens, last)
        chosen = self.buffers.greedy(tokens, len(self.ids), last)
        self.ids.extend(tokens)
        return chosen

    def greedy_chain(self, tokens: list[int], count: int) -> list[int]:
        if not self.buffers.decoder.chains_greedily:
            return super().greedy_chain(tokens, count)
        chain: list[int] = []
        while len(chain) < count:  # MAX_CHAIN proposals per call
            steps = min(count - len(chain), MAX_CHAIN)
            check_capacity(len(self.ids) + len(tokens) + steps - 1, self.capacity)
            proposed = self.buffers.greedy(tokens, len(self.ids), 1, greedy_steps=steps)
            self.ids.extend(tokens + proposed[:-1])
            chain += proposed
            tokens = proposed[-1:]
        return chain


class BatchKvCache:
    """Key/value buffers [B, kv heads, capacity, D] for B sequences of different lengths, decoded together.

    GroupQueryAttention reads each row's length and its number of new tokens, so rows need not line up: one
    right-padded call reads every row's new tokens (the prompts; a verify block of any length per row; none
    for a row with nothing to feed, which keeps its cache as it is). `ids[row]` are the row's cached tokens,
    so a row rolls back by length as in KvCache.
    """

    def __init__(self, decoder, batch: int, capacity: int):
        self.buffers = decoder.bind(batch, capacity)
        self.capacity = capacity
        self.ids: list[list[int]] = [[] for _ in range(batch)]

    def prefill(self, prompts: list[list[int]]) -> np.ndarray:
        """Read every row's prompt into an empty cache; returns the logits after each prompt [B, V]."""
        if any(self.ids) or len(prompts) != len(self.ids) or not all(prompts):
            raise ValueError("prefill needs an empty cache and one non-empty prompt per row")
        logits = self.buffers.run(prompts, [0] * len(prompts), [1] * len(prompts))
        self.ids = [list(prompt) for prompt in prompts]
        return logits[:, 0]

    def sync(self, row: int, tokens: list[int]) -> list[int]:
        """Roll the row back to its longest prefix shared with `tokens`; return the tokens still to be fed."""
        return _sync(self.ids[row], tokens)

    def keep(self, row: int, length: int) -> None:
        """Roll the row back to its first `length` tokens."""
        del self.ids[row][length:]

    def feed(self, rows: dict[int, list[int]], last: dict[int, int] | None = None) -> dict[int, np.ndarray]:
        """Feed each listed row its tokens after its cached ones; returns each row's logits [last[row], V] after
        its last[row] last tokens (every row's all by default).

        One call for all rows, as wide as the longest row's tokens (a verify block each, a draft's catch-up
        after idle steps, or none for a row that keeps its cache as it is); narrower calls where the cache's end
        leaves less room than that after the longest row, since every row needs room for the call's width."""
        produced: dict[int, list[np.ndarray]] = {row: [] for row in rows}
        remaining = {row: list(tokens) for row, tokens in rows.items() if tokens}
        wanted = {row: len(tokens) if last is None else last[row] for row, tokens in remaining.items()}  # the row's last tokens
        check_last([len(tokens) for tokens in remaining.values()], list(wanted.values()))
        while remaining:
            cached = [len(ids) for ids in self.ids]
            width = min(max(len(tokens) for tokens in remaining.values()), max(1, self.capacity - max(cached)))
            chunk = [remaining.get(row, [])[:width] for row in range(len(self.ids))]
            # A row's positions in this call that are among its `wanted` last tokens.
            kept = [max(0, len(chunk[row]) - len(remaining[row]) + wanted[row]) if row in remaining else 0 for row in range(len(self.ids))]
            logits = self.buffers.run(chunk, cached, kept)
            for row in list(remaining):
                self.ids[row].extend(chunk[row])
                produced[row].append(logits[row, : kept[row]])
                remaining[row] = remaining[row][width:]
                wanted[row] = min(wanted[row], len(remaining[row]))
                if not remaining[row]:
                    del remaining[row]
        return {row: np.concatenate(parts) for row, parts in produced.items() if parts}


def right_padded(rows: list[list[int]], width: int) -> np.ndarray:
    """Token rows as one [B, width] array, each row's tokens first."""
    input_ids = np.zeros((len(rows), width), dtype=np.int64)
    for row, tokens in enumerate(rows):
        input_ids[row, : len(tokens)] = tokens
    return input_ids
