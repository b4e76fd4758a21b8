/* What moecc's kernels share: ONNX Runtime's API, reading a kernel's inputs, reporting errors. */
#ifndef MOECC_OPS_H
#define MOECC_OPS_H

#include <stdint.h>

#include "onnxruntime_c_api.h"

extern const OrtApi *ort; /* set when the library registers its ops */

#define CHECK(expr)                        \
  do {                                     \
    OrtStatus *status_ = (expr);           \
    if (status_) return status_;           \
  } while (0)

OrtStatus *fail(const char *message);

/* Keeps a vector loaded once in a register: GCC would fold its load into each multiply-add that reads it, one
   load per use (where loads, not multiply-adds, then bound the loop). */
#ifdef __AVX__
#define KEEP(v) __asm__("" : "+x"(v))
#else
#define KEEP(v) (void)(v)
#endif

/* An input or output as the kernels read it: its data, shape (at most 4 dimensions) and element type; an
   absent optional input has no value. */
typedef struct {
  const OrtValue *value;
  void *data;
  int64_t shape[4];
  size_t rank;
  ONNXTensorElementDataType type;
} Tensor;

OrtStatus *input(OrtKernelContext *context, size_t index, Tensor *tensor);
OrtStatus *output(OrtKernelContext *context, size_t index, const int64_t *shape, size_t rank, Tensor *tensor);
int64_t elements(const Tensor *tensor);
/* An optional attribute: its value, or `fallback` when the node does not set it (*set tells which, if given). */
float float_attribute(const OrtKernelInfo *info, const char *name, float fallback, int *set);
int64_t int_attribute(const OrtKernelInfo *info, const char *name, int64_t fallback);
/* Whether the tensor has this rank and these leading dimensions (-1: any; only the first three are checked). */
int shaped(const Tensor *tensor, size_t rank, int64_t first, int64_t second, int64_t third);
/* fn(data, item) for every item < items: spread over the session's threads, or where `context` is NULL, in
   order on the calling thread (for calls smaller than what waking the threads costs: moecc.FusedDecoder's). */
OrtStatus *for_each_item(OrtKernelContext *context, void (*fn)(void *, size_t), size_t items, void *data);
/* Records the first error of a parallel phase; later ones are released. */
void fail_once(OrtStatus **error, const char *message);
/* At least `bytes` of memory that the calling thread keeps for `use` from call to call, grown when a call asks for
   more and freed when the thread exits; NULL if memory runs out. Buffers whose size follows the context (the
   attention's scores) come from here, asked for at the most a call on the cache can need, so that decoding
   allocates nothing that grows with the context. */
enum { SCRATCH_SCORES, SCRATCH_PARTS, SCRATCH_USES };
void *thread_scratch(int use, size_t bytes);

/* The callbacks every op of the library gives ONNX Runtime alike: a kernel state freed with free(), the CPU
   provider, inputs in CPU memory, every input and output required (where an op has optional ones, its own). */
void ORT_API_CALL free_state(void *state);
const char *ORT_API_CALL cpu_provider(const OrtCustomOp *op);
OrtMemType ORT_API_CALL cpu_memory(const OrtCustomOp *op, size_t index);
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp *op, size_t index);
/* ... and those of ops whose inputs and outputs are all float, with one output (MoE, QMoE's output, MatMul). */
ONNXTensorElementDataType ORT_API_CALL float_type(const OrtCustomOp *op, size_t index);
size_t ORT_API_CALL one_output(const OrtCustomOp *op);

/* One attention call's geometry and buffers (attention.c), shared by its work items and filled by the kernels
   that run it: moecc.Attention and moecc.FusedDecoder. */
typedef struct {
  int64_t batch, new_width, heads, kv_heads, group, dim, capacity;
  int64_t span; /* a prompt's new tokens per walk of the cache (walk_span) */
  int64_t column_span; /* ... per column walk, 0 where the kernel has none (column_span) */
  int64_t parts;        /* a step's parts per token's cache, the most any of its tokens has (attend_step) */
  float *parts_results; /* ... and their results (attend_block) */
  float scale;
  const float *query, *key, *value, *cos, *sin, *key_scale, *value_scale, *query_norm, *key_norm;
  float epsilon;
  int64_t query_stride, key_stride; /* floats per token: packed inputs hold a token's queries, keys and values in one row */
  const int32_t *seqlens_k, *query_seqlens;
  float *output;
  void *cache_key, *cache_value; /* float or int8 */
  int quantized;
  /* Where set, the only new tokens whose outputs the call needs: row r's needed[r * needed_count ...]; every token
     is still cached, and a block of tokens wholly before a row's first needed one gets no attention. */
  const int64_t *needed;
  int64_t needed_count;
  OrtStatus *error;
} AttentionCall;

/* Whether the kernel takes the call's head size and group, and every row's lengths fit the call, the cache and
   the rotary tables' `positions`. */
OrtStatus *check_call(const AttentionCall *call, int64_t positions);
/* An attention op's num_heads and kv_num_heads attributes, kv_num_heads dividing num_heads (`op` names it). */
OrtStatus *read_heads(const OrtKernelInfo *info, const char *op, int64_t *num_heads, int64_t *kv_num_heads);
/* Cache the call's new keys and values and attend: the call's queries rotated, then attended, into its output. */
OrtStatus *attention_run(OrtKernelContext *context, AttentionCall *call);
/* out [rows, columns] = x [rows, inner] times weights in panels [columns / 32, inner, 32] (matmul.c): float, or
   with `scales`, 8-bit (unsigned, zero point 128), each value times the scale of its column's block of 32 rows
   ([columns / 32, inner / 32, 32]). */
OrtStatus *matmul_run(OrtKernelContext *context, const float *x, int64_t rows, int64_t inner, const void *panels, const float *scales, int64_t columns,
                      float *out);

/* A mixture of experts' routing and activation (moe.c): each token's k experts are the k largest of the softmax
   of its router logits, their weights divided by their sum where `normalize`; swiglu(gate, linear) =
   g * sigmoid(alpha g) * (l + beta), g and l clamped to `limit` where `limited`. */
typedef struct {
  int64_t k;
  int normalize, limited;
  float alpha, beta, limit;
  float offset; /* moecc.QMoE: the levels' offset (8 or 128); 0 for float weights */
} ExpertMix;
/* A node's k (positive, else the error `message`), normalize_routing_weights, activation_alpha, activation_beta
   and swiglu_limit attributes, as ONNX Runtime's MoE reads them. */
OrtStatus *read_expert_mix(const OrtKernelInfo *info, const char *message, ExpertMix *mix);
/* out [tokens, H] = the mix of each token's chosen experts of x [tokens, H], routed by logits [tokens, E], the float
   weights as moecc.MoE takes them: fc1 [E, 2I, H] (gate and linear rows interleaved), fc2 transposed [E, I, H]. */
OrtStatus *experts_run(OrtKernelContext *context, const ExpertMix *mix, const float *x, const float *logits, int64_t tokens, int64_t experts,
                       int64_t hidden, int64_t inter, const float *fc1, const float *fc2, float *out);

OrtStatus *add_attention_ops(OrtCustomOpDomain *domain);
OrtStatus *add_moe_ops(OrtCustomOpDomain *domain);
OrtStatus *add_matmul_ops(OrtCustomOpDomain *domain);
OrtStatus *add_fused_decoder_ops(OrtCustomOpDomain *domain);

#endif
