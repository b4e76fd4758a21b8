/* moecc.DenseDecoder: a whole dense decoder (Qwen3, Llama) with its KV cache, in one node.

A draft model proposes one token per call, and the decoding loop calls it between the main model's verifies,
which leave the caches cold: on small-coder's 2-layer draft, ONNX Runtime's 24 nodes took 230 µs for the first
call after 96 MiB of other reads and 100 µs for the second, where the same arithmetic in one kernel's loops
takes a fraction of that (runtime/kernels/dense.py has the figures). This kernel runs the exported graph's
computation in one pass over its weights, with moecc.Attention's and moecc.MatMul's code for the attention and
the products. Its contract is the graph's (runtime/kernels/dense.py swaps it in when a session loads):

  inputs   0 input_ids [B, S] int64   1 seqlens_k [B] int32   2 query_seqlens [B] int32 (GroupQueryAttention's)
           3 logit_positions [B, N, 1] int64: the positions whose logits the call returns
           4 cos, 5 sin [positions, D/2]: rotary tables   6 embedding [V, H]   7 the final norm's weight [H]
           8 the head's weights in panels [V / 32, H, 32]
           9... per layer: past_key, past_value [B, KVH, capacity, D]; the input norm's weight [H]; q, k and v
             packed in panels [(H_q + 2 KVH) D / 32, H, 32]; with qk_norm, the query and key norms' weights [D];
             the output projection in panels [H / 32, H_q D, 32]; the post-attention norm's weight [H]; gate and
             up packed in panels [2F / 32, H, 32] (gate's F columns first); down in panels [H / 32, F, 32]
  outputs  0 logits [B, N, V]   1... per layer: present_key, present_value (in place when bound to the past)
  attrs    num_heads, kv_num_heads, qk_norm (0 or 1), epsilon (every RMS norm's), scale (0: 1/sqrt(D))

Every block is y = x + f(rms_norm(x)), SiLU-gated in the MLP; padding positions of a row are computed and
ignored, as in the graph. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"

enum { INPUT_IDS, SEQLENS_K, QUERY_SEQLENS, LOGIT_POSITIONS, COS, SIN, EMBEDDING, FINAL_NORM, HEAD, LAYERS, FIXED_INPUTS = LAYERS };

typedef struct {
  int64_t num_heads, kv_num_heads, qk_norm;
  float epsilon, scale;
} Kernel;

/* One layer's inputs, by name. */
typedef struct {
  Tensor past_key, past_value, input_norm, qkv, query_norm, key_norm, out, post_norm, gate_up, down;
} Layer;

/* out[r] = x[r] / rms(x[r]) * weight for `rows` rows of `width` floats. */
static void rms_norm(const float *x, const float *weight, int64_t rows, int64_t width, float epsilon, float *out) {
  for (int64_t r = 0; r < rows; ++r, x += width, out += width) {
    float squares = 0.f;
    for (int64_t i = 0; i < width; ++i) squares += x[i] * x[i];
    float inverse = 1.f / sqrtf(squares / (float)width + epsilon);
    for (int64_t i = 0; i < width; ++i) out[i] = x[i] * inverse * weight[i];
  }
}

static void add(float *x, const float *update, int64_t count) {
  for (int64_t i = 0; i < count; ++i) x[i] += update[i];
}

/* Whether `tensor` holds weights in panels [columns / 32, inner, 32] for these columns and inner size. */
static int panels(const Tensor *tensor, int64_t columns, int64_t inner) {
  return tensor->type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && columns % 32 == 0 && shaped(tensor, 3, columns / 32, inner, 32);
}

static int vector_of(const Tensor *tensor, int64_t size) { return tensor->type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && shaped(tensor, 1, size, -1, -1); }

static OrtStatus *read_layers(OrtKernelContext *context, const Kernel *kernel, size_t count, Layer *layers) {
  for (size_t l = 0, index = LAYERS; l < count; ++l) {
    Layer *layer = &layers[l];
    Tensor *order[10] = {&layer->past_key, &layer->past_value, &layer->input_norm, &layer->qkv, &layer->query_norm,
                         &layer->key_norm, &layer->out, &layer->post_norm, &layer->gate_up, &layer->down};
    for (size_t i = 0; i < 10; ++i) {
      if (!kernel->qk_norm && (i == 4 || i == 5)) {
        order[i]->value = NULL;
        continue;
      }
      CHECK(input(context, index++, order[i]));
    }
  }
  return NULL;
}

static OrtStatus *ORT_API_CALL compute(void *state, OrtKernelContext *context) {
  const Kernel *kernel = state;
  size_t given;
  CHECK(ort->KernelContext_GetInputCount(context, &given));
  size_t per_layer = kernel->qk_norm ? 10 : 8;
  if (given <= FIXED_INPUTS || (given - FIXED_INPUTS) % per_layer) return fail("moecc.DenseDecoder: the inputs are not whole layers");
  size_t layer_count = (given - FIXED_INPUTS) / per_layer;
  Tensor in[FIXED_INPUTS];
  for (size_t i = 0; i < FIXED_INPUTS; ++i) CHECK(input(context, i, &in[i]));
  Layer *layers = calloc(layer_count, sizeof(Layer));
  if (!layers) return fail("moecc.DenseDecoder: out of memory");
  OrtStatus *status = read_layers(context, kernel, layer_count, layers);
  float *scratch = NULL;
  if (status) goto done;

  int64_t batch = in[INPUT_IDS].shape[0], width = in[INPUT_IDS].shape[1], tokens = batch * width;
  int64_t vocab = in[EMBEDDING].shape[0], hidden = in[EMBEDDING].shape[1], dim = layers[0].past_key.shape[3];
  int64_t heads = kernel->num_heads, kv_heads = kernel->kv_num_heads, packed = (heads + 2 * kv_heads) * dim;
  int64_t ffn = layers[0].down.shape[1], kept = in[LOGIT_POSITIONS].shape[1];
  if (in[INPUT_IDS].rank != 2 || !shaped(&in[LOGIT_POSITIONS], 3, batch, -1, 1) || in[EMBEDDING].rank != 2 || !vector_of(&in[FINAL_NORM], hidden) ||
      !panels(&in[HEAD], vocab, hidden) || !shaped(&in[COS], 2, -1, dim / 2, -1) || !shaped(&in[SIN], 2, in[COS].shape[0], dim / 2, -1)) {
    status = fail("moecc.DenseDecoder: the ids, logit positions, rotary tables, embedding, final norm or head do not fit each other");
    goto done;
  }
  for (size_t l = 0; l < layer_count; ++l) {
    const Layer *layer = &layers[l];
    int fits = shaped(&layer->past_key, 4, batch, kv_heads, -1) && layer->past_key.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT &&
               layer->past_value.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && layer->past_key.shape[3] == dim &&
               !memcmp(layer->past_value.shape, layer->past_key.shape, sizeof(int64_t) * 4) && vector_of(&layer->input_norm, hidden) &&
               panels(&layer->qkv, packed, hidden) && panels(&layer->out, hidden, heads * dim) && vector_of(&layer->post_norm, hidden) &&
               panels(&layer->gate_up, 2 * ffn, hidden) && panels(&layer->down, hidden, ffn) &&
               (!kernel->qk_norm || (vector_of(&layer->query_norm, dim) && vector_of(&layer->key_norm, dim)));
    if (!fits) {
      status = fail("moecc.DenseDecoder: a layer's cache or weights do not fit the model's sizes");
      goto done;
    }
  }
  const int64_t *ids = in[INPUT_IDS].data, *positions = in[LOGIT_POSITIONS].data;
  for (int64_t t = 0; t < tokens; ++t)
    if (ids[t] < 0 || ids[t] >= vocab) {
      status = fail("moecc.DenseDecoder: a token id is outside the vocabulary");
      goto done;
    }
  for (int64_t i = 0; i < batch * kept; ++i)
    if (positions[i] < 0 || positions[i] >= width) {
      status = fail("moecc.DenseDecoder: a logit position is outside the call");
      goto done;
    }

  /* The residual stream x, its norm h, q/k/v, the attention's output, gate and up, their product, an update. */
  int64_t widest = packed > 2 * ffn ? packed : 2 * ffn;
  size_t floats = (size_t)(tokens * (3 * hidden + widest + heads * dim + ffn) + batch * kept * hidden);
  scratch = malloc(floats * sizeof(float));
  if (!scratch) {
    status = fail("moecc.DenseDecoder: out of memory");
    goto done;
  }
  float *x = scratch, *h = x + tokens * hidden, *update = h + tokens * hidden, *wide = update + tokens * hidden;
  float *attended = wide + tokens * widest, *gated = attended + tokens * heads * dim, *last = gated + tokens * ffn;
  const float *embedding = in[EMBEDDING].data;
  for (int64_t t = 0; t < tokens; ++t) memcpy(x + t * hidden, embedding + ids[t] * hidden, hidden * sizeof(float));

  Tensor logits;
  int64_t logits_shape[3] = {batch, kept, vocab};
  if ((status = output(context, 0, logits_shape, 3, &logits))) goto done;
  AttentionCall call = {.batch = batch, .new_width = width, .heads = heads, .kv_heads = kv_heads, .group = heads / kv_heads, .dim = dim,
                        .scale = kernel->scale != 0.f ? kernel->scale : 1.f / sqrtf((float)dim), .epsilon = kernel->epsilon,
                        .query_stride = packed, .key_stride = packed, .seqlens_k = in[SEQLENS_K].data,
                        .query_seqlens = in[QUERY_SEQLENS].data, .cos = in[COS].data, .sin = in[SIN].data, .output = attended};
  if (!shaped(&in[SEQLENS_K], 1, batch, -1, -1) || !shaped(&in[QUERY_SEQLENS], 1, batch, -1, -1)) {
    status = fail("moecc.DenseDecoder: seqlens_k and query_seqlens must be [B]");
    goto done;
  }
  for (size_t l = 0; l < layer_count && !status; ++l) {
    const Layer *layer = &layers[l];
    Tensor present[2];
    for (int kind = 0; kind < 2 && !status; ++kind) {
      const Tensor *past = kind ? &layer->past_value : &layer->past_key;
      status = output(context, 1 + 2 * l + kind, past->shape, 4, &present[kind]);
      if (!status && present[kind].data != past->data) /* not bound to the past: start from a copy of it */
        memcpy(present[kind].data, past->data, (size_t)elements(past) * sizeof(float));
    }
    if (status) break;
    call.capacity = layer->past_key.shape[2];
    call.query = wide, call.key = wide + heads * dim, call.value = call.key + kv_heads * dim;
    call.query_norm = layer->query_norm.value ? layer->query_norm.data : NULL;
    call.key_norm = layer->key_norm.value ? layer->key_norm.data : NULL;
    call.cache_key = present[0].data, call.cache_value = present[1].data;
    if ((status = check_call(&call, in[COS].shape[0]))) break;

    rms_norm(x, layer->input_norm.data, tokens, hidden, kernel->epsilon, h);
    if ((status = matmul_run(context, h, tokens, hidden, layer->qkv.data, packed, wide))) break;
    if ((status = attention_run(context, &call))) break;
    if ((status = matmul_run(context, attended, tokens, heads * dim, layer->out.data, hidden, update))) break;
    add(x, update, tokens * hidden);
    rms_norm(x, layer->post_norm.data, tokens, hidden, kernel->epsilon, h);
    if ((status = matmul_run(context, h, tokens, hidden, layer->gate_up.data, 2 * ffn, wide))) break;
    for (int64_t t = 0; t < tokens; ++t) {
      const float *gate = wide + t * 2 * ffn, *up = gate + ffn;
      float *out = gated + t * ffn;
      for (int64_t i = 0; i < ffn; ++i) out[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
    }
    if ((status = matmul_run(context, gated, tokens, ffn, layer->down.data, hidden, update))) break;
    add(x, update, tokens * hidden);
  }
  if (status) goto done;
  for (int64_t row = 0; row < batch; ++row)
    for (int64_t n = 0; n < kept; ++n)
      rms_norm(x + (row * width + positions[row * kept + n]) * hidden, in[FINAL_NORM].data, 1, hidden, kernel->epsilon, last + (row * kept + n) * hidden);
  status = matmul_run(context, last, batch * kept, hidden, in[HEAD].data, vocab, logits.data);
done:
  free(scratch);
  free(layers);
  return status;
}

static OrtStatus *ORT_API_CALL create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **state) {
  (void)op, (void)api;
  Kernel *kernel = calloc(1, sizeof(Kernel));
  if (!kernel) return fail("moecc.DenseDecoder: out of memory");
  OrtStatus *status = ort->KernelInfoGetAttribute_int64(info, "num_heads", &kernel->num_heads);
  if (!status) status = ort->KernelInfoGetAttribute_int64(info, "kv_num_heads", &kernel->kv_num_heads);
  if (!status && (kernel->kv_num_heads <= 0 || kernel->num_heads % kernel->kv_num_heads))
    status = fail("moecc.DenseDecoder: num_heads must be a multiple of kv_num_heads");
  kernel->qk_norm = int_attribute(info, "qk_norm", 0);
  kernel->epsilon = float_attribute(info, "epsilon", 1e-6f, NULL);
  kernel->scale = float_attribute(info, "scale", 0.f, NULL);
  if (status) {
    free(kernel);
    return status;
  }
  *state = kernel;
  return NULL;
}

static const char *ORT_API_CALL name(const OrtCustomOp *op) { (void)op; return "DenseDecoder"; }
static size_t ORT_API_CALL input_count(const OrtCustomOp *op) { (void)op; return FIXED_INPUTS + 1; }
static size_t ORT_API_CALL output_count(const OrtCustomOp *op) { (void)op; return 2; }

static ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp *op, size_t index) {
  (void)op;
  if (index == INPUT_IDS || index == LOGIT_POSITIONS) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  if (index == SEQLENS_K || index == QUERY_SEQLENS) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

/* The last input (the layers') and output (their caches) repeat: one or more float tensors. */
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_characteristic(const OrtCustomOp *op, size_t index) {
  (void)op;
  return index == FIXED_INPUTS ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
}

static OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_characteristic(const OrtCustomOp *op, size_t index) {
  (void)op;
  return index == 1 ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
}

static int ORT_API_CALL one_or_more(const OrtCustomOp *op) { (void)op; return 1; }

/* Written once, at load: sessions registering the library concurrently only read it. */
static const OrtCustomOp dense_op = {.version = ORT_API_VERSION, .GetName = name, .GetExecutionProviderType = cpu_provider,
                                     .GetInputType = input_type, .GetInputTypeCount = input_count, .GetOutputType = float_type,
                                     .GetOutputTypeCount = output_count, .KernelDestroy = free_state, .GetInputCharacteristic = input_characteristic,
                                     .GetOutputCharacteristic = output_characteristic, .GetInputMemoryType = cpu_memory,
                                     .GetVariadicInputMinArity = one_or_more, .GetVariadicInputHomogeneity = one_or_more,
                                     .GetVariadicOutputMinArity = one_or_more, .GetVariadicOutputHomogeneity = one_or_more,
                                     .CreateKernelV2 = create, .KernelComputeV2 = compute};

OrtStatus *add_dense_ops(OrtCustomOpDomain *domain) { return ort->CustomOpDomain_Add(domain, &dense_op); }
