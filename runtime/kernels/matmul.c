/* moecc.MatMul: x times a constant float32 weight matrix, reading the weights once per call however few rows x has.

A verify call runs every dense layer of the model on the k + 1 positions it checks. ONNX Runtime's CPU MatMul
took 1.5-1.6 times its one-row time for 5 rows on small-coder's [384, 3072] and [1536, 384] weights (2
threads, an AVX-512 EPYC, weights beyond the last-level cache), where reading the weights, the same bytes for
any row count, is the whole cost of one row: the product of a few rows should cost about what one does.
This kernel walks the weights in panels of 32 columns stored one after another, and takes several rows of x
at a time against each, their sums in registers, so that a call of up to CHUNK rows reads each weight from
memory once, in order, prefetched 8 KiB ahead: 1.13-1.17 times its one-row time for 5 rows there, and its one row 0.8-0.9
of ONNX Runtime's time (scripts/bench_kernels.py --kernel moecc.MatMul for the whole model). Its contract is that of ONNX Runtime's
MatMul with a constant B, except that B comes in panels (runtime/kernels/matmul.py swaps it in when a
session loads, feeding the weights through a Reshape and a Transpose that ONNX Runtime folds):

  inputs   0 x [..., K] float (rank 1 to 4)   1 weights [N / 32, K, 32]: panel p holds columns 32p .. 32p + 31
  outputs  0 [..., N] */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

enum { INPUT, WEIGHTS, INPUT_COUNT };
enum { PANEL = 32 }; /* columns of a panel: two AVX-512 vectors, four AVX2 ones */
/* A pass takes up to ROWS rows of x against a panel, or against half of it, their sums in registers: with
   AVX-512's 32 vector registers, 12 rows of the whole panel (24 sums, as MLAS's AVX-512 kernel); with AVX2's
   16, up to WIDE_ROWS = 3 rows of the whole panel (12 sums beside its 4 vectors) and 4 to 6 rows of each half
   in turn (12 sums, as MLAS's AVX2 kernel): on one core of an AVX2 EPYC, 42-44 G multiply-adds/s for 5 to 12
   rows, where passes of 3 rows over the whole panel made 34 (its peak: 47). A work item takes a panel for up
   to CHUNK rows, so that a prompt's rows spread over the threads too: four passes' worth with either width, so
   that a call of up to 24 rows on AVX2 (a verify of 23 proposals, or of two rows' 9 positions each in a batch)
   reads each weight once. With 12, a call of 13 to 24 rows read them twice: small-coder's MatMuls ran 0.84x as
   fast as ONNX Runtime's over 13 new tokens and 0.83x over 18, and with 24, 1.03x and 1.01x, where 1 and 9 new
   tokens stayed as they were (scripts/bench_kernels.py --kernel moecc.MatMul --widths 1 9 13 18). Where a
   verify's item (a call of up to CHUNK rows) makes several passes over its panel (more rows than WIDE_ROWS),
   they go BLOCK rows of the panel at a time, each block's passes one after another while it is in the core's
   first cache, so that the first pass's prefetches overlap the others' multiplications: over the whole panel
   each, the later passes read it from the second cache while the memory stood idle. With both, small-coder's
   verify of 9 positions on that machine ran its MatMuls 1.10-1.16x as fast as ONNX Runtime's, 0.92-0.93x
   before, and of 5, 1.01-1.07x against 0.94-0.97x (--widths 1 5 9). An item of 4 to ROWS rows (a verify of 3
   to 5 proposals) passes over each block's whole panel, WIDE_ROWS rows at a time, instead of over each half
   with all its rows: on one core of an AVX2 EPYC, small-coder's shared-expert products beyond the cache took
   0.86-0.91x the time for 4 to 6 rows, and the whole model's verify of 4 to 6 positions 0.97-0.99x
   (bench-moe's 0.92-0.97x). With 7 or more rows, passes of 3 took 1.05-1.2x what half-panel passes of 6 do,
   so those stay. A prompt's items pass over the whole panel each, with fewer sums to store and reload: its
   prefill of 400 tokens 0.96-0.99x as fast as ONNX Runtime's where blocks made it 0.92x (and passes of 3 by
   blocks, 0.86-0.89x as fast as now, 64 or 400 tokens). AVX-512 keeps whole-panel passes of 12 rows and no
   blocks, as measured when it was written. */
#if defined(__AVX512F__)
#define LANES 16
#define ROWS 12
#define WIDE_ROWS 12
#define CHUNK 48
#define BLOCK 0 /* none: each pass over the whole panel */
#elif defined(__AVX__)
#define LANES 8
#define ROWS 6
#define WIDE_ROWS 3
#define CHUNK 24
#define BLOCK 32
#else
#define LANES 4
#define ROWS 2
#define WIDE_ROWS 2
#define CHUNK 8
#define BLOCK 0
#endif
enum { VECTORS = PANEL / LANES, HALF = VECTORS / 2, AHEAD = 64 /* rows of the panel prefetched ahead: 8 KiB */ };
typedef float vector __attribute__((vector_size(LANES * sizeof(float))));

enum { QUANT_BLOCK = 32, QUANT_ROWS = 2, QUAD = 4 };
/* AVX-512 VNNI's byte multiply-add takes the weights' stored levels as they are (quantized_pass). */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define VNNI 1
#else
#define VNNI 0
#endif

typedef struct {
  int8_t *levels;  /* x's rows as levels, [M, K] */
  float *scales;   /* each block's scale, [M, K / QUANT_BLOCK] */
  int32_t *totals; /* with VNNI, each block's levels summed, [M, K / QUANT_BLOCK] */
} QuantizedRows;

typedef struct {
  int64_t rows, inner, columns; /* M, K, N */
  const float *x;
  const void *weights; /* float, or 8-bit where there are scales */
  const float *scales; /* 8-bit weights' scales: one per QUANT_BLOCK rows of a column, [N / 32, K / QUANT_BLOCK, 32] */
  float *packed;       /* x by blocks of ROWS rows, each K columns of `width` values; NULL for one row or 8-bit weights */
  /* ROWS, or a call's rows where they are fewer (a verify's): a pass then reads its rows' values from K * rows
     floats, not K * ROWS of which most are unused, which at K = 1536 overflowed the core's first cache beside the
     streaming panel (AVX-512, ROWS = 12: small-coder's shared expert's down projection over 2 to 9 rows took 1.09-1.16x as long, and
     its main model's verify of 5 tokens 1.06x; a decode step and a prompt as long either way). */
  int64_t width;
  QuantizedRows quantized; /* x as levels, for 8-bit weights */
  float *out;
} Call;

/* own[r] += x[r] * row for `count` rows of x and `vectors` vectors of a panel's row: constants where it is
   called, so that the sums stay in registers. */
static inline __attribute__((always_inline)) void accumulate(vector own[ROWS][VECTORS], const float *x, int count, int vectors, const vector *row) {
#pragma GCC unroll 12
  for (int r = 0; r < count; ++r) {
    float value = x[r];
#pragma GCC unroll 8
    for (int v = 0; v < vectors; ++v) own[r][v] += value * row[v];
  }
}

/* own[r] = sums[r] (in), or sums[r] = own[r] (out), for `count` rows of `vectors` vectors, VECTORS apart in sums. */
static inline __attribute__((always_inline)) void exchange(vector own[ROWS][VECTORS], vector *sums, int count, int vectors, int in) {
#pragma GCC unroll 12
  for (int r = 0; r < count; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < vectors; ++v) {
      if (in)
        own[r][v] = sums[r * VECTORS + v];
      else
        sums[r * VECTORS + v] = own[r][v];
    }
}

/* sums[r] += x[k, r] . panel[k] over rows k0 .. k1 - 1 of the panel, for `count` rows of x given column by
   column, `stride` floats apart, and the panel's first `vectors` vectors (count and vectors are constants where
   it is called: with the loops unrolled, the sums stay in registers; as one 32-float vector per row, GCC kept
   them on the stack). The sums come from and go back to `sums`, VECTORS apart per row. */
static inline __attribute__((always_inline)) void pass(const float *x, int64_t stride, int64_t k0, int64_t k1, const float *weights, vector *sums,
                                                       int count, int vectors, int prefetch) {
  vector own[ROWS][VECTORS];
  exchange(own, sums, count, vectors, 1);
  for (int64_t k = k0; k < k1; ++k) {
    vector row[VECTORS];
    /* Without it, 5 rows took 1.3-1.45 times one row's time: the hardware's prefetcher alone fell behind the
       loop. 8 KiB ahead measured better than 2 KiB or 16 KiB. */
    if (prefetch) {
      __builtin_prefetch(weights + (k + AHEAD) * PANEL);
      __builtin_prefetch(weights + (k + AHEAD) * PANEL + 16);
    }
#pragma GCC unroll 8
    for (int v = 0; v < vectors; ++v) memcpy(&row[v], weights + k * PANEL + v * LANES, sizeof row[v]);
    accumulate(own, x + k * stride, count, vectors, row);
  }
  exchange(own, sums, count, vectors, 0);
}

/* The whole panel in one pass, or each half in turn (the first half's pass prefetches both halves' lines). */
#define WIDE(count) \
  case count: pass(x, stride, k0, k1, weights, sums, count, VECTORS, 1); break;
#define HALVES(count)                                                              \
  case count:                                                                      \
    pass(x, stride, k0, k1, weights, sums, count, HALF, 1);                        \
    pass(x, stride, k0, k1, weights + HALF * LANES, sums + HALF, count, HALF, 0); \
    break;

static void pass_of(const float *x, int64_t stride, int64_t k0, int64_t k1, const float *weights, vector *sums, int64_t count) {
  switch (count) {
    WIDE(1) WIDE(2)
#if WIDE_ROWS > 2
    WIDE(3)
#endif
#if WIDE_ROWS > 3
    WIDE(4) WIDE(5) WIDE(6) WIDE(7) WIDE(8) WIDE(9) WIDE(10) WIDE(11) WIDE(12)
#elif ROWS > 3
    HALVES(4) HALVES(5) HALVES(6)
#endif
    default: break; /* count is 1 .. ROWS */
  }
}

/* 8-bit weights, as MatMulNBits keeps them (unsigned, zero point 128, a float scale per block of 32 rows of a
   column): a draft's, whose calls come right after a verify has taken the cache, with a quarter of the bytes to
   fetch again. They are multiplied in integers, as MatMulNBits's accuracy_level 4 (which the artifact asks for)
   lets ONNX Runtime do: each row of x is rounded to 8-bit levels per block of 32 with a scale of its own (its
   largest magnitude over 127), and a block's products are summed exactly in 32-bit integers before the two
   scales weigh them. Dequantizing every weight to a float for a row or two took 60 % of the draft's proposals
   (a chain of 8 on small-coder's draft, one core: 586 µs, and 248 with its products left out). The weights come
   relaid in quads, [N / 32, K / 4, 32, 4]: a 32-byte vector holds 4 rows of 8 columns, which one byte-pair
   multiply-add and one word-pair one turn into 8 columns' sums over 4 rows. */

/* x's rows as 8-bit levels, block by block: the block's largest magnitude maps to 127, rounded to nearest even. */
static void quantize_rows(const float *restrict x, int64_t rows, int64_t inner, QuantizedRows *out) {
  /* Locals, restrict: stores through out->levels (bytes, which may alias anything) made GCC reload the pointer
     and round one value at a time, a quarter of matmul_run's samples (perf) in small-coder's draft proposals.
     nearbyintf rounds as lrintf (to nearest even), and vectorizes. */
  int8_t *restrict levels = out->levels;
  float *restrict scales = out->scales;
  for (int64_t block = 0; block < rows * inner / QUANT_BLOCK; ++block) {
    const float *values = x + block * QUANT_BLOCK;
    int8_t *level = levels + block * QUANT_BLOCK;
    float top = 0.f;
    for (int k = 0; k < QUANT_BLOCK; ++k) top = fmaxf(top, fabsf(values[k]));
    float scale = top / 127.f, inverse = scale ? 1.f / scale : 0.f;
    scales[block] = scale;
    for (int k = 0; k < QUANT_BLOCK; ++k) level[k] = (int8_t)(int32_t)nearbyintf(values[k] * inverse);
#if VNNI
    int32_t total = 0;
    for (int k = 0; k < QUANT_BLOCK; ++k) total += level[k];
    out->totals[block] = total;
#endif
  }
}

#if VNNI
/* One instruction sums 4 byte products into each 32-bit lane, unsigned weights times signed levels, without
   saturating: the weights go in as stored (their levels plus 128), and 128 times the block's levels summed comes
   off the block's total after. The same integers as the AVX2 loop's, in a twelfth of its instructions per weight
   byte: small-coder's draft (a 1-thread session, a 2-core Xeon) chained 8 proposals in 183 µs instead of 306. */
typedef __m512i sums_i;
typedef __m512 sums_f;
enum { COLUMNS_PER_VECTOR = 16, LEVEL_OFFSET = 128 };
static inline sums_i zero_sums(void) { return _mm512_setzero_si512(); }
static inline sums_i broadcast_quad(int32_t four) { return _mm512_set1_epi32(four); }
static inline sums_i load_quads(const uint8_t *weights) { return _mm512_loadu_si512(weights); }
static inline sums_i add_products(sums_i total, sums_i weights, sums_i x) { return _mm512_dpbusd_epi32(total, weights, x); }
static inline sums_f as_floats(sums_i total, int32_t offset) { return _mm512_cvtepi32_ps(_mm512_sub_epi32(total, _mm512_set1_epi32(offset))); }
static inline void add_weighed(float *sums, sums_f values, float level_scale, const float *scales) {
  _mm512_storeu_ps(sums, _mm512_fmadd_ps(values, _mm512_mul_ps(_mm512_set1_ps(level_scale), _mm512_loadu_ps(scales)), _mm512_loadu_ps(sums)));
}
#elif defined(__AVX2__)
/* The byte-pair multiply-add takes unsigned bytes times signed ones. The weights (levels less 128: -128 .. 127)
   go in as magnitudes, their signs moved onto x's levels (-127 .. 127, so negating one cannot overflow): each
   pair's sum stays within 2 * 128 * 127, short of 16 bits' limit. */
typedef __m256i sums_i;
typedef __m256 sums_f;
enum { COLUMNS_PER_VECTOR = 8, LEVEL_OFFSET = 0 };
static inline sums_i zero_sums(void) { return _mm256_setzero_si256(); }
static inline sums_i broadcast_quad(int32_t four) { return _mm256_set1_epi32(four); }
static inline sums_i load_quads(const uint8_t *weights) { return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)weights), _mm256_set1_epi8((char)0x80)); }
static inline sums_i add_products(sums_i total, sums_i weights, sums_i x) {
  return _mm256_add_epi32(total, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(weights), _mm256_sign_epi8(x, weights)), _mm256_set1_epi16(1)));
}
static inline sums_f as_floats(sums_i total, int32_t offset) { return (void)offset, _mm256_cvtepi32_ps(total); /* the weights came in signed */ }
static inline void add_weighed(float *sums, sums_f values, float level_scale, const float *scales) {
  _mm256_storeu_ps(sums, _mm256_fmadd_ps(values, _mm256_mul_ps(_mm256_set1_ps(level_scale), _mm256_loadu_ps(scales)), _mm256_loadu_ps(sums)));
}
#endif

/* sums[r][c] += over x's blocks: x's block scale * the weights' block scale * the block's integer dot product, for
   `count` rows (<= QUANT_ROWS, a constant where it is called) of levels `inner` apart, against one 8-bit panel. */
static inline __attribute__((always_inline)) void quantized_pass(const int8_t *levels, const float *level_scales, const int32_t *level_totals,
                                                                 int64_t inner, const uint8_t *weights, const float *scales, float *sums, int count) {
  int64_t blocks = inner / QUANT_BLOCK;
#if VNNI || defined(__AVX2__)
  enum { COLUMN_VECTORS = PANEL / COLUMNS_PER_VECTOR };
  for (int64_t block = 0; block < blocks; ++block) {
    sums_i total[QUANT_ROWS][COLUMN_VECTORS];
#pragma GCC unroll 2
    for (int r = 0; r < count; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < COLUMN_VECTORS; ++v) total[r][v] = zero_sums();
    const uint8_t *quads = weights + block * QUANT_BLOCK * PANEL;
#pragma GCC unroll 8
    for (int quad = 0; quad < QUANT_BLOCK / QUAD; ++quad) {
      sums_i x[QUANT_ROWS];
#pragma GCC unroll 2
      for (int r = 0; r < count; ++r) {
        int32_t four;
        memcpy(&four, levels + r * inner + block * QUANT_BLOCK + quad * QUAD, sizeof four);
        x[r] = broadcast_quad(four);
      }
#pragma GCC unroll 4
      for (int v = 0; v < COLUMN_VECTORS; ++v) {
        sums_i w = load_quads(quads + (quad * PANEL + v * COLUMNS_PER_VECTOR) * QUAD);
#pragma GCC unroll 2
        for (int r = 0; r < count; ++r) total[r][v] = add_products(total[r][v], w, x[r]);
      }
    }
#pragma GCC unroll 2
    for (int r = 0; r < count; ++r) {
      int32_t offset = LEVEL_OFFSET ? LEVEL_OFFSET * level_totals[r * blocks + block] : 0;
#pragma GCC unroll 4
      for (int v = 0; v < COLUMN_VECTORS; ++v)
        add_weighed(sums + r * PANEL + v * COLUMNS_PER_VECTOR, as_floats(total[r][v], offset), level_scales[r * blocks + block], scales + block * PANEL + v * COLUMNS_PER_VECTOR);
    }
  }
#else
  (void)level_totals;
  for (int64_t block = 0; block < blocks; ++block)
    for (int r = 0; r < count; ++r)
      for (int c = 0; c < PANEL; ++c) {
        int32_t total = 0;
        for (int k = 0; k < QUANT_BLOCK; ++k)
          total += ((int32_t)weights[(block * QUANT_BLOCK + k) / QUAD * QUAD * PANEL + c * QUAD + k % QUAD] - 128) * levels[r * inner + block * QUANT_BLOCK + k];
        sums[r * PANEL + c] += (float)total * (level_scales[r * blocks + block] * scales[block * PANEL + c]);
      }
#endif
}

/* Rows first .. last - 1 of x, as levels, against 8-bit panel `panel_index`, QUANT_ROWS at a time. */
static void multiply_quantized(const Call *call, int64_t panel_index, int64_t first, int64_t last, vector *sums) {
  const uint8_t *weights = (const uint8_t *)call->weights + panel_index * call->inner * PANEL;
  const float *scales = call->scales + panel_index * (call->inner / QUANT_BLOCK) * PANEL;
  for (int64_t row = first; row < last; row += QUANT_ROWS) {
    const int8_t *levels = call->quantized.levels + row * call->inner;
    const float *level_scales = call->quantized.scales + row * (call->inner / QUANT_BLOCK);
    const int32_t *level_totals = VNNI ? call->quantized.totals + row * (call->inner / QUANT_BLOCK) : NULL; /* none without VNNI */
    float *own = (float *)(sums + (row - first) * VECTORS);
    if (last - row >= 2)
      quantized_pass(levels, level_scales, level_totals, call->inner, weights, scales, own, 2);
    else
      quantized_pass(levels, level_scales, level_totals, call->inner, weights, scales, own, 1);
  }
}

/* Work item of the first phase: rows ROWS * item .. of x into their block of `packed`, column by column, so that
   a pass reads its rows' values for a k from one cache line. Read in place, the rows K floats apart (6 KiB at
   K = 1536) fell into few of the first cache's sets, and a 400-row call took 9 times ONNX Runtime's. */
static void pack(void *data, size_t item) {
  const Call *call = data;
  int64_t first = (int64_t)item * ROWS, count = call->rows - first < ROWS ? call->rows - first : ROWS;
  float *block = call->packed + first * call->inner;
  const float *x = call->x + first * call->inner;
  for (int64_t k = 0; k < call->inner; ++k) /* the block written in order: a prompt's prefill 0.98x the time of row by row */
    for (int64_t r = 0; r < count; ++r) block[k * call->width + r] = x[r * call->inner + k];
}

/* Rows first .. last - 1 of x against float panel `panel_index`, in passes of up to ROWS rows (of up to WIDE_ROWS
   where an item of at most ROWS rows goes by blocks). */
_Static_assert(ROWS % WIDE_ROWS == 0, "a pass's rows lie in one packed block");
static void multiply_float(const Call *call, int64_t panel_index, int64_t first, int64_t last, vector *sums) {
  const float *weights = (const float *)call->weights + panel_index * call->inner * PANEL;
  int64_t rows = last - first, blocked = BLOCK && rows > WIDE_ROWS && call->rows <= CHUNK;
  int64_t block = blocked ? BLOCK : call->inner, rows_per_pass = blocked && rows <= ROWS ? WIDE_ROWS : ROWS;
  for (int64_t k0 = 0; k0 < call->inner; k0 += block) {
    int64_t k1 = k0 + block < call->inner ? k0 + block : call->inner;
    for (int64_t row = first; row < last; row += rows_per_pass) {
      int64_t count = last - row < rows_per_pass ? last - row : rows_per_pass;
      const float *x = call->packed ? call->packed + (row - row % ROWS) * call->inner + row % ROWS : call->x;
      pass_of(x, call->packed ? call->width : 1, k0, k1, weights, sums + (row - first) * VECTORS, count);
    }
  }
}

/* Work item of the second phase: one panel against up to CHUNK rows. */
static void multiply(void *data, size_t item) {
  const Call *call = data;
  int64_t panels = call->columns / PANEL, panel_index = (int64_t)item % panels, first = (int64_t)item / panels * CHUNK;
  int64_t last = first + CHUNK < call->rows ? first + CHUNK : call->rows;
  vector sums[CHUNK * VECTORS];
  memset(sums, 0, (size_t)(last - first) * sizeof(vector) * VECTORS);
  (call->scales ? multiply_quantized : multiply_float)(call, panel_index, first, last, sums);
  for (int64_t r = 0; r < last - first; ++r) memcpy(call->out + (first + r) * call->columns + panel_index * PANEL, sums + r * VECTORS, sizeof(vector) * VECTORS);
}

static OrtStatus *ORT_API_CALL compute(void *state, OrtKernelContext *context) {
  (void)state;
  Tensor in[INPUT_COUNT], out;
  for (size_t i = 0; i < INPUT_COUNT; ++i) CHECK(input(context, i, &in[i]));
  if (in[INPUT].rank < 1 || in[WEIGHTS].rank != 3 || in[WEIGHTS].shape[2] != PANEL)
    return fail("moecc.MatMul: x must be [..., K] and the weights [N / 32, K, 32]");
  int64_t inner = in[WEIGHTS].shape[1], columns = in[WEIGHTS].shape[0] * PANEL;
  if (in[INPUT].shape[in[INPUT].rank - 1] != inner) return fail("moecc.MatMul: x's last dimension is not the weights' K");
  int64_t shape[4];
  memcpy(shape, in[INPUT].shape, sizeof(int64_t) * in[INPUT].rank);
  shape[in[INPUT].rank - 1] = columns;
  CHECK(output(context, 0, shape, in[INPUT].rank, &out));
  int64_t rows = inner ? elements(&in[INPUT]) / inner : 0;
  return matmul_run(context, in[INPUT].data, rows, inner, in[WEIGHTS].data, NULL, columns, out.data);
}

OrtStatus *matmul_run(OrtKernelContext *context, const float *x, int64_t rows, int64_t inner, const void *panels, const float *scales, int64_t columns,
                      float *out) {
  if (scales && inner % QUANT_BLOCK) return fail("moecc kernels: 8-bit weights need a multiple of 32 rows");
  Call call = {.rows = rows, .inner = inner, .columns = columns, .x = x, .weights = panels, .scales = scales, .out = out};
  if (call.rows == 0 || call.columns == 0) return NULL;
  if (call.inner == 0) {
    memset(call.out, 0, (size_t)(call.rows * call.columns) * sizeof(float));
    return NULL;
  }
  OrtStatus *status = NULL;
  int64_t blocks = (call.rows + ROWS - 1) / ROWS;
  if (scales) { /* x as levels, here: a few microseconds beside the products, even for a prompt's rows */
    call.quantized.levels = malloc((size_t)(call.rows * call.inner));
    call.quantized.scales = malloc((size_t)(call.rows * call.inner / QUANT_BLOCK) * sizeof(float));
    call.quantized.totals = VNNI ? malloc((size_t)(call.rows * call.inner / QUANT_BLOCK) * sizeof(int32_t)) : NULL;
    if (call.quantized.levels && call.quantized.scales && (call.quantized.totals || !VNNI))
      quantize_rows(x, call.rows, call.inner, &call.quantized);
    else
      status = fail("moecc.MatMul: out of memory");
  } else if (call.rows > 1) {
    call.width = call.rows < ROWS ? call.rows : ROWS;
    call.packed = malloc((size_t)(blocks * ROWS * call.inner) * sizeof(float));
    if (!call.packed) return fail("moecc.MatMul: out of memory");
    if (blocks > 1) /* a prompt's rows: packed by the threads */
      status = for_each_item(context, pack, (size_t)blocks, &call);
    else /* a verify's few: a copy too small to hand to the thread pool */
      pack(&call, 0);
  }
  size_t items = (size_t)((call.rows + CHUNK - 1) / CHUNK * (call.columns / PANEL));
  if (!status) status = for_each_item(context, multiply, items, &call);
  free(call.packed);
  free(call.quantized.levels);
  free(call.quantized.scales);
  free(call.quantized.totals);
  return status;
}

static OrtStatus *ORT_API_CALL create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **state) {
  (void)op, (void)api, (void)info;
  *state = NULL;
  return NULL;
}

static const char *ORT_API_CALL name(const OrtCustomOp *op) { (void)op; return "MatMul"; }
static size_t ORT_API_CALL input_count(const OrtCustomOp *op) { (void)op; return INPUT_COUNT; }

/* Written once, at load: sessions registering the library concurrently only read it. */
static const OrtCustomOp matmul_op = {.version = ORT_API_VERSION, .GetName = name, .GetExecutionProviderType = cpu_provider,
                                      .GetInputType = float_type, .GetInputTypeCount = input_count, .GetOutputType = float_type,
                                      .GetOutputTypeCount = one_output, .KernelDestroy = free_state, .GetInputCharacteristic = required,
                                      .GetOutputCharacteristic = required, .GetInputMemoryType = cpu_memory, .CreateKernelV2 = create,
                                      .KernelComputeV2 = compute};

OrtStatus *add_matmul_ops(OrtCustomOpDomain *domain) { return ort->CustomOpDomain_Add(domain, &matmul_op); }
