/* moecc.Attention: GroupQueryAttention for the CPU, reading each key/value head once per group.

ONNX Runtime's CPU GroupQueryAttention runs a matrix product per query head against its key/value head, so
at long contexts a decode step spends several times what reading the cache costs. This kernel walks a
key/value head's cached rows once for all the query heads that share it, and reads an int8 cache without
widening it first. Its contract is the node's it replaces (runtime/kernels/session.py swaps it in when a
session loads):

  inputs   0 query [B, S, H*D]   1 key [B, S, KVH*D]   2 value [B, S, KVH*D]
             (or query [B, S, (H + 2 KVH) * D] with all three packed, and no key or value)
           3 past_key, 4 past_value [B, KVH, capacity, D], float or int8 (per-channel scales: 9, 10)
           5 seqlens_k [B] int32: each row's length after the call, minus one
           6 cos, 7 sin [positions, D/2]: rotary tables (half-split, not interleaved)
           8 query_seqlens [B] int32: each row's new tokens; the rest of the S are padding
           9 key_scale, 10 value_scale [1, KVH, 1, D]: an int8 cache's scales (optional)
           11 query_norm, 12 key_norm [D]: RMS-norm weights applied to each query and key head before the
              rotary embedding (Qwen3's q_norm and k_norm; optional)
  outputs  0 output [B, S, H*D]  1 present_key, 2 present_value: the past buffers with the new rows written,
           in place when the caller binds them to the past (a decode loop does), else a copy.
  attrs    num_heads, kv_num_heads, scale (0: 1/sqrt(D)), epsilon (the norms', default 1e-6)

Padding positions of a row produce zeros and write nothing to the cache. A step's tokens (a decode step's one, a
verify's up to 33) get bit for bit what each token's own decode step of its row alone gets (attend_block). */

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512BW__) && defined(__x86_64__) && defined(__linux__)
#define TILES 1      /* AMX: an int8 cache's scores in tile multiplies (amx_scores) */
#define _GNU_SOURCE /* syscall, to ask Linux for the tiles' state */
#include <sys/syscall.h>
#include <unistd.h>
#else
#define TILES 0
#endif
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include "ops.h"

/* A step's tokens must get the same numbers in any walk of the cache (attend_block). Where the machine has AVX
   and FMA, the sums that matter go through intrinsics (total, multiply_add), which no compiler regroups;
   elsewhere, with GCC, fast-math but sums in the order written: regrouped, a token's sums differed between its
   verify's walk and its decode step's in the SSE2 build. (A Clang build without AVX and FMA may regroup them.) */
#if defined(__GNUC__) && !defined(__clang__) && !(defined(__AVX__) && defined(__FMA__))
#pragma GCC optimize("no-associative-math")
#endif

enum { QUERY, KEY, VALUE, PAST_KEY, PAST_VALUE, SEQLENS_K, COS, SIN, QUERY_SEQLENS, KEY_SCALE, VALUE_SCALE, QUERY_NORM, KEY_NORM, INPUT_COUNT };
enum { OUTPUT, PRESENT_KEY, PRESENT_VALUE, OUTPUT_COUNT };
enum { QUERY_BLOCK = 16 }; /* query positions one work item takes, so a prefill spreads over the threads */
/* A step's calls (attend_block): up to STEP_TOKENS new tokens a row, walks of up to STEP_ROWS query rows, parts of
   SPLIT_KEYS cached rows per key/value head where the heads are fewer than TARGET_ITEMS (part_length). */
enum { STEP_TOKENS = 33, TARGET_ITEMS = 8, SPLIT_KEYS = 256, STEP_ROWS = 32 };

typedef struct {
  int64_t num_heads, kv_num_heads;
  float scale, epsilon;
} Kernel;


/* One head's rotary embedding, after its RMS norm when it has one (out may not alias x). */
static void rotate(const float *x, const float *norm, float epsilon, const float *cos, const float *sin, int64_t dim, float *out) {
  float normed[512];
  if (norm) {
    float squares = 0.f;
    for (int64_t i = 0; i < dim; ++i) squares += x[i] * x[i];
    float inverse = 1.f / sqrtf(squares / (float)dim + epsilon);
    for (int64_t i = 0; i < dim; ++i) normed[i] = x[i] * inverse * norm[i];
    x = normed;
  }
  int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    out[i + half] = x[i + half] * cos[i] + x[i] * sin[i];
  }
}

static int64_t past_length(const AttentionCall *call, int64_t row) { return (int64_t)call->seqlens_k[row] + 1 - call->query_seqlens[row]; }

/* The first of a row's new tokens whose output the call needs (AttentionCall's needed): blocks of tokens before it
   are skipped whole, so that every block computed gets the numbers it gets in a call needing them all. */
static int64_t first_needed(const AttentionCall *call, int64_t row) {
  if (!call->needed) return 0;
  const int64_t *needed = call->needed + row * call->needed_count;
  int64_t first = call->new_width;
  for (int64_t n = 0; n < call->needed_count; ++n) first = needed[n] < first ? needed[n] : first;
  return first;
}

static void store(const AttentionCall *call, void *cache, const float *scale, int64_t row, int64_t head, int64_t position, const float *x) {
  int64_t offset = ((row * call->kv_heads + head) * call->capacity + position) * call->dim;
  if (!call->quantized) {
    memcpy((float *)cache + offset, x, call->dim * sizeof(float));
    return;
  }
  int8_t *out = (int8_t *)cache + offset;
  for (int64_t d = 0; d < call->dim; ++d) {
    float q = nearbyintf(x[d] / scale[head * call->dim + d]);
    out[d] = (int8_t)(q > 127.f ? 127.f : q < -128.f ? -128.f : q);
  }
}

/* Query head h of a row's new token in the output: the first phase leaves the rotated queries there, the second
   writes the head's attention over them. */
static float *head_output(const AttentionCall *call, int64_t row, int64_t token, int64_t h) {
  return call->output + ((row * call->new_width + token) * call->heads + h) * call->dim;
}

/* Work item `item` of the first phase: one row's new token, its keys and values rotated and cached, its
   queries rotated into the output (the second phase reads them from there). */
static void append(void *data, size_t item) {
  const AttentionCall *call = data;
  int64_t row = (int64_t)item / call->new_width, token = (int64_t)item % call->new_width, dim = call->dim;
  float *out = head_output(call, row, token, 0);
  if (token >= call->query_seqlens[row]) {
    memset(out, 0, call->heads * dim * sizeof(float));
    return;
  }
  int64_t position = past_length(call, row) + token;
  const float *cos = call->cos + position * (dim / 2), *sin = call->sin + position * (dim / 2);
  const float *query = call->query + (int64_t)item * call->query_stride;
  for (int64_t h = 0; h < call->heads; ++h) rotate(query + h * dim, call->query_norm, call->epsilon, cos, sin, dim, out + h * dim);
  float rotated[512];
  const float *key = call->key + (int64_t)item * call->key_stride, *value = call->value + (int64_t)item * call->key_stride;
  for (int64_t h = 0; h < call->kv_heads; ++h) {
    rotate(key + h * dim, call->key_norm, call->epsilon, cos, sin, dim, rotated);
    store(call, call->cache_key, call->key_scale, row, h, position, rotated);
    store(call, call->cache_value, call->value_scale, row, h, position, value + h * dim);
  }
}

/* The inner loops run on 8 floats at a time (GCC/Clang vector extensions; the kernel is built for the machine
   it runs on); head sizes are multiples of 16, as ONNX Runtime's GroupQueryAttention also requires. Each
   cached row is loaded once for all the queries of its group, and the common group sizes get their own
   copies of the loops, whose sums then stay in registers. */
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
enum { LANES = 8, MAX_GROUP = 16 };

static inline f8 load_float(const float *x) {
  f8 v;
  memcpy(&v, x, sizeof v);
  return v;
}

/* The sum of v's lanes in the order every horizontal add below takes them (the halves' pairs, then the halves):
   a score is then the same number whichever loop computes it. */
static inline float total(f8 v) {
#ifdef __AVX__
  __m256 pairs = _mm256_hadd_ps((__m256)v, (__m256)v), quads = _mm256_hadd_ps(pairs, pairs);
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(quads), _mm256_extractf128_ps(quads, 1)));
#else
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
#endif
}

/* a * b + c, each product added on its own in the order written: fused where the machine has FMA, as an
   intrinsic, which fast-math may not regroup. A step's tokens share walks of the cache whose lengths and
   blocks differ from their decode steps' (attend_block), so a token's sums must not depend on how a loop
   groups its terms. */
static inline f8 multiply_add(f8 a, f8 b, f8 c) {
#ifdef __FMA__
  return (f8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

/* A float cache's weighted sums' vectors (weigh_float, column_weigh; and softmax's): on AVX-512, 16 floats,
   elsewhere the 8 above. Each sum is a column's, adding its row's terms one after another at any width: the
   numbers are the same. With 16, the weighted sums make half the loads and multiply-adds (an int8 cache's 4 rows,
   when its values were summed in floats, over 2,000 cached rows: 0.68x the time, caches hot, one thread of a
   2-core AVX-512 Xeon), and column_weigh's passes keep 6 rows' sums across a 64-wide head in AVX-512's 32
   registers (24 sums), reading each value row once per 6 rows where 8 floats read it once per 6 rows and 16
   columns: small-coder's verify of 7 tokens after 150 cached spent 0.86x the time in its attention, its prefill
   of 70 tokens 0.955x (measured when column_weigh alone took 16 floats). */
#if defined(__AVX512F__)
typedef float wv __attribute__((vector_size(64)));
enum { WEIGH_LANES = 16, WEIGH_VECTORS = 4 };
/* Loads and stores by value: copied through an array element, the vectors went by the stack where GCC tunes for
   Skylake-SP to Ice Lake (two 32-byte halves, then one 64-byte load). */
static inline wv load_wv(const float *x) { return (wv)_mm512_loadu_ps(x); }
static inline void store_wv(float *x, wv v) { _mm512_storeu_ps(x, (__m512)v); }
static inline wv weigh_multiply_add(wv a, wv b, wv c) { return (wv)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
#else
typedef f8 wv;
enum { WEIGH_LANES = LANES, WEIGH_VECTORS = 2 };
static inline wv load_wv(const float *x) { return load_float(x); }
static inline void store_wv(float *x, wv v) { memcpy(x, &v, sizeof v); }
static inline wv weigh_multiply_add(wv a, wv b, wv c) { return multiply_add(a, b, c); }
#endif

/* out[g * stride] = the total of sums[g]: four at a time with horizontal adds, which is most of what a dot
   product of a 64-wide head costs beyond its multiplications */
static inline __attribute__((always_inline)) void store_totals(const f8 *sums, int64_t group, float *out, int64_t stride) {
  int64_t g = 0;
#ifdef __AVX__
  for (; g + 4 <= group; g += 4) {
    __m256 low = _mm256_hadd_ps((__m256)sums[g], (__m256)sums[g + 1]), high = _mm256_hadd_ps((__m256)sums[g + 2], (__m256)sums[g + 3]);
    __m256 both = _mm256_hadd_ps(low, high);
    __m128 four = _mm_add_ps(_mm256_castps256_ps128(both), _mm256_extractf128_ps(both, 1));
    for (int i = 0; i < 4; ++i) out[(g + i) * stride] = four[i];
  }
#endif
  for (; g < group; ++g) out[g * stride] = total(sums[g]);
}

/* With AVX2's 16 vector registers, the scores go 8 cached rows at a time, query by query: each query's 8 sums
   stay in registers, beside the query's vector and a key's, and come out as one vector of 8 scores. Two rows
   at a time for the whole group, as below, kept 2 * 12 sums for a verify's 4 tokens of 3 heads, which
   spilled: on one core of an AVX2 EPYC, with small-coder's heads, 5 and 9 new tokens after 512 or 1,536
   cached take 0.85-0.96 of their time that way, a decode step 0.95 (medians of 8 runs). AVX-512 keeps the
   loop below, whose 32 registers hold those sums, as measured when it was written. (An int8 cache's scores
   are scores_int8's.) */
#if defined(__AVX__) && !defined(__AVX512F__)
#define EIGHT_KEYS 1
/* The totals of a[0] .. a[7], in order, in one vector. */
static inline f8 totals8(const f8 *a) {
  __m256 pairs01 = _mm256_hadd_ps((__m256)a[0], (__m256)a[1]), pairs23 = _mm256_hadd_ps((__m256)a[2], (__m256)a[3]);
  __m256 pairs45 = _mm256_hadd_ps((__m256)a[4], (__m256)a[5]), pairs67 = _mm256_hadd_ps((__m256)a[6], (__m256)a[7]);
  /* each 128-bit half: the four sums' totals over that half's lanes */
  __m256 first = _mm256_hadd_ps(pairs01, pairs23), second = _mm256_hadd_ps(pairs45, pairs67);
  __m256 lower = _mm256_permute2f128_ps(first, second, 0x20), upper = _mm256_permute2f128_ps(first, second, 0x31);
  return (f8)_mm256_add_ps(lower, upper);
}
#else
#define EIGHT_KEYS 0
static inline f8 totals8(const f8 *a) { return a[0]; } /* not called */
#endif

/* Cached rows the walks prefetch ahead of the one they read: a long cache comes from memory, one stream per
   thread (measured 4 % faster per token on the benchmark-size model at 2048 tokens). */
enum { PREFETCH_ROWS = 16 };

/* Walks of up to FEW_ROWS query rows (a decode step's group of heads) score and weigh one row at a time; more
   (a verify's tokens together) two rows against four keys, and in column_weigh's passes. */
enum { FEW_ROWS = 4 };

/* A float cache's scores: scores[g * stride + t] = queries[g] . keys[t] for t < length; two rows at a time, so
   that twice as many sums are in flight as one row's group has (a row's sums alone wait on each other's
   latency). Both loops prefetch the rows PREFETCH_ROWS ahead. */
static inline __attribute__((always_inline)) void scores_float(const float *keys, int64_t length, const float *queries, int64_t group, int64_t dim,
                                                                float *scores, int64_t stride) {
  int64_t t = 0;
  for (; EIGHT_KEYS && t + 8 <= length; t += 8) {
    const float *k = keys + t * dim;
    for (int64_t p = 0; p < 8 * dim * (int64_t)sizeof(float); p += 64) __builtin_prefetch((const char *)(k + PREFETCH_ROWS * dim) + p);
    int64_t g = 0;
    for (; group > FEW_ROWS && g + 2 <= group; g += 2) /* two rows against four keys, each key loaded once for both */
      for (int half = 0; half < 8; half += 4) {
        f8 one[4] = {0}, two[4] = {0};
        for (int64_t d = 0; d < dim; d += LANES) {
          f8 query = load_float(queries + g * dim + d), next = load_float(queries + (g + 1) * dim + d);
          KEEP(query);
          KEEP(next);
          for (int j = 0; j < 4; ++j) {
            f8 key = load_float(k + (half + j) * dim + d);
            one[j] = multiply_add(query, key, one[j]);
            two[j] = multiply_add(next, key, two[j]);
          }
        }
        store_totals(one, 4, scores + g * stride + t + half, 1);
        store_totals(two, 4, scores + (g + 1) * stride + t + half, 1);
      }
    for (; g < group; ++g) {
      f8 sums[8] = {0};
      for (int64_t d = 0; d < dim; d += LANES) {
        f8 query = load_float(queries + g * dim + d);
        for (int j = 0; j < 8; ++j) sums[j] = multiply_add(query, load_float(k + j * dim + d), sums[j]);
      }
      f8 eight = totals8(sums);
      memcpy(scores + g * stride + t, &eight, sizeof eight);
    }
  }
  for (; t + 2 <= length; t += 2) {
    const float *k = keys + t * dim;
    for (int64_t p = 0; p < 2 * dim * (int64_t)sizeof(float); p += 64) __builtin_prefetch((const char *)(k + PREFETCH_ROWS * dim) + p);
    f8 first[MAX_GROUP] = {0}, second[MAX_GROUP] = {0};
    for (int64_t d = 0; d < dim; d += LANES) {
      f8 key = load_float(k + d), next = load_float(k + dim + d);
      for (int64_t g = 0; g < group; ++g) {
        f8 query = load_float(queries + g * dim + d);
        first[g] = multiply_add(query, key, first[g]);
        second[g] = multiply_add(query, next, second[g]);
      }
    }
    store_totals(first, group, scores + t, stride);
    store_totals(second, group, scores + t + 1, stride);
  }
  for (; t < length; ++t) {
    f8 sums[MAX_GROUP] = {0};
    for (int64_t d = 0; d < dim; d += LANES)
      for (int64_t g = 0; g < group; ++g) sums[g] = multiply_add(load_float(queries + g * dim + d), load_float(keys + t * dim + d), sums[g]);
    store_totals(sums, group, scores + t, stride);
  }
}

/* An int8 cache's scores are exact integer sums. Each query row is rounded to int16 levels of its own scale (its
   largest magnitude at 32767), and a score is the row's scale times the integer dot product of its levels with a
   cached key's, whose int8 values widen to 16 bits on the fly: AVX-512's VNNI takes 32 such products in one
   instruction, where float loops widen every key to floats and sum each dot product across the lanes in a fixed
   order. Integer sums are the same in any order, so a token gets the same scores in any walk (attend_block) and
   on any machine, and the loops group keys and rows as suits the vectors. The sums fit an int32:
   512 * 32767 * 128 < 2^31.

   Rounding a query to 16 bits is an error of the kind the cache already makes, rounding a key to 8 bits, and
   finer than the bfloat16 queries GPU engines use: on the shipped tiny-coder after 1,500 tokens it moved the
   logits by up to 0.011, where the int8 cache itself moves them by 0.12 from the float cache's. On a 2-core
   AVX-512 Xeon a decode step's scores after 2,000 cached rows (the benchmark-size model's 4 heads per key/value
   head) took 0.57x the time of the float loops (caches hot, one thread). */
enum { LEVEL_PIECE = 32, LEVEL_BLOCK = 4 }; /* levels padded per row to whole pieces; rows scored 4 at a time */
_Static_assert(512LL * 32767 * 128 < 2147483648LL, "a head of 512 (check_call's most) sums in an int32");
_Static_assert((int)STEP_ROWS >= (int)MAX_GROUP && STEP_ROWS % LEVEL_BLOCK == 0, "scores_int8's buffers hold a walk's rows, padded");

/* levels[t] = x[t] * inverse rounded to nearest, ties to even (as lrintf), for t < count: a query row's or a block
   of weights' 16-bit levels */
static void to_levels(const float *x, int64_t count, float inverse, int16_t *levels) {
  int64_t t = 0;
#if defined(__AVX512F__)
  for (; t + 16 <= count; t += 16)
    _mm256_storeu_si256((__m256i *)(levels + t), _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + t), _mm512_set1_ps(inverse)))));
#endif
  for (; t < count; ++t) levels[t] = (int16_t)lrintf(x[t] * inverse);
}

/* levels[r * width + d] and scales[r]: query row r (of rows, dim floats each) rounded as above, zero past dim and
   in rows up to a multiple of LEVEL_BLOCK. */
static void round_queries(const float *queries, int64_t rows, int64_t dim, int64_t width, int16_t *levels, float *scales) {
  int64_t padded = (rows + LEVEL_BLOCK - 1) / LEVEL_BLOCK * LEVEL_BLOCK;
  memset(levels, 0, padded * width * sizeof(int16_t));
  memset(scales, 0, padded * sizeof(float));
  for (int64_t r = 0; r < rows; ++r) {
    const float *query = queries + r * dim;
    float top = 0.f;
    for (int64_t d = 0; d < dim; ++d) top = fmaxf(top, fabsf(query[d]));
    scales[r] = top / 32767.f;
    to_levels(query, dim, top > 0.f ? 32767.f / top : 0.f, levels + r * width);
  }
}

#if defined(__AVX512BW__)
/* acc + the sums of a's and b's int16 lanes' products, in pairs */
static inline __m512i dot_pairs(__m512i acc, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

/* A key's LEVEL_PIECE int8 values from x as int16 lanes (half a piece where the head size leaves 16, the rest zero). */
static inline __m512i key_piece(const int8_t *x, int half) {
  return _mm512_cvtepi8_epi16(half ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)x)) : _mm256_loadu_si256((const __m256i *)x));
}

/* Lane i: the total of v[i]'s lanes. */
static inline __m512i totals16(const __m512i *v) {
  __m512i pairs[8], quads[4], halves[2];
  for (int i = 0; i < 8; ++i) pairs[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) quads[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(pairs[2 * i], pairs[2 * i + 1]), _mm512_unpackhi_epi64(pairs[2 * i], pairs[2 * i + 1]));
  for (int i = 0; i < 2; ++i)
    halves[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(quads[2 * i], quads[2 * i + 1], 0x44), _mm512_shuffle_i32x4(quads[2 * i], quads[2 * i + 1], 0xEE));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(halves[0], halves[1], 0x88), _mm512_shuffle_i32x4(halves[0], halves[1], 0xDD));
}

/* The integer dot products of LEVEL_BLOCK rows' levels (width apart) with the key at k, one vector per row. */
static inline __attribute__((always_inline)) void key_dots(const int8_t *k, const int16_t *levels, int64_t width, int64_t dim, __m512i *sums) {
  for (int g = 0; g < LEVEL_BLOCK; ++g) sums[g] = _mm512_setzero_si512();
  for (int64_t d = 0; d < dim; d += LEVEL_PIECE) {
    __m512i key = key_piece(k + d, d + LEVEL_PIECE > dim);
    for (int g = 0; g < LEVEL_BLOCK; ++g) sums[g] = dot_pairs(sums[g], _mm512_loadu_si512(levels + g * width + d), key);
  }
}

/* scores[g * stride + t] for the block's rows g < rows (at most LEVEL_BLOCK), keys t < length: four keys at a
   time, whose 16 sums total in one vector, prefetching the keys and values PREFETCH_ROWS ahead (the values for
   the weighted sums that follow). */
static void block_scores(const int8_t *keys, const int8_t *values, int64_t length, const int16_t *levels, int64_t width, const float *scales,
                         int64_t rows, int64_t dim, float *scores, int64_t stride) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
  __m512 scale = _mm512_setzero_ps();
  for (int g = 0; g < LEVEL_BLOCK; ++g) scale = _mm512_mask_blend_ps((__mmask16)(0xF << (4 * g)), scale, _mm512_set1_ps(scales[g]));
  int64_t t = 0;
  for (; t + 4 <= length; t += 4) {
    const int8_t *k = keys + t * dim;
    for (int64_t p = 0; p < 4 * dim; p += 64) {
      __builtin_prefetch(k + PREFETCH_ROWS * dim + p);
      __builtin_prefetch(values + (t + PREFETCH_ROWS) * dim + p);
    }
    __m512i sums[16], dots[LEVEL_BLOCK];
    for (int j = 0; j < 4; ++j) {
      key_dots(k + j * dim, levels, width, dim, dots);
      for (int g = 0; g < LEVEL_BLOCK; ++g) sums[4 * g + j] = dots[g];
    }
    __m512 four = _mm512_mul_ps(_mm512_cvtepi32_ps(totals16(sums)), scale); /* row g's scores in lanes 4g .. 4g + 3 */
    for (int g = 0; g < rows; ++g) /* moved to the low lanes by a permutation: extracting takes a constant lane index */
      _mm_storeu_ps(scores + g * stride + t, _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_add_epi32(_mm512_set1_epi32(4 * g), lanes), four)));
  }
  for (; t < length; ++t) {
    __m512i dots[LEVEL_BLOCK];
    key_dots(keys + t * dim, levels, width, dim, dots);
    for (int g = 0; g < rows; ++g) scores[g * stride + t] = (float)_mm512_reduce_add_epi32(dots[g]) * scales[g];
  }
}
#elif defined(__AVX2__)
/* AVX2: a key's 16 values at a time against the rows' levels (_mm256_madd_epi16), one key's LEVEL_BLOCK sums
   totalled together. */
static void block_scores(const int8_t *keys, const int8_t *values, int64_t length, const int16_t *levels, int64_t width, const float *scales,
                         int64_t rows, int64_t dim, float *scores, int64_t stride) {
  for (int64_t t = 0; t < length; ++t) {
    const int8_t *k = keys + t * dim;
    for (int64_t p = 0; p < dim; p += 64) {
      __builtin_prefetch(k + PREFETCH_ROWS * dim + p);
      __builtin_prefetch(values + (t + PREFETCH_ROWS) * dim + p);
    }
    __m256i sums[LEVEL_BLOCK] = {0};
    for (int64_t d = 0; d < dim; d += 16) {
      __m256i key = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(k + d)));
      for (int g = 0; g < LEVEL_BLOCK; ++g)
        sums[g] = _mm256_add_epi32(sums[g], _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(levels + g * width + d)), key));
    }
    __m256i both = _mm256_hadd_epi32(_mm256_hadd_epi32(sums[0], sums[1]), _mm256_hadd_epi32(sums[2], sums[3]));
    __m128i four = _mm_add_epi32(_mm256_castsi256_si128(both), _mm256_extracti128_si256(both, 1));
    int32_t totals[4];
    memcpy(totals, &four, sizeof totals);
    for (int g = 0; g < rows; ++g) scores[g * stride + t] = (float)totals[g] * scales[g];
  }
}
#else
static void block_scores(const int8_t *keys, const int8_t *values, int64_t length, const int16_t *levels, int64_t width, const float *scales,
                         int64_t rows, int64_t dim, float *scores, int64_t stride) {
  (void)values;
  for (int64_t g = 0; g < rows; ++g)
    for (int64_t t = 0; t < length; ++t) {
      int32_t sum = 0;
      for (int64_t d = 0; d < dim; ++d) sum += (int32_t)levels[g * width + d] * keys[t * dim + d];
      scores[g * stride + t] = (float)sum * scales[g];
    }
}
#endif

#if TILES
/* With AMX, a long walk's scores are tile multiplies, which leave VNNI's one port (the limit of block_scores, 2
   multiply-adds a score for a head of 64) and the shuffles that total its sums free for the weighted sums. A tile
   of TILE_KEYS cached keys, TILE_DEPTH of each key's channels a row, is read from the cache as it lies; the rows'
   levels go in as their signed high bytes (TDPBSSD) and unsigned low bytes (TDPBSUD), and a score is 256 times the
   first sum plus the second: the same integers as the vector loops' (wrapping int32 arithmetic; the true sum
   fits), so the same scores, and a token's numbers do not depend on which loop took its keys. After 2,048 cached
   rows, the benchmark-size model's attention took 0.87-0.90x its time in a decode step (330-335 µs a step against
   368-382; three processes of each, alternating, an instrumented build, 2 threads of a 2-core Xeon with AMX), and
   on one thread 0.90x, its verify of 9 tokens 0.78x. Shorter walks keep the vector loops: on one thread the tiles
   took 1.11x their time over 128 keys, 1.02x over 256, 0.97x over 384 (the tile set-up, the levels' rearranging,
   and each tile's sums read back from memory once it has stored them). */
enum { TILE_KEYS = 16, TILE_DEPTH = 64, AMX_MIN_KEYS = 384, ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };
/* tile registers: numbers, not enumerators, which GCC's tile intrinsics paste into their assembly */
#define KEY_TILE 0
#define HIGH_TILE 1
#define LOW_TILE 2
#define HIGH_SUMS 3
#define LOW_SUMS 4

/* Whether Linux lets this process use the tiles: it lends their state only to a process that asks (Linux 5.16
   on); refused, the vector loops stay. Asked until an answer is stored: threads asking at once before that each
   ask, and get the same answer. */
static int tiles_granted(void) {
  static int state; /* 0 not asked yet, 1 granted, -1 refused */
  int known = __atomic_load_n(&state, __ATOMIC_RELAXED);
  if (!known) {
    known = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    __atomic_store_n(&state, known, __ATOMIC_RELAXED);
  }
  return known > 0;
}

typedef struct { /* LDTILECFG's operand, palette 1 */
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
} TileConfig;

/* amx_scores' tiles: constant, so the whole operand is in memory before LDTILECFG reads it (GCC's intrinsic tells
   the compiler of its first 8 bytes only) */
static const TileConfig SCORE_TILES = {
    .palette = 1,
    .bytes_per_row = {[KEY_TILE] = TILE_DEPTH, [HIGH_TILE] = 4 * LEVEL_BLOCK, [LOW_TILE] = 4 * LEVEL_BLOCK, [HIGH_SUMS] = 4 * LEVEL_BLOCK, [LOW_SUMS] = 4 * LEVEL_BLOCK},
    .rows = {[KEY_TILE] = TILE_KEYS, [HIGH_TILE] = TILE_DEPTH / 4, [LOW_TILE] = TILE_DEPTH / 4, [HIGH_SUMS] = TILE_KEYS, [LOW_SUMS] = TILE_KEYS},
};

/* scores[n * stride + t .. + 15] for the block's rows n < rows: high and low, a tile's two sums [key][row]. */
static inline void store_tile_scores(const int32_t *high, const int32_t *low, const float *scales, int64_t rows, float *scores, int64_t stride) {
  __m512i quads[4]; /* quads[j]: keys 4j .. 4j + 3, each its LEVEL_BLOCK rows' sums */
  for (int j = 0; j < 4; ++j) quads[j] = _mm512_add_epi32(_mm512_slli_epi32(_mm512_loadu_si512(high + 16 * j), 8), _mm512_loadu_si512(low + 16 * j));
  const __m512i rows_01 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
  const __m512i rows_23 = _mm512_add_epi32(rows_01, _mm512_set1_epi32(2));
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  __m512i pairs[4] = {_mm512_permutex2var_epi32(quads[0], rows_01, quads[1]), _mm512_permutex2var_epi32(quads[0], rows_23, quads[1]),
                      _mm512_permutex2var_epi32(quads[2], rows_01, quads[3]), _mm512_permutex2var_epi32(quads[2], rows_23, quads[3])};
  __m512i by_row[LEVEL_BLOCK] = {_mm512_permutex2var_epi32(pairs[0], first, pairs[2]), _mm512_permutex2var_epi32(pairs[0], second, pairs[2]),
                                 _mm512_permutex2var_epi32(pairs[1], first, pairs[3]), _mm512_permutex2var_epi32(pairs[1], second, pairs[3])};
  for (int64_t n = 0; n < rows; ++n) _mm512_storeu_ps(scores + n * stride, _mm512_mul_ps(_mm512_cvtepi32_ps(by_row[n]), _mm512_set1_ps(scales[n])));
}

/* block_scores for every LEVEL_BLOCK rows of `rows` in tiles of TILE_KEYS keys, the last keys in block_scores. */
static void amx_scores(const int8_t *keys, const int8_t *values, int64_t length, const int16_t *levels, int64_t width, const float *scales,
                       int64_t rows, int64_t dim, float *scores, int64_t stride) {
  _tile_loadconfig(&SCORE_TILES);
  int64_t whole = length / TILE_KEYS * TILE_KEYS;
  for (int64_t r = 0; r < rows; r += LEVEL_BLOCK) {
    int64_t block = rows - r < LEVEL_BLOCK ? rows - r : LEVEL_BLOCK;
    /* the block's levels as a tile multiply takes its right operand: row i, bytes 4n .. 4n + 3 = row n's levels
       of channels 4i .. 4i + 3 (padded rows' levels are zeros) */
    int8_t high[512 / 4][4 * LEVEL_BLOCK];
    uint8_t low[512 / 4][4 * LEVEL_BLOCK];
    for (int n = 0; n < LEVEL_BLOCK; ++n) { /* each row's bytes by vector conversions, then 4 at a time into place */
      uint32_t row_high[512 / 4], row_low[512 / 4];
      for (int64_t d = 0; d < dim; d += 32) {
        __m512i level = _mm512_loadu_si512(levels + (r + n) * width + d);
        _mm256_storeu_si256((__m256i *)((int8_t *)row_high + d), _mm512_cvtepi16_epi8(_mm512_srai_epi16(level, 8)));
        _mm256_storeu_si256((__m256i *)((int8_t *)row_low + d), _mm512_cvtepi16_epi8(level));
      }
      for (int64_t i = 0; i < dim / 4; ++i) {
        memcpy(high[i] + 4 * n, row_high + i, 4);
        memcpy(low[i] + 4 * n, row_low + i, 4);
      }
    }
    for (int64_t t = 0; t < whole; t += TILE_KEYS) {
      const int8_t *k = keys + t * dim;
      /* the keys two tiles ahead; the values are left to the weighted sums' own prefetches: fetched here too, they
         held the line-fill buffers this loop waits on (one thread, from L3: 0.97x block_scores' time, not 0.88x) */
      for (int64_t p = 0; p < TILE_KEYS * dim; p += 64) __builtin_prefetch(k + 2 * TILE_KEYS * dim + p);
      _tile_zero(HIGH_SUMS);
      _tile_zero(LOW_SUMS);
      for (int64_t d = 0; d < dim; d += TILE_DEPTH) {
        _tile_loadd(KEY_TILE, k + d, dim);
        _tile_loadd(HIGH_TILE, high[d / 4], 4 * LEVEL_BLOCK);
        _tile_loadd(LOW_TILE, low[d / 4], 4 * LEVEL_BLOCK);
        _tile_dpbssd(HIGH_SUMS, KEY_TILE, HIGH_TILE);
        _tile_dpbsud(LOW_SUMS, KEY_TILE, LOW_TILE);
      }
      int32_t sums[2][TILE_KEYS * LEVEL_BLOCK];
      _tile_stored(HIGH_SUMS, sums[0], 4 * LEVEL_BLOCK);
      _tile_stored(LOW_SUMS, sums[1], 4 * LEVEL_BLOCK);
      store_tile_scores(sums[0], sums[1], scales + r, block, scores + r * stride + t, stride);
    }
    if (whole < length)
      block_scores(keys + whole * dim, values + whole * dim, length - whole, levels + r * width, width, scales + r, block, dim, scores + r * stride + whole, stride);
  }
  _tile_release();
}
#endif

/* scores[r * stride + t] for rows r < rows of queries (dim floats each) against an int8 cache's keys t < length,
   LEVEL_BLOCK rows at a time. */
static void scores_int8(const int8_t *keys, const int8_t *values, int64_t length, const float *queries, int64_t rows, int64_t dim, float *scores,
                        int64_t stride) {
  int64_t width = (dim + LEVEL_PIECE - 1) / LEVEL_PIECE * LEVEL_PIECE;
  int16_t levels[STEP_ROWS * 512]; /* rows <= STEP_ROWS, width <= 512 */
  float scales[STEP_ROWS];
  round_queries(queries, rows, dim, width, levels, scales);
#if TILES
  if (length >= AMX_MIN_KEYS && dim % TILE_DEPTH == 0 && tiles_granted()) {
    amx_scores(keys, values, length, levels, width, scales, rows, dim, scores, stride);
    return;
  }
#endif
  for (int64_t r = 0; r < rows; r += LEVEL_BLOCK) {
    int64_t block = rows - r < LEVEL_BLOCK ? rows - r : LEVEL_BLOCK;
    block_scores(keys, values, length, levels + r * width, width, scales + r, block, dim, scores + r * stride, stride);
  }
}

/* out[g] = inverse[g] * the sum over t < length of weights[g * stride + t] * values[t] (a float cache's), each
   row's terms added one after another whatever the length (a step's walks, attend_block). Whole cached rows,
   four at a time, each read once and in order, with the group's sums in a local array in the core's first
   cache, updated once per four rows: an AVX2 machine ran a 2048-token call in 0.79 of the time of the earlier
   loop, which took 16 columns of every row per pass (each row read four times, with gaps). The sums stay local:
   kept in the caller's array, which may alias the weights as far as the compiler knows, the call took twice as
   long. */
static inline __attribute__((always_inline)) void weigh_float(const float *values, int64_t length, const float *weights, int64_t group, int64_t dim,
                                                              int64_t stride, const float *inverse, float *out) {
  wv sums[MAX_GROUP][512 / WEIGH_LANES];
  int64_t vectors = dim / WEIGH_LANES, t = 0;
  for (int64_t g = 0; g < group; ++g)
    for (int64_t c = 0; c < vectors; ++c) sums[g][c] = (wv){0};
  for (; t + 4 <= length; t += 4) {
    const float *rows = values + t * dim;
    for (int64_t p = 0; p < 4 * dim * (int64_t)sizeof(float); p += 64) __builtin_prefetch((const char *)(rows + PREFETCH_ROWS * dim) + p);
    for (int64_t c = 0; c < vectors; ++c) {
      wv first = load_wv(rows + c * WEIGH_LANES), second = load_wv(rows + dim + c * WEIGH_LANES);
      wv third = load_wv(rows + 2 * dim + c * WEIGH_LANES), fourth = load_wv(rows + 3 * dim + c * WEIGH_LANES);
      for (int64_t g = 0; g < group; ++g) {
        const float *w = weights + g * stride + t;
        wv sum = weigh_multiply_add((wv){0} + w[0], first, sums[g][c]);
        sum = weigh_multiply_add((wv){0} + w[1], second, sum);
        sum = weigh_multiply_add((wv){0} + w[2], third, sum);
        sums[g][c] = weigh_multiply_add((wv){0} + w[3], fourth, sum);
      }
    }
  }
  for (; t < length; ++t)
    for (int64_t c = 0; c < vectors; ++c) {
      wv value = load_wv(values + t * dim + c * WEIGH_LANES);
      for (int64_t g = 0; g < group; ++g) sums[g][c] = weigh_multiply_add((wv){0} + weights[g * stride + t], value, sums[g][c]);
    }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t c = 0; c < vectors; ++c) store_wv(out + g * dim + c * WEIGH_LANES, sums[g][c] * inverse[g]);
}

/* An int8 cache's weighted sums, in integers: a row's weights over each block of PAIR_KEYS keys (counted from the
   walk's start) rounded to 16-bit levels of the block's largest, times the cached values, summed exactly in an
   int32 per column, and the block's integer sums times its level's size added to the row's float sums; out[g] =
   those times inverse[g] times the column's scale. Integer sums are the same in any order and at any vector
   width, and a block's largest weight the same in a step's walk as in the token's decode step's (weights past its
   position are zeros, adding nothing), so a token's numbers stay its decode step's in any walk, and the integers
   are the same on any machine: AVX-512 VNNI multiplies two keys' levels with their two values in one lane (the two
   value rows interleaved byte by byte, widened to 16 bits; pairs_64), AVX2 the same through 16-bit multiply-adds
   (pairs_16), plain C one product at a time. A weight rounds by half a level at most, 1/65534 of its block's
   largest: the 127 other keys of a block beside one of weight 1 lose at most 0.002 of the total. Levels of a fixed
   size (1/32767 of the row's largest weight, 1, over blocks of 512) lost 5 % of an output's weight to 4,095 keys
   of 1.4e-5 each beside one of weight 1 (found in review), a long context's tail behind an attention sink; blocks
   of 64 keys took 0.87x the float loop's time where blocks of 128 take 0.85x. The float loop these sums replaced
   (every value turned into a float, a multiply-add per weight) took 37 % of a decode step's attention; after
   2,048 cached rows on a 2-core AVX-512 Xeon, the benchmark-size model's attention takes 0.85x the time on one
   thread (a decode step's and a verify's of 9 tokens alike), and PAIR_ROWS rows at a time keep their sums in
   registers. */
enum { PAIR_KEYS = 128, PAIR_ROWS = 4 };
_Static_assert(PAIR_ROWS == 4, "weigh_rows' cases");
_Static_assert(PAIR_KEYS * 32767LL * 128 < 2147483648LL, "a block's products of a level and a value sum in an int32");

/* levels[t] = weights[t] rounded to levels of 1/32767 of their largest, t < count, and a zero after them (an odd
   count's last pair); returns a level's size (0: every weight 0). */
static float round_weights(const float *weights, int64_t count, int16_t *levels) {
  float top = 0.f;
  for (int64_t t = 0; t < count; ++t) top = weights[t] > top ? weights[t] : top;
  to_levels(weights, count, top > 0.f ? 32767.f / top : 0.f, levels);
  levels[count] = 0;
  return top / 32767.f;
}

/* Two keys' levels as one int32 lane: the first in its low half. */
static inline int32_t level_pair(const int16_t *levels, int64_t t) {
  int32_t pair;
  memcpy(&pair, levels + t, sizeof pair);
  return pair;
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* sums[g][c ..] += step[g] times columns c .. c + 63 of the integer sums of row g's levels times the `count` value
   rows at `rows` (dim apart). */
static inline __attribute__((always_inline)) void pairs_64(const int8_t *rows, int64_t count, int64_t dim, int16_t (*levels)[PAIR_KEYS + 2],
                                                            const float *step, int64_t group, float (*sums)[512], int64_t c) {
  __m512i acc[PAIR_ROWS][4];
  for (int64_t g = 0; g < group; ++g)
    for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_setzero_si512();
  for (int64_t t = 0; t < count; t += 2) {
    const int8_t *row = rows + t * dim + c;
    __builtin_prefetch(row + PREFETCH_ROWS * dim);
    __builtin_prefetch(row + (PREFETCH_ROWS + 1) * dim);
    __m512i first = _mm512_loadu_si512(row), second = t + 1 < count ? _mm512_loadu_si512(row + dim) : _mm512_setzero_si512();
    /* the two rows' values in pairs: columns 0-7 of each 16 (low), 8-15 (high) */
    __m512i low = _mm512_unpacklo_epi8(first, second), high = _mm512_unpackhi_epi8(first, second);
    __m512i pairs[4] = {_mm512_cvtepi8_epi16(_mm512_castsi512_si256(low)), _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(low, 1)),
                        _mm512_cvtepi8_epi16(_mm512_castsi512_si256(high)), _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(high, 1))};
    for (int64_t g = 0; g < group; ++g) {
      __m512i both = _mm512_set1_epi32(level_pair(levels[g], t));
      for (int j = 0; j < 4; ++j) acc[g][j] = _mm512_dpwssd_epi32(acc[g][j], pairs[j], both);
    }
  }
  for (int64_t g = 0; g < group; ++g) { /* acc[g][0]: columns 0-7 and 16-23; [1]: 32-39, 48-55; [2]: 8-15, 24-31; [3]: 40-47, 56-63 */
    __m512i ordered[4] = {_mm512_shuffle_i32x4(acc[g][0], acc[g][2], 0x44), _mm512_shuffle_i32x4(acc[g][0], acc[g][2], 0xEE),
                          _mm512_shuffle_i32x4(acc[g][1], acc[g][3], 0x44), _mm512_shuffle_i32x4(acc[g][1], acc[g][3], 0xEE)};
    for (int j = 0; j < 4; ++j) {
      float *sum = sums[g] + c + 16 * j;
      _mm512_storeu_ps(sum, _mm512_fmadd_ps(_mm512_cvtepi32_ps(ordered[j]), _mm512_set1_ps(step[g]), _mm512_loadu_ps(sum)));
    }
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* pairs_64 for columns c .. c + 15, in 16-bit multiply-adds: the same integers. */
static inline __attribute__((always_inline)) void pairs_16(const int8_t *rows, int64_t count, int64_t dim, int16_t (*levels)[PAIR_KEYS + 2],
                                                            const float *step, int64_t group, float (*sums)[512], int64_t c) {
  __m256i acc[PAIR_ROWS][2];
  for (int64_t g = 0; g < group; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_si256();
  for (int64_t t = 0; t < count; t += 2) {
    const int8_t *row = rows + t * dim + c;
    __builtin_prefetch(row + PREFETCH_ROWS * dim);
    __builtin_prefetch(row + (PREFETCH_ROWS + 1) * dim);
    __m128i first = _mm_loadu_si128((const __m128i *)row), second = t + 1 < count ? _mm_loadu_si128((const __m128i *)(row + dim)) : _mm_setzero_si128();
    __m256i low = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(first, second)), high = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(first, second));
    for (int64_t g = 0; g < group; ++g) {
      __m256i both = _mm256_set1_epi32(level_pair(levels[g], t));
      acc[g][0] = _mm256_add_epi32(acc[g][0], _mm256_madd_epi16(low, both));
      acc[g][1] = _mm256_add_epi32(acc[g][1], _mm256_madd_epi16(high, both));
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int j = 0; j < 2; ++j) {
      float *sum = sums[g] + c + 8 * j;
      _mm256_storeu_ps(sum, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[g][j]), _mm256_set1_ps(step[g]), _mm256_loadu_ps(sum)));
    }
}
#else
/* pairs_16 one product at a time, row after row; fmaf rounds once, as the vector loops' multiply-adds do. */
static void pairs_16(const int8_t *rows, int64_t count, int64_t dim, int16_t (*levels)[PAIR_KEYS + 2], const float *step, int64_t group,
                     float (*sums)[512], int64_t c) {
  int32_t acc[PAIR_ROWS][16] = {{0}};
  for (int64_t t = 0; t < count; ++t)
    for (int64_t g = 0; g < group; ++g)
      for (int j = 0; j < 16; ++j) acc[g][j] += levels[g][t] * rows[t * dim + c + j];
  for (int64_t g = 0; g < group; ++g)
    for (int j = 0; j < 16; ++j) sums[g][c + j] = fmaf((float)acc[g][j], step[g], sums[g][c + j]);
}
#endif

static inline __attribute__((always_inline)) void weigh_int8(const int8_t *values, int64_t length, const float *weights, int64_t group, int64_t dim,
                                                             int64_t stride, const float *inverse, const float *scale, float *out) {
  int16_t levels[PAIR_ROWS][PAIR_KEYS + 2];
  float sums[PAIR_ROWS][512], step[PAIR_ROWS];
  for (int64_t g = 0; g < group; ++g) memset(sums[g], 0, dim * sizeof(float));
  for (int64_t from = 0; from < length; from += PAIR_KEYS) {
    int64_t count = length - from < PAIR_KEYS ? length - from : PAIR_KEYS, c = 0;
    const int8_t *rows = values + from * dim;
    int any = 0;
    for (int64_t g = 0; g < group; ++g) any |= (step[g] = round_weights(weights + g * stride + from, count, levels[g])) > 0.f;
    if (!any) continue; /* keys past every row's position: they add nothing */
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
    for (; c + 64 <= dim; c += 64) pairs_64(rows, count, dim, levels, step, group, sums, c);
#endif
    for (; c < dim; c += 16) pairs_16(rows, count, dim, levels, step, group, sums, c);
  }
  for (int64_t g = 0; g < group; ++g) {
    float factors[512]; /* one product per statement: the order fast-math might otherwise choose differs between builds */
    for (int64_t c = 0; c < dim; ++c) factors[c] = inverse[g] * scale[c];
    for (int64_t c = 0; c < dim; ++c) out[g * dim + c] = sums[g][c] * factors[c];
  }
}

/* A float cache's dot products and weighted sums of a walk's query rows, with their count a constant where it is one
   of UNROLLED_ROWS (walk_span picks spans that make it one): the sums then stay in registers. With a generic
   count they live in memory: a verify's 6 tokens of 3 heads per key/value head (small-coder, 256 tokens
   cached) took 2.3 times a 1-token call's attention, 1.7 times since. At most 12 rows: the scores' sums of 16
   rows for two keys, 32 vectors, do not fit AVX-512's 32 registers beside a key and a query, and the spills cost
   most where the cache streams from memory. The benchmark-size model's verify of 9 tokens (36 rows) after 2,048
   cached took 1.29x as long in walks of 16, 16 and 4 rows as in walks of 12, 12, 8 and 4 (one thread), a whole
   verify call 1.05x; a group of 16 heads walks 12 and 4 rows in the time of one walk of 16. */
#define BY_GROUP(CALL, group)          \
  switch (group) {                     \
    case 1: CALL(1); break;            \
    case 2: CALL(2); break;            \
    case 3: CALL(3); break;            \
    case 4: CALL(4); break;            \
    case 6: CALL(6); break;            \
    case 8: CALL(8); break;            \
    case 12: CALL(12); break;          \
    default: CALL(group); break;       \
  }
static const int64_t UNROLLED_ROWS[] = {1, 2, 3, 4, 6, 8, 12};

/* Tokens per walk of the cache: as many as fit MAX_GROUP query rows, fewer where that makes the rows a count
   BY_GROUP unrolls (3 heads per group: 4 tokens, 12 rows, rather than 5 and a generic 15). Where no span of two
   or more does (8 heads: 16 rows), MAX_GROUP / group, whose rows IN_GROUPS takes in unrolled walks (12 and 4). */
static int64_t walk_span(int64_t group) {
  for (int64_t span = MAX_GROUP / group; span > 1; --span)
    for (size_t i = 0; i < sizeof UNROLLED_ROWS / sizeof *UNROLLED_ROWS; ++i)
      if (UNROLLED_ROWS[i] == span * group) return span;
  return MAX_GROUP / group;
}

/* e^x for x <= 0, a vector at a time: 2^n * e^r with n = round(x / ln 2), e^r = 1 + r + r^2 P(r) on |r| <= ln 2 / 2
   (P of degree 5, Cephes' coefficients). Built with fast-math, it measured within 3e-7 relative with FMA
   and 4e-6 without. Below -87 it gives e^-87 (about 1.6e-38), which a softmax's sum, at least 1, does not
   see. Half the time of the compiler's vectorized expf loop on an AVX2 machine, where GCC ran that 4 at a
   time. */
#define EXP_NONPOSITIVE(NAME, VECTOR, INTS, BITS)                                                                        \
  static inline VECTOR NAME(VECTOR x) {                                                                                 \
    const VECTOR lowest = (VECTOR){0} - 87.f;                                                                           \
    INTS below = x < lowest;                                                                                            \
    x = (VECTOR)(((INTS)x & ~below) | ((INTS)lowest & below));                                                          \
    INTS n = __builtin_convertvector(x * 1.44269504f - 0.5f, INTS); /* truncation: rounds x / ln 2 to nearest, x <= 0 */ \
    VECTOR r = x - __builtin_convertvector(n, VECTOR) * 0.693147181f;                                                   \
    VECTOR p = 1.9875691500e-4f * r + 1.3981999507e-3f;                                                                 \
    p = p * r + 8.3334519073e-3f;                                                                                       \
    p = p * r + 4.1665795894e-2f;                                                                                       \
    p = p * r + 1.6666665459e-1f;                                                                                       \
    p = p * r + 5.0000001201e-1f;                                                                                       \
    p = p * r * r + r + 1.f;                                                                                            \
    return (VECTOR)((BITS)p + ((BITS)n << 23)); /* times 2^n, n >= -126: a normal float */                              \
  }
typedef uint32_t u32x8 __attribute__((vector_size(32)));
EXP_NONPOSITIVE(exp_nonpositive, f8, i32x8, u32x8)
/* ... in the weighted sums' vectors, for softmax (AVX-512's 16 floats: half the instructions) */
#if defined(__AVX512F__)
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
EXP_NONPOSITIVE(exp_nonpositive_wv, wv, i32x16, u32x16)
static inline float total_wv(wv v) { return _mm512_reduce_add_ps((__m512)v); }
#else
#define exp_nonpositive_wv exp_nonpositive
#define total_wv total
#endif

/* scores[t] = e^(scores[t] - max) for t < length; returns their sum, whose inverse the caller applies to the
   weighted sum of the values instead of to every weight, and sets *largest to the max. */
static float softmax(float *scores, int64_t length, float *largest) { /* length >= 1: a token attends at least to itself */
  float top = scores[0];
  for (int64_t t = 1; t < length; ++t) top = scores[t] > top ? scores[t] : top;
  wv sums = {0};
  int64_t t = 0;
  for (; t + WEIGH_LANES <= length; t += WEIGH_LANES) {
    wv e = exp_nonpositive_wv(load_wv(scores + t) - top);
    store_wv(scores + t, e);
    sums += e;
  }
  float sum = total_wv(sums);
  for (; t < length; ++t) sum += scores[t] = expf(scores[t] - top);
  *largest = top;
  return sum;
}

/* A prompt's queries on AVX2 (a step's tokens take attend_block's walks): the walk runs as two small matrix
   products with the query rows across the vector lanes, the way a matrix product's kernel takes its panels,
   over blocks of KEY_BLOCK cached rows with a running softmax (flash attention's): each block's keys are
   scored, its weights taken against the running maxima (the sums so far rescaled when a maximum rises), and
   its values weighed, while the next block's keys and values are prefetched. So the cache is read once, from
   memory, in step with the arithmetic, and a walk's sums stay in the first cache. Scores take a cached key's
   element at a time, broadcast, against `vectors` vectors of the rows' transposed queries: 12 sums in
   registers, 12 multiply-adds to 8 loads, where the loops above, one dot product at a time, spend more on
   loads and horizontal adds than on the products. Each score adds partial sums of 16 terms: one chain of 64
   rounded enough to move peaked scores' weights (scores in the hundreds) further from ONNX Runtime's than
   the loops above, whose dot products add 8 lanes of 8 terms. One walk takes all of a work item's tokens
   that fit COLUMN_ROWS rows. On a 2-core AVX2 EPYC, small-coder's verify call of 5
   tokens took 0.92-0.93 of its time after 512 or 1,536 cached and 0.95 after 128, 7 tokens 0.90 (whole
   main model, medians of 40 calls interleaved with the loops above in one process); its attention alone,
   caches hot, 0.75. Verifies walked this way until their numbers had to be their decode steps' (attend_block):
   a row's numbers here depend on the blocks' bounds and the running maxima. */
#if defined(__AVX__) && !defined(__AVX512F__)
#define COLUMN_WALKS 1
#else
#define COLUMN_WALKS 0
#endif
/* COLUMN_ROWS: query rows per column walk, 4 vectors. KEY_BLOCK: cached rows per block, a multiple of every
   column_scores step (12, 6, 4 and 3). Calls of up to 12 rows keep the loops above, whose unrolled walks do
   as well there (2 to 4 tokens of small-coder's 3 heads per key/value head). */
enum { COLUMN_ROWS = 32, KEY_BLOCK = 60, COLUMN_MIN_ROWS = 13 };

/* scores[t * 8 * vectors + r] = keys[t] . queries[r] for t < count, with queries transposed:
   queries[d * 8 * vectors + r]. `step` cached rows at a time (vectors * step <= 12 keeps the sums in
   registers), prefetching the keys and values KEY_BLOCK rows ahead: the next block's. */
static inline __attribute__((always_inline)) void column_scores(const float *keys, const float *values, int64_t count, const float *queries,
                                                                 int64_t dim, float *scores, const int vectors, const int step) {
  const int64_t width = 8 * vectors;
  int64_t t = 0;
  for (; t + step <= count; t += step) {
    const float *k = keys + t * dim;
    for (int64_t p = 0; p < step * dim; p += 16) {
      __builtin_prefetch(k + KEY_BLOCK * dim + p);
      __builtin_prefetch(values + (t + KEY_BLOCK) * dim + p);
    }
    for (int64_t block = 0; block < dim; block += 16) { /* 16 terms per partial sum (above) */
      f8 sums[12] = {0};
      for (int64_t d = block; d < block + 16; ++d) {
        f8 q[4];
        for (int v = 0; v < vectors; ++v) q[v] = load_float(queries + d * width + 8 * v);
        for (int j = 0; j < step; ++j)
          for (int v = 0; v < vectors; ++v) sums[j * vectors + v] += k[j * dim + d] * q[v];
      }
      for (int j = 0; j < step; ++j)
        for (int v = 0; v < vectors; ++v) {
          float *out = scores + (t + j) * width + 8 * v;
          f8 total = block ? load_float(out) + sums[j * vectors + v] : sums[j * vectors + v];
          memcpy(out, &total, sizeof total);
        }
    }
  }
  for (; t < count; ++t) {
    f8 totals[4] = {0};
    for (int64_t block = 0; block < dim; block += 16) {
      f8 sums[4] = {0};
      for (int64_t d = block; d < block + 16; ++d)
        for (int v = 0; v < vectors; ++v) sums[v] += keys[t * dim + d] * load_float(queries + d * width + 8 * v);
      for (int v = 0; v < vectors; ++v) totals[v] += sums[v];
    }
    for (int v = 0; v < vectors; ++v) memcpy(scores + t * width + 8 * v, &totals[v], sizeof(f8));
  }
}

enum { WEIGH_ROWS = 6 };

/* out[r + i, c .. c + WEIGH_LANES * vectors] += the sum over t < count of weights[t * width + (r + i) * apart] *
   values[t, c ..], for i < rows (at most WEIGH_ROWS), each row's terms in turn (rows and vectors constants where
   it is called). With `prefetch`, the values PREFETCH_ROWS rows ahead are fetched (a walk's first pass, where
   nothing fetched them before). */
static inline __attribute__((always_inline)) void column_weigh_pass(const float *values, int64_t count, const float *weights, int64_t width,
                                                                     int64_t apart, int64_t r, int64_t c, int64_t dim, float *out, const int rows,
                                                                     const int vectors, int prefetch) {
  wv sums[WEIGH_ROWS][WEIGH_VECTORS];
  for (int i = 0; i < rows; ++i)
    for (int v = 0; v < vectors; ++v) sums[i][v] = load_wv(out + (r + i) * dim + c + WEIGH_LANES * v);
  for (int64_t t = 0; t < count; ++t) {
    if (prefetch)
      for (int64_t p = 0; p < dim; p += 16) __builtin_prefetch(values + (t + PREFETCH_ROWS) * dim + p);
    wv value[WEIGH_VECTORS];
    for (int v = 0; v < vectors; ++v) {
      value[v] = load_wv(values + t * dim + c + WEIGH_LANES * v);
      KEEP(value[v]);
    }
    for (int i = 0; i < rows; ++i) {
      wv w = (wv){0} + weights[t * width + (r + i) * apart];
      for (int v = 0; v < vectors; ++v) sums[i][v] = weigh_multiply_add(w, value[v], sums[i][v]);
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int v = 0; v < vectors; ++v) store_wv(out + (r + i) * dim + c + WEIGH_LANES * v, sums[i][v]);
}

/* column_weigh_pass for rows r .. r + rows - 1 (at most WEIGH_ROWS taken), with the count a constant for its loops. */
static inline __attribute__((always_inline)) void column_weigh_rows(const float *values, int64_t count, const float *weights, int64_t width,
                                                                     int64_t apart, int64_t r, int64_t c, int64_t dim, float *out, int64_t rows,
                                                                     const int vectors, int prefetch) {
  switch (rows < WEIGH_ROWS ? rows : WEIGH_ROWS) {
    case 1: column_weigh_pass(values, count, weights, width, apart, r, c, dim, out, 1, vectors, prefetch); break;
    case 2: column_weigh_pass(values, count, weights, width, apart, r, c, dim, out, 2, vectors, prefetch); break;
    case 3: column_weigh_pass(values, count, weights, width, apart, r, c, dim, out, 3, vectors, prefetch); break;
    case 4: column_weigh_pass(values, count, weights, width, apart, r, c, dim, out, 4, vectors, prefetch); break;
    case 5: column_weigh_pass(values, count, weights, width, apart, r, c, dim, out, 5, vectors, prefetch); break;
    default: column_weigh_pass(values, count, weights, width, apart, r, c, dim, out, WEIGH_ROWS, vectors, prefetch); break;
  }
}

/* out[r] += the sum over t < count of weights[t * width + r * apart] * values[t], for r < rows (with
   `prefetch`, fetching the values ahead in the first pass): WEIGH_VECTORS vectors a pass, then one at a time
   where the head size leaves fewer (it is a multiple of 16). */
static void column_weigh(const float *values, int64_t count, const float *weights, int64_t width, int64_t apart, int64_t rows, int64_t dim,
                         int prefetch, float *out) {
  for (int64_t r = 0; r < rows; r += WEIGH_ROWS)
    for (int64_t c = 0; c < dim;) {
      int fetch = prefetch && r == 0 && c == 0, whole = c + WEIGH_LANES * WEIGH_VECTORS <= dim;
      if (whole)
        column_weigh_rows(values, count, weights, width, apart, r, c, dim, out, rows - r, WEIGH_VECTORS, fetch);
      else
        column_weigh_rows(values, count, weights, width, apart, r, c, dim, out, rows - r, 1, fetch);
      c += WEIGH_LANES * (whole ? WEIGH_VECTORS : 1);
    }
}

/* weigh_float's sums for more rows than one token's group has (a verify's), in column_weigh's passes: 12
   multiply-adds to 8 loads (24 to 10 on AVX-512), where weigh_float's loop, one row's weight at a time against every column, makes
   one to one. Each row's terms are added in turn either way, so a row gets the same numbers from both. A
   decode step's few rows keep weigh_float and one row's scores at a time: with this loop and the paired
   scores, small-coder's decode step's attention took 1.07x as long (one thread, 2,000 cached). (Laying the
   weights across first, a key's rows side by side as a column walk has them, measured no faster.) */
static void weigh_float_rows(const float *values, int64_t length, const float *weights, int64_t rows, int64_t dim, int64_t stride, const float *inverse,
                             float *out) {
  memset(out, 0, rows * dim * sizeof(float));
  column_weigh(values, length, weights, 1, stride, rows, dim, 1, out);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < dim; ++d) out[r * dim + d] *= inverse[r];
}

static inline f8 larger(f8 a, f8 b) {
  i32x8 above = a > b;
  return (f8)(((i32x8)a & above) | ((i32x8)b & ~above));
}

/* A column walk's running softmax: per query row, the largest score so far and the sum of e^(score - it). */
typedef struct {
  f8 top[COLUMN_ROWS / LANES], total[COLUMN_ROWS / LANES];
} Running;

/* The scores of cached rows [from, from + count) turned into weights against the running maxima, in place:
   row r attends up to position own + r / group (its token's), its later weights zeroed. Where a maximum
   rises, the row's sums so far (out, rows of dim) and total are rescaled to it first. */
static void column_softmax(float *scores, int64_t from, int64_t count, int64_t width, int64_t rows, int64_t own, int64_t group, Running *running,
                           float *out, int64_t dim) {
  int64_t vectors = width / LANES, masked = own > from ? own - from : 0;
  for (int64_t t = masked; t < count; ++t)
    for (int64_t r = 0; r < rows; ++r)
      if (from + t >= own + r / group) scores[t * width + r] = -1e30f;
  for (int64_t v = 0; v < vectors; ++v) {
    f8 top = running->top[v];
    for (int64_t t = 0; t < count; ++t) top = larger(load_float(scores + t * width + 8 * v), top);
    f8 rescale = exp_nonpositive(running->top[v] - top), total = running->total[v] * rescale;
    running->top[v] = top;
    for (int64_t t = 0; t < count; ++t) {
      f8 e = exp_nonpositive(load_float(scores + t * width + 8 * v) - top);
      memcpy(scores + t * width + 8 * v, &e, sizeof e);
      total += e;
    }
    running->total[v] = total;
    for (int64_t r = 8 * v; r < rows && r < 8 * v + 8; ++r)
      for (int64_t d = 0; d < dim; ++d) out[r * dim + d] *= rescale[r % 8];
  }
  for (int64_t t = masked; t < count; ++t)
    for (int64_t r = 0; r < rows; ++r)
      if (from + t >= own + r / group) scores[t * width + r] = 0.f;
}

/* Tokens per column walk: as many as fit COLUMN_ROWS rows whose transposed queries and sums fit the walk's
   buffers (MAX_GROUP * 512 floats); 0 where the kernel keeps the loops above. */
static int64_t column_span(const AttentionCall *call) {
  if (!COLUMN_WALKS || call->quantized) return 0;
  int64_t span = COLUMN_ROWS / call->group;
  while (span > 1 && (span * call->group + 7) / 8 * 8 * call->dim > MAX_GROUP * 512) --span;
  return span > 1 ? span : 0;
}

/* attend's tokens [first, last) of one row and key/value head, in column walks. */
static void attend_columns(AttentionCall *call, int64_t row, int64_t head, int64_t first, int64_t last) {
  int64_t group = call->group, dim = call->dim, past = past_length(call, row), span = call->column_span;
  const float *keys = (const float *)call->cache_key + (row * call->kv_heads + head) * call->capacity * dim;
  const float *values = (const float *)call->cache_value + (row * call->kv_heads + head) * call->capacity * dim;
  float queries[MAX_GROUP * 512], sums[MAX_GROUP * 512], scores[KEY_BLOCK * COLUMN_ROWS];
  for (int64_t start = first; start < last; start += span) {
    int64_t end = start + span < last ? start + span : last, rows = (end - start) * group, length = past + end;
    int64_t vectors = (rows + 7) / 8, width = 8 * vectors;
    memset(queries, 0, width * dim * sizeof(float));
    memset(sums, 0, rows * dim * sizeof(float));
    for (int64_t r = 0; r < rows; ++r) {
      const float *q = head_output(call, row, start + r / group, head * group + r % group);
      for (int64_t d = 0; d < dim; ++d) queries[d * width + r] = q[d] * call->scale;
    }
    Running running;
    for (int64_t v = 0; v < vectors; ++v) running.top[v] = (f8){0} - 1e30f, running.total[v] = (f8){0};
    for (int64_t from = 0; from < length; from += KEY_BLOCK) {
      int64_t count = from + KEY_BLOCK < length ? KEY_BLOCK : length - from;
      const float *k = keys + from * dim, *v = values + from * dim;
      switch (vectors) {
        case 1: column_scores(k, v, count, queries, dim, scores, 1, 12); break;
        case 2: column_scores(k, v, count, queries, dim, scores, 2, 6); break;
        case 3: column_scores(k, v, count, queries, dim, scores, 3, 4); break;
        default: column_scores(k, v, count, queries, dim, scores, 4, 3); break;
      }
      column_softmax(scores, from, count, width, rows, past + start + 1, group, &running, sums, dim);
      column_weigh(v, count, scores, width, 1, rows, dim, 0, sums); /* column_scores fetched the values */
    }
    for (int64_t r = 0; r < rows; ++r) {
      float *out = head_output(call, row, start + r / group, head * group + r % group);
      float inverse = 1.f / running.total[r / 8][r % 8];
      for (int64_t d = 0; d < dim; ++d) out[d] = sums[r * dim + d] * inverse;
    }
  }
}

/* A token's rotated queries of one key/value head's group (the first phase left them in the output), times the
   scale, and times the key scales of an int8 cache. */
static void scaled_queries(const AttentionCall *call, int64_t row, int64_t head, int64_t token, float *q) {
  int64_t group = call->group, dim = call->dim;
  const float *out = head_output(call, row, token, head * group);
  for (int64_t i = 0; i < group * dim; ++i) q[i] = out[i] * call->scale;
  if (call->quantized) {
    const float *key_scale = call->key_scale + head * dim;
    for (int64_t g = 0; g < group; ++g)
      for (int64_t d = 0; d < dim; ++d) q[g * dim + d] *= key_scale[d];
  }
}

/* A walk's products for `rows` query rows of one key/value head, as attend and attend_block call them: over
   `length` cached rows from element `cache` of the head's cache, the rows' scores into `weights` (rows `stride`
   apart), and their weighted sums, times `inverse`, into `merged`. A float cache's score loops and weighted sums
   take the rows in walks of UNROLLED_ROWS' counts, at most 12 (scores_int8 takes them all, LEVEL_BLOCK at a time;
   an int8 cache's weighted sums go PAIR_ROWS at a time): each row's numbers are its own either way. */
#define SCORE_FLOAT(g) scores_float((const float *)call->cache_key + cache, length, queries + done * dim, g, dim, weights + done * stride, stride)
#define WEIGH_INT8(g) \
  weigh_int8((const int8_t *)call->cache_value + cache, length, weights + done * stride, g, dim, stride, inverse + done, call->value_scale + head * dim, merged + done * dim)
#define WEIGH_FLOAT(g) \
  weigh_float((const float *)call->cache_value + cache, length, weights + done * stride, g, dim, stride, inverse + done, merged + done * dim)

/* The most of `rows` rows one unrolled walk takes: the largest of UNROLLED_ROWS not above it. */
static int64_t unrolled_part(int64_t rows) {
  int64_t count = 1;
  for (size_t i = 0; i < sizeof UNROLLED_ROWS / sizeof *UNROLLED_ROWS; ++i)
    if (UNROLLED_ROWS[i] <= rows) count = UNROLLED_ROWS[i];
  return count;
}

/* CALL for rows `done` .. of `rows`, in walks of counts BY_GROUP unrolls (each row's
   numbers are its own in any walk): a verify of 5 tokens of small-coder's 3 heads per key/value head walks 12
   rows and then 3, with the sums in registers, where one walk of a generic 15 kept them in memory and took 2.4
   times a decode step's attention (40.8 µs against 17.0 per layer, 128 tokens cached, a 2-core Xeon). */
#define IN_GROUPS(CALL)                                                        \
  for (int64_t done = 0, count; done < rows; done += count) {                  \
    count = unrolled_part(rows - done);                                        \
    BY_GROUP(CALL, count)                                                      \
  }

static void score_rows(const AttentionCall *call, int64_t cache, int64_t length, const float *queries, int64_t rows, float *weights, int64_t stride) {
  int64_t dim = call->dim;
  if (call->quantized)
    scores_int8((const int8_t *)call->cache_key + cache, (const int8_t *)call->cache_value + cache, length, queries, rows, dim, weights, stride);
  else
    IN_GROUPS(SCORE_FLOAT)
}

static void weigh_rows(const AttentionCall *call, int64_t head, int64_t cache, int64_t length, const float *weights, int64_t rows, int64_t stride,
                       const float *inverse, float *merged) {
  int64_t dim = call->dim;
  if (!call->quantized && rows > FEW_ROWS) {
    weigh_float_rows((const float *)call->cache_value + cache, length, weights, rows, dim, stride, inverse, merged);
    return;
  }
  if (call->quantized)
    for (int64_t done = 0, count; done < rows; done += count) { /* PAIR_ROWS at a time */
      count = rows - done < PAIR_ROWS ? rows - done : PAIR_ROWS;
      switch (count) {
        case 4: WEIGH_INT8(4); break;
        case 3: WEIGH_INT8(3); break;
        case 2: WEIGH_INT8(2); break;
        default: WEIGH_INT8(1); break;
      }
    }
  else
    IN_GROUPS(WEIGH_FLOAT)
}

/* A work item's scores: room for the most rows a walk takes (STEP_ROWS, at least attend's MAX_GROUP) over the
   whole cache, so that the buffer does not grow with the context. */
static float *scores_scratch(const AttentionCall *call) { return thread_scratch(SCRATCH_SCORES, (size_t)(STEP_ROWS * call->capacity) * sizeof(float)); }

/* Work item of a prompt's second phase (a call of more than STEP_TOKENS new tokens a row): one row, one
   key/value head, a block of new tokens; each token's `group` queries attend to the cache up to and including
   its own position. The block's tokens go a few at a time (walk_span's), their queries together as one larger
   group, so that they walk the cache once per few tokens instead of once each: every row scores up to the
   last token's position, and a row's weights past its own position are zeroed after its softmax. */
static void attend(void *data, size_t item) {
  AttentionCall *call = data;
  int64_t blocks = (call->new_width + QUERY_BLOCK - 1) / QUERY_BLOCK;
  int64_t row = (int64_t)item / (call->kv_heads * blocks), head = (int64_t)item / blocks % call->kv_heads;
  int64_t first = (int64_t)item % blocks * QUERY_BLOCK, group = call->group, dim = call->dim;
  int64_t count = call->query_seqlens[row], past = past_length(call, row);
  int64_t last = first + QUERY_BLOCK < count ? first + QUERY_BLOCK : count;
  if (first >= last || last <= first_needed(call, row)) return;
  int64_t stride = past + last, span = call->span;
  if (call->column_span && (last - first) * group >= COLUMN_MIN_ROWS) {
    attend_columns(call, row, head, first, last);
    return;
  }
  float *weights = scores_scratch(call), queries[MAX_GROUP * 512], merged[MAX_GROUP * 512];
  if (!weights) {
    fail_once(&call->error, "moecc.Attention: out of memory");
    return;
  }
  int64_t cache = (row * call->kv_heads + head) * call->capacity * dim;
  for (int64_t start = first; start < last; start += span) {
    int64_t end = start + span < last ? start + span : last, rows = (end - start) * group, length = past + end;
    for (int64_t token = start; token < end; ++token) scaled_queries(call, row, head, token, queries + (token - start) * group * dim);
    score_rows(call, cache, length, queries, rows, weights, stride);
    float inverse[MAX_GROUP];
    for (int64_t r = 0; r < rows; ++r) {
      int64_t own = past + start + r / group + 1; /* the row's token attends up to its own position */
      float top;
      inverse[r] = 1.f / softmax(weights + r * stride, own, &top);
      memset(weights + r * stride + own, 0, (length - own) * sizeof(float));
    }
    weigh_rows(call, head, cache, length, weights, rows, stride, inverse, merged);
    for (int64_t token = start; token < end; ++token)
      memcpy(head_output(call, row, token, head * group), merged + (token - start) * group * dim,
             group * dim * sizeof(float));
  }
}

/* A step's tokens (a decode step's one, a verify's k + 1: calls of up to STEP_TOKENS new tokens a row) each get
   the numbers a decode step of that token alone gets, whatever else the call holds. Greedy speculation keeps
   the main model's own output only if a verify scores each position exactly as the decode step would; where
   a verify's tokens walked the cache together in column walks, small-coder's verify logits differed from its
   decode steps' by up to 1.4e-5, enough to flip a near-tie. Here a step's tokens still share walks (up to
   step_span's at a time), with arithmetic that gives each query row the same numbers in any walk: a score is
   its dot product in one order whichever loop computes it (total, multiply_add; an int8 cache's is an exact
   integer sum, scores_int8), each row's softmax runs over
   its own keys only, and its weighted sum adds one key after another (an int8 cache's, exact integer sums over
   fixed blocks of keys: weigh_int8), a zero weight past its own position adding nothing.

   A row's cache is cut at fixed multiples of part_length into parts, where the model's key/value heads are
   fewer than TARGET_ITEMS (small-coder's draft's one, its main model's two), so that a long cache spreads over
   the threads, flash decoding's way: each part's weighted sums, unnormalized, with their maximum and total,
   then merged (merge_parts). Fixed cuts keep a token's parts the same in a verify as in its decode step, and
   the same beside other rows in a batch as alone. One work item per head read a long cache on one thread
   while the other waited: small-coder's draft proposed in 0.20 ms rather than 0.22 after a 1,536-token prompt
   on a 2-core AVX2 EPYC, and k = 4 decoding took 0.96 of its time (medians of 14 prompts, generators
   interleaved in one process; parts of 256 rows for every model then, before part_length). */

/* Tokens per walk of a step: as many as fit STEP_ROWS query rows, their queries and sums the walk's buffers
   (MAX_GROUP * 512 floats). A verify of 9 tokens of small-coder's 3 heads per key/value head then walks the
   cache once, and the benchmark-size model's 4, twice. After 2,000 cached, on one thread, the attention of a
   verify of 5 and of 9 tokens takes 1.08-1.10x and 0.99-1.02x the time the column walks took (small-coder's
   heads), 1.10-1.13x and 1.12-1.18x (the benchmark-size model's); with walks of up to 16 rows and the loops
   one row at a time, up to 1.47x. Small-coder's speculative decoding runs as fast as before (k = 8 and auto,
   12 prompts, per-prompt ratios 0.99 and 1.00 against the column walks' build). */
static int64_t step_span(const AttentionCall *call) {
  int64_t rows = STEP_ROWS < MAX_GROUP * 512 / call->dim ? STEP_ROWS : MAX_GROUP * 512 / call->dim;
  return rows / call->group > 1 ? rows / call->group : 1;
}

/* Cached rows per part: SPLIT_KEYS per key/value head, so that a call has about one work item per SPLIT_KEYS
   cached rows whatever its heads. Each part's rows pay a softmax, a merge and the loops' set-up: in parts of
   256 rows for every model, a benchmark-size decode step's attention (4 key/value heads) took 1.08-1.18x its
   time after 600 to 2,000 cached rows (one thread, a 2-core AVX-512 Xeon). */
static int64_t part_length(const AttentionCall *call) { return SPLIT_KEYS * call->kv_heads; }

/* Parts of the cache for a token with `total` cached rows up to and including its own. */
static int64_t token_parts(const AttentionCall *call, int64_t total) {
  return call->kv_heads < TARGET_ITEMS ? (total + part_length(call) - 1) / part_length(call) : 1;
}

/* Where a token's part leaves its results: its group's sums [group, dim], then their maxima and totals [group]
   each. */
static float *part_results(const AttentionCall *call, int64_t row, int64_t token, int64_t head, int64_t part) {
  size_t index = (size_t)(((row * call->new_width + token) * call->kv_heads + head) * call->parts + part);
  return call->parts_results + index * call->group * (call->dim + 2);
}

/* Work item of a step: one row, one key/value head, one part of the cache, a block of step_span's tokens, whose
   queries walk the part together; each token's group of rows attends to the part up to its own position. A
   token of one part writes its output, one of several its part's results. */
static void attend_block(void *data, size_t item) {
  AttentionCall *call = data;
  int64_t span = step_span(call), blocks = (call->new_width + span - 1) / span, parts = call->parts;
  int64_t block = (int64_t)item % blocks, part = (int64_t)item / blocks % parts, head = (int64_t)item / (blocks * parts) % call->kv_heads;
  int64_t row = (int64_t)item / (blocks * parts * call->kv_heads), group = call->group, dim = call->dim, past = past_length(call, row);
  int64_t first = block * span, last = first + span < call->query_seqlens[row] ? first + span : call->query_seqlens[row];
  int64_t from = parts > 1 ? part * part_length(call) : 0, end = past + last; /* the block's keys end at its last token's */
  if (first >= last || from >= end || last <= first_needed(call, row)) return; /* padding, a part past the block's tokens, or tokens not needed */
  int64_t to = parts > 1 && from + part_length(call) < end ? from + part_length(call) : end;
  int64_t rows = (last - first) * group, length = to - from, stride = length, cache = ((row * call->kv_heads + head) * call->capacity + from) * dim;
  float *weights = scores_scratch(call), queries[MAX_GROUP * 512], merged[MAX_GROUP * 512], tops[STEP_ROWS], totals[STEP_ROWS];
  float inverse[STEP_ROWS] = {0}; /* each row's is set below; GCC cannot tell that every row read is one of them */
  if (!weights) {
    fail_once(&call->error, "moecc.Attention: out of memory");
    return;
  }
  for (int64_t token = first; token < last; ++token) scaled_queries(call, row, head, token, queries + (token - first) * group * dim);
  score_rows(call, cache, length, queries, rows, weights, stride);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t own = past + first + r / group + 1, keys = own < to ? own - from : length; /* the row's keys in the part */
    tops[r] = -1e30f, totals[r] = 0.f, inverse[r] = 1.f;
    if (keys > 0) {
      totals[r] = softmax(weights + r * stride, keys, &tops[r]);
      if (token_parts(call, own) == 1) inverse[r] = 1.f / totals[r];
    }
    if (keys < 0) keys = 0; /* the part lies past this row's token */
    memset(weights + r * stride + keys, 0, (length - keys) * sizeof(float));
  }
  weigh_rows(call, head, cache, length, weights, rows, stride, inverse, merged);
  for (int64_t token = first; token < last; ++token) {
    int64_t own = past + token + 1, g0 = (token - first) * group;
    if (own <= from) continue; /* the part lies past this token */
    if (token_parts(call, own) == 1) {
      memcpy(head_output(call, row, token, head * group), merged + g0 * dim, group * dim * sizeof(float));
      continue;
    }
    float *results = part_results(call, row, token, head, part);
    memcpy(results, merged + g0 * dim, group * dim * sizeof(float));
    memcpy(results + group * dim, tops + g0, group * sizeof(float));
    memcpy(results + group * dim + group, totals + g0, group * sizeof(float));
  }
}

/* Each split token's parts into its output: the sums rescaled to the largest maximum, over their totals. */
static void merge_parts(AttentionCall *call) {
  int64_t group = call->group, dim = call->dim;
  for (int64_t row = 0; row < call->batch; ++row)
    for (int64_t token = first_needed(call, row); token < call->query_seqlens[row]; ++token) {
      int64_t parts = token_parts(call, past_length(call, row) + token + 1);
      if (parts == 1) continue;
      for (int64_t head = 0; head < call->kv_heads; ++head)
        for (int64_t g = 0; g < group; ++g) {
          float top = -1e30f, total = 0.f, *out = head_output(call, row, token, head * group + g);
          for (int64_t part = 0; part < parts; ++part) {
            float part_top = part_results(call, row, token, head, part)[group * dim + g];
            top = part_top > top ? part_top : top;
          }
          memset(out, 0, dim * sizeof(float));
          for (int64_t part = 0; part < parts; ++part) {
            const float *sums = part_results(call, row, token, head, part), *part_tops = sums + group * dim, *part_totals = part_tops + group;
            float weight = expf(part_tops[g] - top);
            total += weight * part_totals[g];
            for (int64_t d = 0; d < dim; ++d) out[d] += weight * sums[g * dim + d];
          }
          for (int64_t d = 0; d < dim; ++d) out[d] /= total;
        }
    }
}

/* The attention of a step's tokens: blocks of them per part as work items, then the split tokens merged. */
static OrtStatus *attend_step(OrtKernelContext *context, AttentionCall *call) {
  call->parts = 1;
  for (int64_t row = 0; row < call->batch; ++row) {
    int64_t parts = token_parts(call, call->seqlens_k[row] + 1); /* the row's last token has the most */
    call->parts = parts > call->parts ? parts : call->parts;
  }
  int64_t blocks = (call->new_width + step_span(call) - 1) / step_span(call);
  if (call->parts > 1) {
    /* room for the most parts a token of this cache can have, so that the buffer does not grow with the context */
    int64_t parts = token_parts(call, call->capacity);
    call->parts_results = thread_scratch(SCRATCH_PARTS, (size_t)(call->batch * call->new_width * call->kv_heads * parts * call->group * (call->dim + 2)) * sizeof(float));
    if (!call->parts_results) return fail("moecc.Attention: out of memory");
  }
  size_t items = (size_t)(call->batch * call->kv_heads * call->parts * blocks);
  OrtStatus *status = for_each_item(context, attend_block, items, call);
  if (!status && !call->error && call->parts > 1) merge_parts(call);
  return status ? status : call->error;
}

OrtStatus *check_call(const AttentionCall *call, int64_t positions) {
  if (call->dim > 512 || call->dim % (2 * LANES)) return fail("moecc.Attention: the head size must be a multiple of 16, at most 512");
  if (call->group > MAX_GROUP) return fail("moecc.Attention: more than 16 query heads per key/value head");
  for (int64_t row = 0; row < call->batch; ++row) {
    if (call->query_seqlens[row] < 0 || call->query_seqlens[row] > call->new_width || past_length(call, row) < 0 ||
        call->seqlens_k[row] >= call->capacity || call->seqlens_k[row] >= positions)
      return fail("moecc.Attention: a row's lengths do not fit its call or the cache");
  }
  return NULL;
}

/* Tokens up to which the first phase runs on the calling thread: a token's rotations and stores take a fraction of a
   microsecond, less than handing it to the threads costs. A verify of 9 tokens on small-coder's main model spent
   81-86 µs in its attention instead of 86-95 (4 layers, an instrumented build, four runs each, 2 threads of a
   2-core Xeon); its decode steps, 22 µs, as before. */
enum { APPEND_INLINE_TOKENS = STEP_TOKENS };

OrtStatus *attention_run(OrtKernelContext *context, AttentionCall *call) {
  call->span = walk_span(call->group);
  call->column_span = column_span(call);
  size_t tokens = (size_t)(call->batch * call->new_width);
  CHECK(for_each_item(tokens <= APPEND_INLINE_TOKENS ? NULL : context, append, tokens, call));
  if (call->new_width <= STEP_TOKENS) return attend_step(context, call);
  int64_t blocks = (call->new_width + QUERY_BLOCK - 1) / QUERY_BLOCK;
  CHECK(for_each_item(context, attend, (size_t)(call->batch * call->kv_heads * blocks), call));
  return call->error;
}

/* Every input's shape against the query's and the cache's, before anything is read. */
static OrtStatus *check_shapes(const Tensor *in, const Kernel *kernel) {
  if (in[QUERY].rank != 3 || !shaped(&in[PAST_KEY], 4, in[QUERY].shape[0], kernel->kv_num_heads, -1))
    return fail("moecc.Attention: the query must be [B, S, width] and the past keys [B, kv heads, capacity, D]");
  int64_t batch = in[QUERY].shape[0], width = in[QUERY].shape[1], dim = in[PAST_KEY].shape[3];
  if (in[PAST_VALUE].rank != 4 || in[PAST_VALUE].type != in[PAST_KEY].type || memcmp(in[PAST_VALUE].shape, in[PAST_KEY].shape, sizeof(int64_t) * 4))
    return fail("moecc.Attention: the past values must match the past keys");
  if (!in[KEY].value != !in[VALUE].value) return fail("moecc.Attention: give both key and value, or neither (packed in the query)");
  for (int i = KEY; i <= VALUE && in[KEY].value; ++i)
    if (!shaped(&in[i], 3, batch, width, kernel->kv_num_heads * dim)) return fail("moecc.Attention: key and value must be [B, S, kv heads * D]");
  if (!shaped(&in[COS], 2, -1, dim / 2, -1) || !shaped(&in[SIN], 2, in[COS].shape[0], dim / 2, -1))
    return fail("moecc.Attention: the rotary tables must be [positions, D / 2]");
  if (!shaped(&in[SEQLENS_K], 1, batch, -1, -1) || !shaped(&in[QUERY_SEQLENS], 1, batch, -1, -1))
    return fail("moecc.Attention: seqlens_k and query_seqlens must be [B]");
  for (int i = KEY_SCALE; i <= VALUE_SCALE; ++i)
    if (in[i].value && elements(&in[i]) != kernel->kv_num_heads * dim) return fail("moecc.Attention: a scale must hold kv heads * D values");
  for (int i = QUERY_NORM; i <= KEY_NORM; ++i)
    if (in[i].value && elements(&in[i]) != dim) return fail("moecc.Attention: a norm weight must hold D values");
  return NULL;
}

static OrtStatus *ORT_API_CALL compute(void *state, OrtKernelContext *context) {
  const Kernel *kernel = state;
  Tensor in[INPUT_COUNT], out[OUTPUT_COUNT];
  for (size_t i = 0; i < INPUT_COUNT; ++i) CHECK(input(context, i, &in[i]));
  CHECK(check_shapes(in, kernel));
  AttentionCall call = {0};
  call.batch = in[QUERY].shape[0];
  call.new_width = in[QUERY].shape[1];
  call.heads = kernel->num_heads;
  call.kv_heads = kernel->kv_num_heads;
  call.group = call.heads / call.kv_heads;
  call.dim = in[PAST_KEY].shape[3];
  call.capacity = in[PAST_KEY].shape[2];
  call.scale = kernel->scale != 0.f ? kernel->scale : 1.f / sqrtf((float)call.dim);
  call.quantized = in[PAST_KEY].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  if (call.quantized && (!in[KEY_SCALE].value || !in[VALUE_SCALE].value)) return fail("moecc.Attention: an int8 cache needs key and value scales");
  call.query = in[QUERY].data;
  int64_t output_shape[3] = {call.batch, call.new_width, call.heads * call.dim};
  if (in[KEY].value && in[VALUE].value) {
    call.key = in[KEY].data, call.value = in[VALUE].data;
    call.query_stride = call.heads * call.dim, call.key_stride = call.kv_heads * call.dim;
  } else { /* packed */
    call.key = call.query + call.heads * call.dim, call.value = call.key + call.kv_heads * call.dim;
    call.query_stride = call.key_stride = (call.heads + 2 * call.kv_heads) * call.dim;
  }
  if (in[QUERY].shape[2] != call.query_stride) return fail("moecc.Attention: the query's width does not match the heads");
  call.cos = in[COS].data, call.sin = in[SIN].data;
  call.seqlens_k = in[SEQLENS_K].data, call.query_seqlens = in[QUERY_SEQLENS].data;
  call.query_norm = in[QUERY_NORM].value ? in[QUERY_NORM].data : NULL;
  call.key_norm = in[KEY_NORM].value ? in[KEY_NORM].data : NULL;
  call.epsilon = kernel->epsilon;
  call.key_scale = call.quantized ? in[KEY_SCALE].data : NULL;
  call.value_scale = call.quantized ? in[VALUE_SCALE].data : NULL;
  CHECK(check_call(&call, in[COS].shape[0]));
  CHECK(output(context, OUTPUT, output_shape, 3, &out[OUTPUT]));
  CHECK(output(context, PRESENT_KEY, in[PAST_KEY].shape, 4, &out[PRESENT_KEY]));
  CHECK(output(context, PRESENT_VALUE, in[PAST_VALUE].shape, 4, &out[PRESENT_VALUE]));
  size_t cache_bytes = (size_t)(call.batch * call.kv_heads * call.capacity * call.dim) * (call.quantized ? 1 : sizeof(float));
  for (int kind = 0; kind < 2; ++kind) { /* not bound to the past: start from a copy of it */
    if (out[PRESENT_KEY + kind].data != in[PAST_KEY + kind].data) memcpy(out[PRESENT_KEY + kind].data, in[PAST_KEY + kind].data, cache_bytes);
  }
  call.output = out[OUTPUT].data;
  call.cache_key = out[PRESENT_KEY].data, call.cache_value = out[PRESENT_VALUE].data;
  return attention_run(context, &call);
}

OrtStatus *read_heads(const OrtKernelInfo *info, const char *op, int64_t *num_heads, int64_t *kv_num_heads) {
  CHECK(ort->KernelInfoGetAttribute_int64(info, "num_heads", num_heads));
  CHECK(ort->KernelInfoGetAttribute_int64(info, "kv_num_heads", kv_num_heads));
  if (*kv_num_heads > 0 && *num_heads % *kv_num_heads == 0) return NULL;
  char message[128];
  snprintf(message, sizeof message, "%s: num_heads must be a multiple of kv_num_heads", op);
  return fail(message);
}

static OrtStatus *ORT_API_CALL create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **state) {
  (void)op, (void)api;
  Kernel *kernel = calloc(1, sizeof(Kernel));
  if (!kernel) return fail("moecc.Attention: out of memory");
  OrtStatus *status = read_heads(info, "moecc.Attention", &kernel->num_heads, &kernel->kv_num_heads);
  kernel->scale = float_attribute(info, "scale", 0.f, NULL); /* 0: 1/sqrt(D) */
  kernel->epsilon = float_attribute(info, "epsilon", 1e-6f, NULL);
  if (status) {
    free(kernel);
    return status;
  }
  *state = kernel;
  return NULL;
}

static const char *ORT_API_CALL name(const OrtCustomOp *op) { (void)op; return "Attention"; }
static size_t ORT_API_CALL input_count(const OrtCustomOp *op) { (void)op; return INPUT_COUNT; }
static size_t ORT_API_CALL output_count(const OrtCustomOp *op) { (void)op; return OUTPUT_COUNT; }

/* The op, once per cache type (ONNX Runtime picks by the past's type). */
typedef struct {
  OrtCustomOp op; /* first: ONNX Runtime hands back a pointer to it */
  ONNXTensorElementDataType cache;
} AttentionOp;

static ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp *op, size_t index) {
  if (index == PAST_KEY || index == PAST_VALUE) return ((const AttentionOp *)op)->cache;
  return index == SEQLENS_K || index == QUERY_SEQLENS ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

static ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp *op, size_t index) {
  return index == OUTPUT ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ((const AttentionOp *)op)->cache;
}

static OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_characteristic(const OrtCustomOp *op, size_t index) {
  (void)op;
  return index == KEY || index == VALUE || index >= KEY_SCALE ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}

/* Written once, at load: sessions registering the library concurrently only read them. */
#define ATTENTION_OP(CACHE)                                                                                  \
  {                                                                                                          \
    .op = {.version = ORT_API_VERSION, .GetName = name, .GetExecutionProviderType = cpu_provider,            \
           .GetInputType = input_type, .GetInputTypeCount = input_count, .GetOutputType = output_type,      \
           .GetOutputTypeCount = output_count, .KernelDestroy = free_state,                                  \
           .GetInputCharacteristic = input_characteristic, .GetOutputCharacteristic = required,             \
           .GetInputMemoryType = cpu_memory, .CreateKernelV2 = create, .KernelComputeV2 = compute},          \
    .cache = CACHE                                                                                           \
  }
static const AttentionOp attention_ops[] = {ATTENTION_OP(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT), ATTENTION_OP(ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8)};

OrtStatus *add_attention_ops(OrtCustomOpDomain *domain) {
  for (size_t i = 0; i < sizeof attention_ops / sizeof *attention_ops; ++i) CHECK(ort->CustomOpDomain_Add(domain, &attention_ops[i].op));
  return NULL;
}
