/* The custom-op library's entry point and the helpers its kernels share. */
#define _GNU_SOURCE /* dladdr, RTLD_NODELETE */
#include "ops.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>

const OrtApi *ort;

OrtStatus *fail(const char *message) { return ort->CreateStatus(ORT_INVALID_ARGUMENT, message); }

OrtStatus *for_each_item(OrtKernelContext *context, void (*fn)(void *, size_t), size_t items, void *data) {
  if (context) return ort->KernelContext_ParallelFor(context, fn, items, 0, data);
  for (size_t item = 0; item < items; ++item) fn(data, item);
  return NULL;
}

typedef struct {
  void *data[SCRATCH_USES];
  size_t size[SCRATCH_USES];
} Scratch;

static pthread_key_t scratch_key;
static int scratch_key_made;

static void free_scratch(void *memory) {
  Scratch *scratch = memory;
  for (int use = 0; use < SCRATCH_USES; ++use) free(scratch->data[use]);
  free(scratch);
}

static void make_scratch_key(void) {
  /* A thread's exit calls free_scratch: the library stays loaded (RTLD_NODELETE) when ONNX Runtime lets go of it
     with the session options that registered it, so that later exits do not call into unmapped code. */
  Dl_info self;
  if (dladdr((void *)make_scratch_key, &self) && self.dli_fname) dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
  scratch_key_made = pthread_key_create(&scratch_key, free_scratch) == 0;
}

void *thread_scratch(int use, size_t bytes) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, make_scratch_key);
  if (!scratch_key_made) return NULL;
  Scratch *scratch = pthread_getspecific(scratch_key);
  if (!scratch) {
    scratch = calloc(1, sizeof *scratch);
    if (!scratch || pthread_setspecific(scratch_key, scratch)) {
      free(scratch);
      return NULL;
    }
  }
  if (scratch->size[use] < bytes) {
    free(scratch->data[use]);
    scratch->data[use] = malloc(bytes);
    scratch->size[use] = scratch->data[use] ? bytes : 0;
  }
  return scratch->data[use];
}

void fail_once(OrtStatus **error, const char *message) {
  OrtStatus *status = ort->CreateStatus(ORT_FAIL, message);
  if (!__atomic_compare_exchange_n(error, &(OrtStatus *){NULL}, status, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) ort->ReleaseStatus(status);
}

static OrtStatus *describe(const OrtValue *value, Tensor *tensor) {
  OrtTensorTypeAndShapeInfo *info;
  tensor->value = value;
  CHECK(ort->GetTensorMutableData((OrtValue *)value, &tensor->data));
  CHECK(ort->GetTensorTypeAndShape(value, &info));
  OrtStatus *status = ort->GetDimensionsCount(info, &tensor->rank);
  if (!status && tensor->rank > 4) status = fail("moecc kernels: an input has more than 4 dimensions");
  if (!status) status = ort->GetDimensions(info, tensor->shape, tensor->rank);
  if (!status) status = ort->GetTensorElementType(info, &tensor->type);
  ort->ReleaseTensorTypeAndShapeInfo(info);
  return status;
}

OrtStatus *input(OrtKernelContext *context, size_t index, Tensor *tensor) {
  const OrtValue *value;
  CHECK(ort->KernelContext_GetInput(context, index, &value));
  if (!value) {
    tensor->value = NULL;
    return NULL;
  }
  return describe(value, tensor);
}

OrtStatus *output(OrtKernelContext *context, size_t index, const int64_t *shape, size_t rank, Tensor *tensor) {
  OrtValue *value;
  CHECK(ort->KernelContext_GetOutput(context, index, shape, rank, &value));
  return describe(value, tensor);
}

float float_attribute(const OrtKernelInfo *info, const char *name, float fallback, int *set) {
  float value;
  OrtStatus *absent = ort->KernelInfoGetAttribute_float(info, name, &value);
  if (set) *set = !absent;
  if (!absent) return value;
  ort->ReleaseStatus(absent);
  return fallback;
}

int64_t int_attribute(const OrtKernelInfo *info, const char *name, int64_t fallback) {
  int64_t value;
  OrtStatus *absent = ort->KernelInfoGetAttribute_int64(info, name, &value);
  if (!absent) return value;
  ort->ReleaseStatus(absent);
  return fallback;
}

int64_t elements(const Tensor *tensor) {
  int64_t count = 1;
  for (size_t i = 0; i < tensor->rank; ++i) count *= tensor->shape[i];
  return count;
}

int shaped(const Tensor *tensor, size_t rank, int64_t first, int64_t second, int64_t third) {
  const int64_t expected[3] = {first, second, third};
  if (tensor->rank != rank) return 0;
  for (size_t i = 0; i < rank && i < 3; ++i)
    if (expected[i] >= 0 && tensor->shape[i] != expected[i]) return 0;
  return 1;
}

void ORT_API_CALL free_state(void *state) { free(state); }

const char *ORT_API_CALL cpu_provider(const OrtCustomOp *op) {
  (void)op;
  return "CPUExecutionProvider";
}

OrtMemType ORT_API_CALL cpu_memory(const OrtCustomOp *op, size_t index) {
  (void)op, (void)index;
  return OrtMemTypeDefault;
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp *op, size_t index) {
  (void)op, (void)index;
  return INPUT_OUTPUT_REQUIRED;
}

ONNXTensorElementDataType ORT_API_CALL float_type(const OrtCustomOp *op, size_t index) {
  (void)op, (void)index;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

size_t ORT_API_CALL one_output(const OrtCustomOp *op) {
  (void)op;
  return 1;
}

/* The library's entry point (SessionOptions.register_custom_ops_library). ONNX Runtime keeps the domain for
   the sessions made with these options; one small domain per registration is not released. The API pointer
   is written on every registration, always with the same value. */
OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  ort = base->GetApi(ORT_API_VERSION);
  if (!ort) return NULL; /* cannot even report: the runtime is older than the header */
  OrtCustomOpDomain *domain;
  CHECK(ort->CreateCustomOpDomain("moecc", &domain));
  OrtStatus *status = add_attention_ops(domain);
  if (!status) status = add_moe_ops(domain);
  if (!status) status = add_matmul_ops(domain);
  if (!status) status = add_fused_decoder_ops(domain);
  if (!status) status = ort->AddCustomOpDomain(options, domain);
  if (status) ort->ReleaseCustomOpDomain(domain);
  return status;
}
