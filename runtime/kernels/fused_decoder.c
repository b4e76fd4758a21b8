/* moecc.FusedDecoder: a whole decoder with its KV cache, in one node: a dense one (Qwen3, Llama), or an MoE
(Qwen3-MoE, Qwen2-MoE with its shared expert, Mixtral).

A draft model proposes one token per call, and the decoding loop calls it between the main model's verifies,
which leave the caches cold: on small-coder's 2-layer draft, ONNX Runtime's 24 nodes took 230 µs for the first
call after 96 MiB of other reads and 100 µs for the second, where the same arithmetic in one kernel's loops
takes a fraction of that (runtime/kernels/fused_decoder.py has the figures). An MoE main model's many small
nodes per layer cost ONNX Runtime's executor and threads a tenth of a decode step. This kernel runs the
exported graph's computation in one pass over its weights, with moecc.Attention's, moecc.MatMul's and
moecc.MoE's code for the attention, the products and the routed experts. Its contract is the graph's
(runtime/kernels/fused_decoder.py swaps it in when a session loads):

  inputs   0 input_ids [B, S] int64   1 seqlens_k [B] int32   2 query_seqlens [B] int32 (GroupQueryAttention's)
           3 logit_positions [B, N, 1] int64: the positions whose logits the call returns
           4 greedy_steps [] int64: after the call, propose this many tokens greedily (batch 1 only)
           5 cos, 6 sin [positions, D/2]: rotary tables   7 embedding [V, H]   8 the final norm's weight [H]
           9 the head's weights in panels [V / 32, H, 32]   10 with quantized, their scales, else empty
           11... per layer: past_key, past_value [B, KVH, capacity, D] (float, or int8 in the op registered for an
             int8 cache, then followed by their scales [1, KVH, 1, D], as moecc.Attention's); the input norm's weight [H]; q, k and v
             packed in panels [(H_q + 2 KVH) D / 32, H, 32]; with qkv_bias, their bias [(H_q + 2 KVH) D]; with
             qk_norm, the query and key norms' weights [D]; the output projection in panels [H / 32, H_q D, 32];
             the post-attention norm's weight [H]; then the MLP's:
             a dense one's gate and up packed in panels [2F / 32, H, 32] (gate's F columns first) and down in
             panels [H / 32, F, 32]; with quantized, each panelled weight 8-bit and followed by its scales
             [N / 32, K / 32, 32], one per block of 32 rows of a column (MatMulNBits's 8-bit blocks of 32:
             unsigned, zero point 128);
             an MoE block's product after the norm in panels [(2F + R) / 32, H, 32]: its shared expert's gate
             and up (F = 0 without one), then the router's E columns, the shared expert's gate (one column) and
             zeros to R, a multiple of 32; the shared expert's down in panels [H / 32, F, 32], if it has one;
             the experts' fc1 [E P, 2I, H] and fc2 transposed [E P, I, H], as moecc.MoE takes them
  outputs  0 logits [B, N, V]   1 greedy_tokens [B, max_chain] int64: with greedy steps, the greedy proposals;
             without, in a call of one row, its argmax at each of its N returned positions (N <= max_chain); then -1
           2... per layer: present_key, present_value, of the past's type (in place when bound to the past)
  attrs    num_heads, kv_num_heads, qk_norm (0 or 1), epsilon (every RMS norm's), scale (0: 1/sqrt(D)), max_chain,
           quantized (0 or 1: 8-bit weights), qkv_bias (0 or 1); an MoE's experts (E, the router's columns; 0:
           a dense MLP), expert_parts (P: the lowering's parts of each expert, part p of expert e the MoE's
           expert p E + e, each given the router's logit of its expert), shared_expert (0 or 1), and moecc.MoE's
           k, normalize_routing_weights, activation_alpha, activation_beta and swiglu_limit

The greedy proposals continue from the last logits the call returns: the argmax of each, the first index of
the largest as numpy's (of finite logits), is the next token, and each but the last is run through the model in turn (its keys
and values cached after the call's tokens). A draft's k proposals are then one call, not k: each of ONNX
Runtime's calls and the Python around it costs more than the draft's own arithmetic.

Every block is y = x + f(rms_norm(x)), SiLU-gated in a dense MLP; an MoE block's f is the routed experts' mix
plus the shared expert's output times the sigmoid of its gate; padding positions of a row are computed and
ignored, as in the graph. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"

enum { INPUT_IDS, SEQLENS_K, QUERY_SEQLENS, LOGIT_POSITIONS, GREEDY_STEPS, COS, SIN, EMBEDDING, FINAL_NORM, HEAD, HEAD_SCALES, FIXED_INPUTS };
enum { LOGITS, GREEDY_TOKENS, PRESENTS };
/* Calls of up to this many tokens (proposals, the catch-up after a verify) run on the calling thread: handing each
   of a pass's 13 products and attention phases to the session's threads cost more than their arithmetic. On
   small-coder's INT8 draft (2 threads, a 2-core Xeon, alternating rounds in one process), 3 tokens and a chain
   of 4 proposals took 129 µs instead of 195, 16 tokens 242 instead of 316; prompts of 24 to 128 tokens took
   about as long either way, so they keep the threads, which a wider draft's prompts need. */
enum { SMALL_CALL_TOKENS = 16 };
/* ... when the model's weights are at most this many bytes: a larger model's stream from memory at both cores'
   rate (small-coder's MoE main model, 64 MiB, 41 read per token, took 1.72 ms a decode step on one thread
   against 0.88-0.91 on two). */
#define SMALL_MODEL_BYTES (8 << 20)

typedef struct {
  int64_t num_heads, kv_num_heads, qk_norm, max_chain, quantized, qkv_bias;
  int int8_cache; /* the op's registration: an int8 cache with its scales, else a float one */
  int64_t experts, expert_parts, shared_expert; /* experts 0: a dense MLP */
  ExpertMix mix;
  float epsilon, scale;
} Kernel;

/* One layer's inputs, by name, and its cache as the call writes it. */
typedef struct {
  Tensor past_key, past_value, key_scale, value_scale, input_norm, qkv, qkv_bias, query_norm, key_norm, out, post_norm, gate_up, down, fc1, fc2;
  Tensor qkv_scales, out_scales, gate_up_scales, down_scales; /* 8-bit weights' (quantized) */
  void *cache_key, *cache_value; /* float or int8 */
} Layer;

/* The model's weights and sizes, and room for the activations of the call's tokens. */
typedef struct {
  const Kernel *kernel;
  Layer *layers;
  size_t layer_count;
  const float *embedding, *final_norm, *cos, *sin;
  const void *head;
  const float *head_scales; /* NULL: a float head */
  int64_t rotary_positions, vocab, hidden, dim, heads, kv_heads, packed, ffn, capacity;
  /* An MoE layer's: the columns of its product after the post-attention norm (the shared expert's gate and up,
     2 ffn, then the router's logits, the shared expert's gate, zeros up to a panel), and each expert part's units. */
  int64_t mixer, inter;
  int small; /* weights few enough that a small call runs on the calling thread (SMALL_MODEL_BYTES) */
  /* The residual stream x, its norm h, an update, q/k/v or gate/up, the attention's output, the gated product,
     the normed rows whose logits are asked for; an MoE layer's routed output and router logits. */
  float *x, *h, *update, *wide, *attended, *gated, *last, *routed, *router;
} Model;

/* out[r] = x[r] / rms(x[r]) * weight for `rows` rows of `width` floats. (The loops here take restrict pointers
   so that the compiler vectorizes them: the buffers all lie in one allocation.) */
static void rms_norm(const float *restrict x, const float *restrict weight, int64_t rows, int64_t width, float epsilon, float *restrict out) {
  for (int64_t r = 0; r < rows; ++r, x += width, out += width) {
    float squares = 0.f;
    for (int64_t i = 0; i < width; ++i) squares += x[i] * x[i];
    float inverse = 1.f / sqrtf(squares / (float)width + epsilon);
    for (int64_t i = 0; i < width; ++i) out[i] = x[i] * inverse * weight[i];
  }
}

static void add(float *restrict x, const float *restrict update, int64_t count) {
  for (int64_t i = 0; i < count; ++i) x[i] += update[i];
}

/* out = silu(gate) * up, SiLU through the vectorized expf of glibc's libmvec. */
static void gated_silu(const float *restrict gate, const float *restrict up, int64_t count, float *restrict out) {
  for (int64_t i = 0; i < count; ++i) out[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
}

/* A work item of gate_rows(): GATE_ROWS tokens' gated products. */
enum { GATE_ROWS = 16 };
typedef struct {
  const Model *model;
  int64_t tokens;
} GateRows;

static void gate_rows(void *data, size_t item) {
  const GateRows *rows = data;
  const Model *model = rows->model;
  int64_t first = (int64_t)item * GATE_ROWS, last = first + GATE_ROWS < rows->tokens ? first + GATE_ROWS : rows->tokens;
  for (int64_t t = first; t < last; ++t) gated_silu(model->wide + t * model->mixer, model->wide + t * model->mixer + model->ffn, model->ffn, model->gated + t * model->ffn);
}

/* The first index of the largest value, as numpy's argmax for finite values (the kernels are built with fast-math,
   NaNs are not told apart). With AVX-512 or AVX2, count a multiple of the lanes (the head's panels make the
   vocabulary a multiple of 32): each lane keeps its largest and where it first saw it, in one pass, then the
   lanes' firsts of the largest give the first overall. The plain loop finds the largest, then its first place in
   a scalar search, which took 12 µs of a 9-position verify of small-coder after its logits (1,024 a row), where
   the one pass takes 2. */
#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
enum { ARGMAX_LANES = 16 };
#else
enum { ARGMAX_LANES = 8 };
#endif
typedef float argmax_floats __attribute__((vector_size(4 * ARGMAX_LANES)));
typedef int32_t argmax_ints __attribute__((vector_size(4 * ARGMAX_LANES)));

static int64_t argmax(const float *values, int64_t count) {
  argmax_floats best, next;
  argmax_ints index, where;
  memcpy(&best, values, sizeof best);
  for (int lane = 0; lane < ARGMAX_LANES; ++lane) index[lane] = lane;
  where = index;
  for (int64_t i = ARGMAX_LANES; i < count; i += ARGMAX_LANES) {
    memcpy(&next, values + i, sizeof next);
    index += ARGMAX_LANES;
    argmax_ints larger = next > best; /* strictly: a lane keeps its first */
    best = (argmax_floats)(((argmax_ints)next & larger) | ((argmax_ints)best & ~larger));
    where = (index & larger) | (where & ~larger);
  }
  float top = best[0];
  int64_t first = where[0];
  for (int lane = 1; lane < ARGMAX_LANES; ++lane)
    if (best[lane] > top || (best[lane] == top && where[lane] < first)) top = best[lane], first = where[lane];
  return first;
}
#else
static int64_t argmax(const float *values, int64_t count) {
  float top = values[0];
  for (int64_t i = 1; i < count; ++i) top = values[i] > top ? values[i] : top;
  int64_t best = 0;
  while (best + 1 < count && values[best] != top) ++best; /* bounded: a NaN first value is no one's equal */
  return best;
}
#endif

/* Whether `tensor` holds weights in panels for these columns and inner size: float ones [columns / 32, inner, 32],
   or where the kernel is quantized 8-bit ones in quads [columns / 32, inner / 4, 32, 4] with `scales`
   [columns / 32, inner / 32, 32]. */
static int panels(const Kernel *kernel, const Tensor *tensor, const Tensor *scales, int64_t columns, int64_t inner) {
  if (columns % 32) return 0;
  if (!kernel->quantized) return tensor->type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && shaped(tensor, 3, columns / 32, inner, 32);
  return tensor->type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 && inner % 32 == 0 && shaped(tensor, 4, columns / 32, inner / 4, 32) &&
         tensor->shape[3] == 4 && scales->type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && shaped(scales, 3, columns / 32, inner / 32, 32);
}

static int vector_of(const Tensor *tensor, int64_t size) { return tensor->type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && shaped(tensor, 1, size, -1, -1); }

static OrtStatus *read_layers(OrtKernelContext *context, const Kernel *kernel, Layer *layers, size_t count) {
  for (size_t l = 0, index = FIXED_INPUTS; l < count; ++l) {
    Layer *layer = &layers[l];
    Tensor *order[] = {&layer->past_key, &layer->past_value, &layer->key_scale, &layer->value_scale, &layer->input_norm, &layer->qkv, &layer->qkv_scales, &layer->qkv_bias,
                       &layer->query_norm, &layer->key_norm, &layer->out, &layer->out_scales, &layer->post_norm, &layer->gate_up,
                       &layer->gate_up_scales, &layer->down, &layer->down_scales, &layer->fc1, &layer->fc2};
    for (size_t i = 0; i < sizeof order / sizeof *order; ++i) {
      Tensor *tensor = order[i];
      if (!kernel->int8_cache && (tensor == &layer->key_scale || tensor == &layer->value_scale)) continue;
      if (!kernel->qk_norm && (tensor == &layer->query_norm || tensor == &layer->key_norm)) continue;
      if (!kernel->quantized && (tensor == &layer->qkv_scales || tensor == &layer->out_scales || tensor == &layer->gate_up_scales || tensor == &layer->down_scales))
        continue;
      if (!kernel->qkv_bias && tensor == &layer->qkv_bias) continue;
      if (kernel->experts && !kernel->shared_expert && (tensor == &layer->down || tensor == &layer->down_scales)) continue;
      if (!kernel->experts && (tensor == &layer->fc1 || tensor == &layer->fc2)) continue;
      CHECK(input(context, index++, tensor));
    }
  }
  return NULL;
}

/* Whether `tensor` holds an int8 cache's scales [1, KVH, 1, D]. */
static int cache_scales(const Model *model, const Tensor *tensor) {
  return tensor->type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && shaped(tensor, 4, 1, model->kv_heads, 1) && tensor->shape[3] == model->dim;
}

/* Whether every layer's cache and weights have the model's sizes, for a batch of `batch`. */
static int layers_fit(const Model *model, int64_t batch) {
  ONNXTensorElementDataType cache = model->kernel->int8_cache ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  for (size_t l = 0; l < model->layer_count; ++l) {
    const Layer *layer = &model->layers[l];
    if (model->kernel->int8_cache && !(cache_scales(model, &layer->key_scale) && cache_scales(model, &layer->value_scale))) return 0;
    if (!(shaped(&layer->past_key, 4, batch, model->kv_heads, model->capacity) && layer->past_key.type == cache &&
          layer->past_value.type == cache && layer->past_key.shape[3] == model->dim &&
          !memcmp(layer->past_value.shape, layer->past_key.shape, sizeof(int64_t) * 4) && vector_of(&layer->input_norm, model->hidden) &&
          panels(model->kernel, &layer->qkv, &layer->qkv_scales, model->packed, model->hidden) &&
          panels(model->kernel, &layer->out, &layer->out_scales, model->hidden, model->heads * model->dim) &&
          vector_of(&layer->post_norm, model->hidden) && panels(model->kernel, &layer->gate_up, &layer->gate_up_scales, model->mixer, model->hidden) &&
          (!model->ffn || panels(model->kernel, &layer->down, &layer->down_scales, model->hidden, model->ffn)) &&
          (!model->kernel->qkv_bias || vector_of(&layer->qkv_bias, model->packed)) &&
          (!model->kernel->qk_norm || (vector_of(&layer->query_norm, model->dim) && vector_of(&layer->key_norm, model->dim)))))
      return 0;
    const Tensor *fc1 = &layer->fc1, *fc2 = &layer->fc2;
    int64_t parts = model->kernel->experts * model->kernel->expert_parts;
    if (model->kernel->experts && !(fc1->type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && shaped(fc1, 3, parts, 2 * model->inter, model->hidden) &&
                                    fc2->type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && shaped(fc2, 3, parts, model->inter, model->hidden)))
      return 0;
  }
  return 1;
}

/* An MoE layer's routed experts for the call's normed rows h, into `routed`: each token's router logits (after its
   shared expert's gate and up in `wide`) repeated for each part of the experts, as the exported graph's
   Concat feeds them to its MoE node (part p of expert e is expert p E + e there). */
static OrtStatus *route_experts(OrtKernelContext *context, const Model *model, const Layer *layer, int64_t tokens) {
  int64_t experts = model->kernel->experts, parts = model->kernel->expert_parts;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t p = 0; p < parts; ++p) memcpy(model->router + (t * parts + p) * experts, model->wide + t * model->mixer + 2 * model->ffn, experts * sizeof(float));
  return experts_run(context, &model->kernel->mix, model->h, model->router, tokens, experts * parts, model->hidden, model->inter, layer->fc1.data,
                     layer->fc2.data, model->routed);
}

/* routed += the shared expert's output (in `update`) times the sigmoid of its gate (the column after the router's),
   as the graph's Mul and Add: a layer without a shared expert leaves `routed` as it is. */
static void mix_shared(const Model *model, int64_t tokens) {
  if (!model->kernel->shared_expert) return;
  for (int64_t t = 0; t < tokens; ++t) {
    float gate = 1.f / (1.f + expf(-model->wide[t * model->mixer + 2 * model->ffn + model->kernel->experts]));
    float *restrict routed = model->routed + t * model->hidden;
    const float *restrict shared = model->update + t * model->hidden;
    for (int64_t i = 0; i < model->hidden; ++i) routed[i] += shared[i] * gate;
  }
}

/* Moves the rows of `rows` (`size` floats each; `width` new tokens per row of `batch`) at each row's `positions`
   among its new tokens to the front, in the logits' order, through `spare`, which holds batch * kept rows. */
static void keep_returned(float *rows, int64_t size, int64_t batch, int64_t width, const int64_t *positions, int64_t kept, float *spare) {
  for (int64_t row = 0; row < batch; ++row)
    for (int64_t n = 0; n < kept; ++n)
      memcpy(spare + (row * kept + n) * size, rows + (row * width + positions[row * kept + n]) * size, size * sizeof(float));
  memcpy(rows, spare, (size_t)(batch * kept * size) * sizeof(float));
}

/* One pass over `width` new tokens per row of `batch` (ids checked), each row's lengths as GroupQueryAttention
   reads them; logits [batch, kept, V] at each row's `positions` among its new tokens.

   The last layer's keys and values are all the cache needs of its other rows: only the rows whose logits the call
   returns go on through its attention (the blocks of tokens holding them), the output projection, the MLP or
   experts, and the head. A prompt read for its last token's logits skips most of the last layer's work for every
   other token: small-coder's 4-layer main model read 85, 512 and 2,000 tokens in 0.81x, 0.78x and 0.79x the time
   of a pass running every row through, its 2-layer draft in 0.69x, 0.60x and 0.59x (both builds in one process,
   in turn). Each row's sums keep their order however many rows a product takes, and a block of tokens its
   attention's, so the returned logits keep their bits. */
__attribute__((noinline)) /* inlined into compute(), none of its loops were vectorized (GCC 12); so chain_greedily */
static OrtStatus *forward(OrtKernelContext *context, const Model *model, const int64_t *ids, int64_t batch, int64_t width, const int32_t *seqlens_k,
                          const int32_t *query_seqlens, const int64_t *positions, int64_t kept, float *logits) {
  const Kernel *kernel = model->kernel;
  int64_t tokens = batch * width, hidden = model->hidden, dim = model->dim, heads = model->heads;
  if (model->small && tokens <= SMALL_CALL_TOKENS) context = NULL; /* every phase on this thread */
  float *x = model->x, *h = model->h, *wide = model->wide;
  for (int64_t t = 0; t < tokens; ++t) memcpy(x + t * hidden, model->embedding + ids[t] * hidden, hidden * sizeof(float));
  AttentionCall call = {.batch = batch, .new_width = width, .heads = heads, .kv_heads = model->kv_heads, .group = heads / model->kv_heads,
                        .dim = dim, .capacity = model->capacity, .scale = kernel->scale != 0.f ? kernel->scale : 1.f / sqrtf((float)dim),
                        .epsilon = kernel->epsilon, .query_stride = model->packed, .key_stride = model->packed, .seqlens_k = seqlens_k,
                        .query_seqlens = query_seqlens, .cos = model->cos, .sin = model->sin, .output = model->attended,
                        .query = wide, .key = wide + heads * dim, .value = wide + (heads + model->kv_heads) * dim};
  call.quantized = kernel->int8_cache;
  CHECK(check_call(&call, model->rotary_positions));
  int gathered = batch * kept < tokens; /* the last layer takes the returned rows only, moved to the front */
  for (size_t l = 0; l < model->layer_count; ++l) {
    const Layer *layer = &model->layers[l];
    call.query_norm = layer->query_norm.value ? layer->query_norm.data : NULL;
    call.key_norm = layer->key_norm.value ? layer->key_norm.data : NULL;
    call.cache_key = layer->cache_key, call.cache_value = layer->cache_value;
    call.key_scale = kernel->int8_cache ? layer->key_scale.data : NULL, call.value_scale = kernel->int8_cache ? layer->value_scale.data : NULL;
    rms_norm(x, layer->input_norm.data, tokens, hidden, kernel->epsilon, h);
    CHECK(matmul_run(context, h, tokens, hidden, layer->qkv.data, layer->qkv_scales.data, model->packed, wide));
    if (kernel->qkv_bias)
      for (int64_t t = 0; t < tokens; ++t) add(wide + t * model->packed, layer->qkv_bias.data, model->packed);
    int64_t rows = tokens; /* that go on through the layer */
    if (l + 1 == model->layer_count && gathered) call.needed = positions, call.needed_count = kept, rows = batch * kept;
    CHECK(attention_run(context, &call));
    if (rows < tokens) {
      keep_returned(x, hidden, batch, width, positions, kept, h);
      keep_returned(model->attended, heads * dim, batch, width, positions, kept, wide);
    }
    CHECK(matmul_run(context, model->attended, rows, heads * dim, layer->out.data, layer->out_scales.data, hidden, model->update));
    add(x, model->update, rows * hidden);
    rms_norm(x, layer->post_norm.data, rows, hidden, kernel->epsilon, h);
    CHECK(matmul_run(context, h, rows, hidden, layer->gate_up.data, layer->gate_up_scales.data, model->mixer, wide));
    if (kernel->experts) CHECK(route_experts(context, model, layer, rows));
    if (model->ffn) {
      /* A prompt's spread over the threads: on one, its SiLUs (an expf each) made small-coder's prefill of 400
         tokens 0.92x as fast as the node-by-node kernels' (1.03x spread). */
      size_t items = (size_t)((rows + GATE_ROWS - 1) / GATE_ROWS);
      CHECK(for_each_item(items > 1 ? context : NULL, gate_rows, items, &(GateRows){.model = model, .tokens = rows}));
      CHECK(matmul_run(context, model->gated, rows, model->ffn, layer->down.data, layer->down_scales.data, hidden, model->update));
    }
    if (kernel->experts) mix_shared(model, rows);
    add(x, kernel->experts ? model->routed : model->update, rows * hidden);
  }
  for (int64_t row = 0; row < batch; ++row)
    for (int64_t n = 0; n < kept; ++n) {
      int64_t at = gathered ? row * kept + n : row * width + positions[row * kept + n];
      rms_norm(x + at * hidden, model->final_norm, 1, hidden, kernel->epsilon, model->last + (row * kept + n) * hidden);
    }
  return matmul_run(context, model->last, batch * kept, hidden, model->head, model->head_scales, model->vocab, logits);
}

/* `steps` greedy proposals of the call's only row into `chain`, continuing from `logits` (its last), after the
   row's `length` tokens (the call's included); `next` has room for one token's logits. */
__attribute__((noinline)) static OrtStatus *chain_greedily(OrtKernelContext *context, const Model *model, const float *logits, int32_t length, int64_t steps, int64_t *chain, float *next) {
  for (int64_t step = 0; step < steps; ++step) {
    chain[step] = argmax(logits, model->vocab);
    if (step + 1 == steps) break;
    int32_t seqlens_k = length + (int32_t)step, one = 1; /* the proposal's position: its length after the step, minus one */
    int64_t position = 0;
    CHECK(forward(context, model, &chain[step], 1, 1, &seqlens_k, &one, &position, 1, next));
    logits = next;
  }
  return NULL;
}

static OrtStatus *ORT_API_CALL compute(void *state, OrtKernelContext *context) {
  const Kernel *kernel = state;
  /* per layer: caches, norms, q/k/v, output, gate/up (an MoE layer's mixer), down (absent in an MoE layer without a
     shared expert); an int8 cache's scales, query and key norms, the weights' scales, the q/k/v bias and the experts'
     fc1 and fc2 where there are */
  size_t given, per_layer = 8 + (kernel->int8_cache ? 2 : 0) + (kernel->qk_norm ? 2 : 0) + (kernel->quantized ? 4 : 0) + (kernel->qkv_bias ? 1 : 0) + (kernel->experts ? 2 - !kernel->shared_expert : 0);
  CHECK(ort->KernelContext_GetInputCount(context, &given));
  if (given <= FIXED_INPUTS || (given - FIXED_INPUTS) % per_layer) return fail("moecc.FusedDecoder: the inputs are not whole layers");
  Tensor in[FIXED_INPUTS];
  for (size_t i = 0; i < FIXED_INPUTS; ++i) CHECK(input(context, i, &in[i]));
  Model model = {.kernel = kernel, .layer_count = (given - FIXED_INPUTS) / per_layer};
  model.layers = calloc(model.layer_count, sizeof(Layer));
  if (!model.layers) return fail("moecc.FusedDecoder: out of memory");
  float *scratch = NULL;
  OrtStatus *status = read_layers(context, kernel, model.layers, model.layer_count);
  if (status) goto done;

  int64_t batch = in[INPUT_IDS].shape[0], width = in[INPUT_IDS].shape[1], kept = in[LOGIT_POSITIONS].shape[1];
  model.vocab = in[EMBEDDING].shape[0], model.hidden = in[EMBEDDING].shape[1], model.dim = model.layers[0].past_key.shape[3];
  model.heads = kernel->num_heads, model.kv_heads = kernel->kv_num_heads, model.packed = (model.heads + 2 * model.kv_heads) * model.dim;
  model.mixer = model.layers[0].gate_up.shape[0] * 32; /* gate's and up's columns (and an MoE layer's routing), in panels of 32 */
  /* an MoE layer's mixer: 2 ffn columns, then the router's and the shared expert's gate's, up to a panel */
  int64_t route_columns = kernel->experts ? (kernel->experts + kernel->shared_expert + 31) / 32 * 32 : 0;
  model.ffn = kernel->experts && !kernel->shared_expert ? 0 : (model.mixer - route_columns) / 2;
  model.inter = kernel->experts ? model.layers[0].fc1.shape[1] / 2 : 0;
  model.capacity = model.layers[0].past_key.shape[2], model.rotary_positions = in[COS].shape[0];
  model.embedding = in[EMBEDDING].data, model.final_norm = in[FINAL_NORM].data, model.head = in[HEAD].data;
  model.head_scales = kernel->quantized ? in[HEAD_SCALES].data : NULL;
  model.cos = in[COS].data, model.sin = in[SIN].data;
  if (in[INPUT_IDS].rank != 2 || !shaped(&in[LOGIT_POSITIONS], 3, batch, -1, 1) || !shaped(&in[SEQLENS_K], 1, batch, -1, -1) ||
      !shaped(&in[QUERY_SEQLENS], 1, batch, -1, -1) || elements(&in[GREEDY_STEPS]) != 1 || in[EMBEDDING].rank != 2 ||
      !vector_of(&in[FINAL_NORM], model.hidden) || !panels(kernel, &in[HEAD], &in[HEAD_SCALES], model.vocab, model.hidden) || !shaped(&in[COS], 2, -1, model.dim / 2, -1) ||
      !shaped(&in[SIN], 2, model.rotary_positions, model.dim / 2, -1)) {
    status = fail("moecc.FusedDecoder: the ids, lengths, logit positions, greedy steps, rotary tables, embedding, final norm or head do not fit each other");
    goto done;
  }
  int mixer_fits = kernel->experts ? kernel->shared_expert ? model.ffn > 0 : model.mixer == route_columns : model.ffn > 0;
  if (!mixer_fits || !layers_fit(&model, batch)) {
    status = fail("moecc.FusedDecoder: a layer's cache or weights do not fit the model's sizes");
    goto done;
  }
  const int64_t *ids = in[INPUT_IDS].data, *positions = in[LOGIT_POSITIONS].data, steps = *(const int64_t *)in[GREEDY_STEPS].data;
  for (int64_t t = 0; t < batch * width && !status; ++t)
    if (ids[t] < 0 || ids[t] >= model.vocab) status = fail("moecc.FusedDecoder: a token id is outside the vocabulary");
  for (int64_t i = 0; i < batch * kept && !status; ++i)
    if (positions[i] < 0 || positions[i] >= width) status = fail("moecc.FusedDecoder: a logit position is outside the call");
  if (!status && (steps < 0 || steps > kernel->max_chain || (steps && (batch != 1 || kept < 1))))
    status = fail("moecc.FusedDecoder: greedy steps run from 0 to max_chain, on a batch of one row with logits");
  if (status) goto done;

  size_t weight_bytes = (size_t)elements(&in[HEAD]) * (kernel->quantized ? 1 : 4);
  for (size_t l = 0; l < model.layer_count; ++l) {
    const Layer *layer = &model.layers[l];
    const Tensor *weights[] = {&layer->qkv, &layer->out, &layer->gate_up, &layer->down, &layer->fc1, &layer->fc2};
    for (size_t i = 0; i < sizeof weights / sizeof *weights; ++i)
      if (weights[i]->value) weight_bytes += (size_t)elements(weights[i]) * (weights[i]->type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? 4 : 1);
  }
  model.small = weight_bytes <= SMALL_MODEL_BYTES;
  int64_t tokens = batch * width, widest = model.packed > model.mixer ? model.packed : model.mixer;
  int64_t experts = kernel->experts ? kernel->experts * kernel->expert_parts : 0;
  /* The call's buffers in one allocation, each starting a cache line (rows of a multiple of 16 floats then never
     straddle two): from a plain malloc, a prompt's routed experts, which read their tokens' rows in vectors of
     16 floats, took 1.3 times as long. */
  float *next;
  float **buffers[] = {&model.x, &model.h, &model.update, &model.wide, &model.attended, &model.gated, &model.last, &model.routed, &model.router, &next};
  int64_t sizes[] = {tokens * model.hidden, tokens * model.hidden, tokens * model.hidden, tokens * widest, tokens * model.heads * model.dim, tokens * model.ffn,
                     batch * kept * model.hidden, experts ? tokens * model.hidden : 0, tokens * experts, model.vocab};
  size_t total = 0;
  for (size_t i = 0; i < sizeof sizes / sizeof *sizes; ++i) total += (size_t)(sizes[i] + 15) / 16 * 16;
  scratch = aligned_alloc(64, total * sizeof(float));
  if (!scratch) {
    status = fail("moecc.FusedDecoder: out of memory");
    goto done;
  }
  for (size_t i = 0, offset = 0; i < sizeof sizes / sizeof *sizes; offset += (size_t)(sizes[i] + 15) / 16 * 16, ++i) *buffers[i] = scratch + offset;

  Tensor logits, chain;
  int64_t logits_shape[3] = {batch, kept, model.vocab}, chain_shape[2] = {batch, kernel->max_chain};
  if ((status = output(context, LOGITS, logits_shape, 3, &logits)) || (status = output(context, GREEDY_TOKENS, chain_shape, 2, &chain))) goto done;
  for (size_t l = 0; l < model.layer_count && !status; ++l) {
    Layer *layer = &model.layers[l];
    Tensor present[2];
    for (int kind = 0; kind < 2 && !status; ++kind) {
      const Tensor *past = kind ? &layer->past_value : &layer->past_key;
      status = output(context, PRESENTS + 2 * l + kind, past->shape, 4, &present[kind]);
      if (!status && present[kind].data != past->data) /* not bound to the past: start from a copy of it */
        memcpy(present[kind].data, past->data, (size_t)elements(past) * (kernel->int8_cache ? 1 : sizeof(float)));
    }
    layer->cache_key = present[0].data, layer->cache_value = present[1].data;
  }
  if (!status) status = forward(context, &model, ids, batch, width, in[SEQLENS_K].data, in[QUERY_SEQLENS].data, positions, kept, logits.data);
  int64_t *proposed = chain.data;
  for (int64_t i = 0; i < batch * kernel->max_chain; ++i) proposed[i] = -1;
  if (!status && steps) {
    int32_t length = ((const int32_t *)in[SEQLENS_K].data)[0] + 1;
    status = chain_greedily(context, &model, (const float *)logits.data + (kept - 1) * model.vocab, length, steps, proposed, next);
  } else if (!status && batch == 1 && kept <= kernel->max_chain) {
    /* A greedy verify's judge needs only these: read from here, not from the logits copied into numpy and
       reduced there, each a call into code the model's call left cold (decode() in runtime/speculative.py). */
    for (int64_t n = 0; n < kept; ++n) proposed[n] = argmax((const float *)logits.data + n * model.vocab, model.vocab);
  }
done:
  free(scratch);
  free(model.layers);
  return status;
}

/* The op, once per cache type, under a name of its own: ONNX Runtime infers a custom op's output types from the
   first registration whose declared inputs match the node's, and the two differ only in their outputs' type. */
typedef struct {
  OrtCustomOp op; /* first: ONNX Runtime hands back a pointer to it */
  const char *name;
  ONNXTensorElementDataType cache;
} FusedDecoderOp;

static OrtStatus *ORT_API_CALL create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **state) {
  (void)api;
  Kernel *kernel = calloc(1, sizeof(Kernel));
  if (!kernel) return fail("moecc.FusedDecoder: out of memory");
  kernel->int8_cache = ((const FusedDecoderOp *)op)->cache == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  OrtStatus *status = read_heads(info, "moecc.FusedDecoder", &kernel->num_heads, &kernel->kv_num_heads);
  kernel->qk_norm = int_attribute(info, "qk_norm", 0);
  kernel->max_chain = int_attribute(info, "max_chain", 0);
  kernel->quantized = int_attribute(info, "quantized", 0);
  kernel->epsilon = float_attribute(info, "epsilon", 1e-6f, NULL);
  kernel->scale = float_attribute(info, "scale", 0.f, NULL);
  kernel->qkv_bias = int_attribute(info, "qkv_bias", 0);
  kernel->experts = int_attribute(info, "experts", 0);
  kernel->expert_parts = int_attribute(info, "expert_parts", 1);
  kernel->shared_expert = int_attribute(info, "shared_expert", 0);
  if (!status && kernel->experts) status = read_expert_mix(info, "moecc.FusedDecoder: an MoE's k must be positive", &kernel->mix);
  if (!status && kernel->max_chain < 0) status = fail("moecc.FusedDecoder: max_chain must not be negative");
  int64_t flags[] = {kernel->qk_norm, kernel->quantized, kernel->qkv_bias, kernel->shared_expert};
  for (size_t i = 0; i < sizeof flags / sizeof *flags && !status; ++i)
    if (flags[i] != 0 && flags[i] != 1) status = fail("moecc.FusedDecoder: qk_norm, quantized, qkv_bias and shared_expert are 0 or 1");
  if (!status && kernel->experts &&
      (kernel->experts < 0 || kernel->expert_parts < 1 || kernel->mix.k > kernel->experts * kernel->expert_parts || kernel->quantized))
    status = fail("moecc.FusedDecoder: an MoE needs experts, expert_parts and k that fit each other, and float weights");
  if (status) {
    free(kernel);
    return status;
  }
  *state = kernel;
  return NULL;
}

static const char *ORT_API_CALL name(const OrtCustomOp *op) { return ((const FusedDecoderOp *)op)->name; }
static size_t ORT_API_CALL input_count(const OrtCustomOp *op) { (void)op; return FIXED_INPUTS + 1; }
static size_t ORT_API_CALL output_count(const OrtCustomOp *op) { (void)op; return PRESENTS + 1; }

static ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp *op, size_t index) {
  (void)op;
  if (index == INPUT_IDS || index == LOGIT_POSITIONS || index == GREEDY_STEPS) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  if (index == SEQLENS_K || index == QUERY_SEQLENS) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  /* the head and the layers' weights and caches: float, or 8-bit (quantized weights, an int8 cache), checked by the kernel */
  if (index == HEAD || index == FIXED_INPUTS) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

static ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp *op, size_t index) {
  if (index == PRESENTS) return ((const FusedDecoderOp *)op)->cache;
  return index == GREEDY_TOKENS ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

/* The last input (the layers': float, or float and 8-bit, or int8 caches) and output (their caches) repeat: one or more tensors. */
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_characteristic(const OrtCustomOp *op, size_t index) {
  (void)op;
  return index == FIXED_INPUTS ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
}

static OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_characteristic(const OrtCustomOp *op, size_t index) {
  (void)op;
  return index == PRESENTS ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
}

static int ORT_API_CALL one_or_more(const OrtCustomOp *op) { (void)op; return 1; }
static int ORT_API_CALL mixed(const OrtCustomOp *op) { (void)op; return 0; }

/* Written once, at load: sessions registering the library concurrently only read them. */
#define FUSED_DECODER_OP(NAME, CACHE)                                                                                                          \
  {                                                                                                                                            \
    .op = {.version = ORT_API_VERSION, .GetName = name, .GetExecutionProviderType = cpu_provider, .GetInputType = input_type,                  \
           .GetInputTypeCount = input_count, .GetOutputType = output_type, .GetOutputTypeCount = output_count, .KernelDestroy = free_state,    \
           .GetInputCharacteristic = input_characteristic, .GetOutputCharacteristic = output_characteristic, .GetInputMemoryType = cpu_memory, \
           .GetVariadicInputMinArity = one_or_more, .GetVariadicInputHomogeneity = mixed, .GetVariadicOutputMinArity = one_or_more,            \
           .GetVariadicOutputHomogeneity = one_or_more, .CreateKernelV2 = create, .KernelComputeV2 = compute},                                 \
    .name = NAME, .cache = CACHE                                                                                                               \
  }
static const FusedDecoderOp fused_decoder_ops[] = {FUSED_DECODER_OP("FusedDecoder", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
                                                   FUSED_DECODER_OP("FusedDecoderInt8Cache", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8)};

OrtStatus *add_fused_decoder_ops(OrtCustomOpDomain *domain) {
  for (size_t i = 0; i < sizeof fused_decoder_ops / sizeof *fused_decoder_ops; ++i) CHECK(ort->CustomOpDomain_Add(domain, &fused_decoder_ops[i].op));
  return NULL;
}
