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
/* Records the first error of a parallel phase; later ones are released. */
void fail_once(OrtStatus **error, const char *message);

/* The callbacks every op of the library gives ONNX Runtime alike: a kernel state freed with free(), the CPU
   provider, inputs in CPU memory, every input and output required (where an op has optional ones, its own). */
void ORT_API_CALL free_state(void *state);
const char *ORT_API_CALL cpu_provider(const OrtCustomOp *op);
OrtMemType ORT_API_CALL cpu_memory(const OrtCustomOp *op, size_t index);
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp *op, size_t index);
/* ... and those of ops whose inputs and outputs are all float, with one output (MoE, QMoE's output, MatMul). */
ONNXTensorElementDataType ORT_API_CALL float_type(const OrtCustomOp *op, size_t index);
size_t ORT_API_CALL one_output(const OrtCustomOp *op);

OrtStatus *add_attention_ops(OrtCustomOpDomain *domain);
OrtStatus *add_moe_ops(OrtCustomOpDomain *domain);
OrtStatus *add_matmul_ops(OrtCustomOpDomain *domain);

#endif
