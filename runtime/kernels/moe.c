/* moecc.MoE: a mixture-of-experts layer for the CPU that streams each chosen expert's weights once per call.

ONNX Runtime's CPU MoE gives each thread a contiguous range of experts and runs a general matrix product per
expert, so a decode step's few chosen experts often land on one thread, and a prompt's small per-expert
batches run far below the machine's arithmetic rate. Here every chosen expert's units are split among the
threads, each unit's weights are read in one sequential pass for all the tokens that chose its expert (four
at a time, while a row is in registers; an expert's 3 or more, a verify's or a prompt's, unit by unit from the
core's first cache: group_pass),
and the experts' contributions are summed per token at the end.
Its contract is that of the com.microsoft MoE node it replaces for the float32 SwiGLU experts moecc exports
(runtime/kernels/session.py swaps it in when a session loads), except that fc2 comes transposed, so that a
unit's output weights are one row:

  inputs   0 input [tokens, H] or [B, S, H]   1 router logits [tokens, E]
           2 fc1 [E, 2I, H]: each expert's gate and linear rows, interleaved (gate of unit i is row 2i)
           3 fc2, transposed: [E, I, H]
  outputs  0 output, the input's shape: the sum over each token's k chosen experts of
           weight * fc2 . swiglu(fc1 . x)
  attrs    k; normalize_routing_weights (the k weights divided by their sum); activation_alpha,
           activation_beta, swiglu_limit: swiglu(gate, linear) = g * sigmoid(alpha g) * (l + beta) with
           g = min(gate, limit) and l = clamp(linear, -limit, limit)

A token's experts are the k largest of the softmax of its logits (ties to the higher expert, as ONNX
Runtime's); a route whose weight is zero is skipped.

moecc.QMoE does the same for the INT4 and INT8 experts of com.microsoft QMoE, with float products on the
weights' levels times their scales (the node's own numbers, so the main model stays what it was quantized
to). Its weights come one level per byte, fc2's transposed with its scales (runtime/kernels/moe.py unpacks
and transposes them in ops that ONNX Runtime folds into constants when the session loads):

  inputs   0, 1 as moecc.MoE   2 fc1 levels [E, 2I, H] uint8   3 fc1 scales [E, 2I, H / B1]: per block of B1
           inputs, a multiple of 16   4 fc2 levels, transposed: [E, I, H] uint8   5 fc2 scales, transposed:
           [E, I / B2, H], per block of B2 units, a multiple of 16   6 (optional) mixing weights [tokens, E]: QMoE's router_weights,
           each chosen expert's weight in place of its routing probability, not negative (experts the layer's
           full top k did not choose have 0, and are skipped)
  attrs    those of moecc.MoE, and expert_weight_bits: 4 (levels stored with an offset of 8) or 8 (of 128)

A weight is (level - offset) * its block's scale. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "ops.h"

enum { INPUT, ROUTER, FC1, FC2, INPUT_COUNT };
enum { FC1_LEVELS = 2, FC1_SCALES, FC2_LEVELS, FC2_SCALES, MIXING, QUANTIZED_INPUT_COUNT }; /* moecc.QMoE's */
/* Units one pass reads (their fc1 and fc2 rows, 16 * 3 * H floats: 192 KiB at H = 1024, so that the passes
   of an expert's token groups reread them from the core's cache), and tokens per group of pass(). */
enum { UNITS = 16, MAX_TOKENS = 4, HIDDEN_PER_SUM = 256 };
/* Work items a decode step aims for: its k chosen experts are cut into at least this many pieces between them
   (each with its own partial sums). Every call cuts an expert as a decode step does, whatever its tokens
   chose, so that a verify gives each token the numbers its decode step would (a token's partial sums are
   added in one order). Cut by the call's count of chosen experts, a verify of 9 tokens on small-coder, which
   chooses 7 of 8, cut each expert in 4 where a decode step cut it in 12, and the tokens' outputs differed by
   up to 8e-6. Aiming for 32 pieces, as decode steps did, cut every call's experts in 12 and its prefill of
   400 tokens took 1.04 times as long; with 8, in 4 (three of its blocks of units each), prefill and decoding
   take what they took before (whole model, 2 threads). Tokens per chunk. */
enum { TARGET_ITEMS = 8, CHUNK = 512 };

typedef ExpertMix Kernel;

/* One call: the routes grouped by expert, and the buffers the two phases share. */
typedef struct {
  int64_t tokens, hidden, inter, k, units_per_item, items_per_expert; /* the last item of an expert may have fewer units */
  const float *x, *fc1, *fc2; /* moecc.QMoE: fc1 and fc2 are the scales, of blocks block1 and block2 */
  const uint8_t *fc1_levels, *fc2_levels; /* moecc.QMoE's, else NULL */
  int64_t block1, block2;
  float *out;
  const Kernel *kernel;
  int64_t active_count, *active; /* the experts some token chose, in order */
  int64_t *first;                /* [E + 1]: expert e's routes are first[e] .. first[e + 1] - 1 */
  int64_t *route_token;          /* [routes], grouped by expert */
  int64_t *token_routes;         /* [tokens * k]: each token's routes, -1 where skipped */
  float *route_weight;           /* [routes] */
  const float *mixing;           /* moecc.QMoE's optional mixing weights [tokens, E], else NULL */
  float *partial;                /* [items_per_expert, routes, H]: each route's weighted output, per item */
} Call;

/* The widest vectors the machine has (GCC/Clang vector extensions; the kernel is built for the machine it runs
   on). Four fc1 rows at a time for MAX_TOKENS tokens: their sums stay in registers where there are 32 of them
   (AVX-512, Arm); with AVX2's 16 some spill to the core's first cache, which measured faster than two rows at
   a time, and than 16-float vectors made of two halves. H is a multiple of 16 and I of UNITS. */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
enum { ROWS = 4 };
_Static_assert(16 % LANES == 0 && HIDDEN_PER_SUM % LANES == 0 && UNITS % (ROWS / 2) == 0, "the vectors and passes divide H and I");
typedef float vector __attribute__((vector_size(LANES * sizeof(float))));

static inline vector load(const float *x) {
  vector v;
  memcpy(&v, x, sizeof v);
  return v;
}

static inline void store(float *x, vector v) { memcpy(x, &v, sizeof v); }

#include "levels.h"

/* A token's sums must not depend on the loop that makes them (a decode step's, a verify's, a prompt's): fast-math
   regroups a chain of `+=` by the code around it, and a prompt's loops gave a token outputs 4e-7 away from its
   decode step's. So the sums go through intrinsics, which no compiler regroups, where the machine has FMA;
   elsewhere, with GCC, fast-math keeps the sums in the order written. */
#if defined(__GNUC__) && !defined(__clang__) && !defined(__FMA__)
#pragma GCC optimize("no-associative-math")
#endif

/* a * b + c, fused where the machine has FMA. */
static inline vector multiply_add(vector a, vector b, vector c) {
#if defined(__AVX512F__)
  return (vector)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__) && LANES == 8
  return (vector)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

static inline vector splat(float x) { return (vector){0} + x; }

/* The sum of v's lanes, always in one order. */
static inline float total(vector v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX__) && LANES == 8
  __m256 pairs = _mm256_hadd_ps((__m256)v, (__m256)v), quads = _mm256_hadd_ps(pairs, pairs);
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(quads), _mm256_extractf128_ps(quads, 1)));
#else
  float sum = 0;
  for (int lane = 0; lane < LANES; ++lane) sum += v[lane];
  return sum;
#endif
}

static inline float swiglu(const Kernel *kernel, float gate, float linear) {
  if (kernel->limited) { /* a flag, not an infinite limit: the kernel is built with -ffast-math */
    gate = gate < kernel->limit ? gate : kernel->limit;
    linear = linear < -kernel->limit ? -kernel->limit : linear > kernel->limit ? kernel->limit : linear;
  }
  return gate / (1.f + expf(-kernel->alpha * gate)) * (linear + kernel->beta);
}

/* activate()'s arrays start on a cache line, so that a loop the compiler peels to align its vectors peels
   nothing, and no coefficient comes out of its scalar code instead of its vector code. */
#define ALIGNED __attribute__((aligned(64)))
/* One body for every caller: GCC would otherwise clone it for each constant count, each its own code. */
#if defined(__clang__)
#define ONE_BODY __attribute__((noinline))
#else
#define ONE_BODY __attribute__((noinline, noclone))
#endif

/* coefficients[i] = weights[i] * swiglu(gates[i], linears[i]) for i < count, a multiple of 16: each a unit's
   contribution to one route, from the totals of its gate and linear sums. Every loop that makes them (a decode
   step's, a prompt's) hands them here, so that they come out of the same instructions whatever the loop, and
   in whole vectors (the compiler's vector exp): one at a time, inlined, they took a fifth of a prompt's time,
   and fast-math ordered their products by the code around them, so that a token's output changed with the
   number of tokens beside it. */
static ONE_BODY void activate(const Kernel *kernel, const float *restrict gates, const float *restrict linears,
                                               const float *restrict weights, float *restrict coefficients, int64_t count) {
  for (int64_t i = 0; i < count; ++i) coefficients[i] = weights[i] * swiglu(kernel, gates[i], linears[i]);
}

/* The totals of ROWS / 2 units' sums (from unit u: gate and linear rows in turn) for `tokens` tokens, with their
   routes' weights, into activate()'s inputs laid out [unit][token]. */
static inline __attribute__((always_inline)) void gather_totals(vector sums[ROWS][MAX_TOKENS], int64_t u, int64_t tokens, const float *weights,
                                                                float *gates, float *linears, float *scales) {
  for (int64_t p = 0; p < ROWS / 2; ++p)
    for (int64_t t = 0; t < tokens; ++t) {
      int64_t i = (u + p) * tokens + t;
      gates[i] = total(sums[2 * p][t]);
      linears[i] = total(sums[2 * p + 1][t]);
      scales[i] = weights[t];
    }
}

/* One pass over UNITS units for TOKENS (1 to 4, a constant where it is called, so that the sums stay in
   registers) of an expert's routes: their activations from the units' fc1 rows, ROWS / 2 units at a
   time, then each unit's fc2 row times its weighted activation added to the routes' partial outputs. */
static inline __attribute__((always_inline)) void pass(const Call *call, const float *fc1, const float *fc2, const float *const *xs,
                                                       const float *weights, int64_t token_count, float *const *partials) {
  int64_t hidden = call->hidden;
  /* Rows shorter than a 4 KiB page (H < 1024) leave the hardware's prefetcher, which stops at a page's end,
     cold at every group of rows; the loop then fetches the next group's fc1 rows and this group's fc2 rows
     itself, spread over its steps. Measured on an AVX2 machine, one process, alternating builds: a decode
     step's MoE 1.26x as fast at the shipped pair's H = 256 and a 5-token verify's 1.33-1.40x; 1.07-1.15x at
     H = 512; at H = 1024 the same prefetches cost 13-15 %, so they are left to the hardware there. */
  int fetch_ahead = hidden * (int64_t)sizeof(float) < 4096;
  ALIGNED float gates[UNITS * MAX_TOKENS], linears[UNITS * MAX_TOKENS], scales[UNITS * MAX_TOKENS], coefficients[UNITS * MAX_TOKENS]; /* [u][t] */
  for (int64_t u = 0; u < UNITS; u += ROWS / 2) {
    vector sums[ROWS][MAX_TOKENS];
    for (int64_t r = 0; r < ROWS; ++r)
      for (int64_t t = 0; t < token_count; ++t) sums[r][t] = (vector){0};
    const float *rows = fc1 + 2 * u * hidden;
    const char *next_rows = (const char *)(rows + ROWS * hidden), *outputs = (const char *)(fc2 + u * hidden);
    for (int64_t d = 0; d < hidden; d += LANES) {
      if (fetch_ahead) { /* hints: past the end of fc1 they cannot fault */
        for (int64_t p = 0; p < LANES * ROWS * (int64_t)sizeof(float); p += 64) __builtin_prefetch(next_rows + d * ROWS * sizeof(float) + p);
        for (int64_t p = 0; p < LANES * ROWS / 2 * (int64_t)sizeof(float); p += 64) __builtin_prefetch(outputs + d * ROWS / 2 * sizeof(float) + p);
      }
      vector x[MAX_TOKENS];
      for (int64_t t = 0; t < token_count; ++t) x[t] = load(xs[t] + d);
      for (int64_t r = 0; r < ROWS; ++r) {
        vector w = load(rows + r * hidden + d);
        for (int64_t t = 0; t < token_count; ++t) sums[r][t] = multiply_add(w, x[t], sums[r][t]);
      }
    }
    gather_totals(sums, u, token_count, weights, gates, linears, scales);
  }
  activate(call->kernel, gates, linears, scales, coefficients, UNITS * token_count);
  for (int64_t h = 0; h < hidden; h += LANES) {
    vector out[MAX_TOKENS];
    for (int64_t t = 0; t < token_count; ++t) out[t] = load(partials[t] + h);
    for (int64_t u = 0; u < UNITS; ++u) {
      vector w = load(fc2 + u * hidden + h);
      for (int64_t t = 0; t < token_count; ++t) out[t] = multiply_add(splat(coefficients[u * token_count + t]), w, out[t]);
    }
    for (int64_t t = 0; t < token_count; ++t) store(partials[t] + h, out[t]);
  }
}

/* An expert's routes when it has MANY_ROUTES or more (a verify's several tokens on one expert, a prompt's): the
   same sums as pass() gives each route, in other loops. pass() keeps 16 sums (4 fc1 rows for 4 tokens), more
   than AVX2's 16 registers hold beside its rows and tokens, and rereads its UNITS units' rows from the second
   cache for every 4 tokens. Here a step's units' fc1 rows (FC1_UNITS units) stay in the first cache while up to
   GROUP_TOKENS tokens go past them FC1_TOKENS at a time (every row and token loaded once per step), the next
   units' rows and these units' fc2 rows fetched meanwhile, and fc2 adds 16 outputs of FC2_TOKENS tokens at a time (12
   sums), where pass() broadcast a coefficient for every multiply-add. On one core of an AVX2 EPYC, an expert's
   8 to 32 routes took 0.82-0.90x pass()'s time (H = 384, I = 192) and 0.78-0.85x (H = 1024, I = 512), and with
   the coefficients made 8 at a time (activate) bench-moe's prefill of 64 and 400 tokens 0.84x (2 threads),
   small-coder's 0.93-0.96x. With its weights beyond the cache (4 of 64 experts chosen per call), 3 routes took
   0.84-0.90x pass()'s time and 6 0.69-0.70x (2 routes 0.77-0.88x, but whole verify calls no faster than with
   3): the whole model's verify of 6 and 9 positions 0.97-0.99x on small-coder, of 5 and 9 0.94-0.95x on
   bench-moe, prefill and decode level. moecc.QMoE's experts take it from
   MANY_QUANTIZED_ROUTES, 16 units at a time turned into floats (dequantize): one core, INT4 and INT8 experts at
   H = 384, 64 tokens 0.77-0.84x the time of pass_quantized(), 400 tokens 0.71-0.81x; with 9 or 16 tokens on 8
   experts, 1.1-1.25x, where turning them into floats costs more than it saves. */
enum { MANY_ROUTES = 3, MANY_QUANTIZED_ROUTES = 8, PROMPT_ROUTES = 8, GROUP_TOKENS = 48, FC2_TOKENS = 6, FC2_FLOATS = 16 };
/* fc1's step: FC1_UNITS units' rows against FC1_TOKENS tokens, 2 * FC1_UNITS * FC1_TOKENS sums. AVX-512's 32
   registers hold two units' for 6 tokens (24 sums; 10 loads for 24 multiply-adds, where one unit's for 4 tokens
   made 8 from 6 loads): bench-moe's prefill of 70 tokens 0.89x the time, small-coder's 0.97x, decode steps and
   verifies level, the numbers the same bit for bit (every sum still runs over the inputs in one order). */
#if defined(__AVX512F__)
#define FC1_UNITS 2
#define FC1_TOKENS 6
#else
#define FC1_UNITS 1
#define FC1_TOKENS 4
#endif
_Static_assert(UNITS % FC1_UNITS == 0 && FC1_TOKENS <= 6, "a pass's units go FC1_UNITS at a time; group_pass's cases cover up to 6 tokens");
enum { FC2_VECTORS = FC2_FLOATS / LANES };

/* activate()'s inputs [t * UNITS + p] for `units` units' fc1 rows from `rows` (each unit's gate and linear rows
   in turn) and `tokens` tokens (constants where it is called). */
static inline __attribute__((always_inline)) void unit_activations(const Call *call, const float *rows, const float *fc2_row, int fetch, const float *const *xs,
                                                                   const float *weights, int units, int tokens, float *gates, float *linears, float *scales) {
  int64_t hidden = call->hidden;
  vector gate[FC1_UNITS][FC1_TOKENS], linear[FC1_UNITS][FC1_TOKENS];
  for (int p = 0; p < units; ++p)
    for (int t = 0; t < tokens; ++t) gate[p][t] = linear[p][t] = (vector){0};
  const char *next = (const char *)(rows + 2 * units * hidden), *output = (const char *)fc2_row;
  for (int64_t d = 0; d < hidden; d += LANES) {
    if (fetch) {
      for (int p = 0; p < units; ++p) {
        __builtin_prefetch(next + (2 * p * hidden + 2 * d) * sizeof(float));
        __builtin_prefetch(output + (p * hidden + d) * sizeof(float));
      }
    }
    vector g[FC1_UNITS], l[FC1_UNITS];
    for (int p = 0; p < units; ++p) {
      g[p] = load(rows + 2 * p * hidden + d), l[p] = load(rows + (2 * p + 1) * hidden + d);
      KEEP(g[p]);
      KEEP(l[p]);
    }
    for (int t = 0; t < tokens; ++t) {
      vector x = load(xs[t] + d);
      for (int p = 0; p < units; ++p) {
        gate[p][t] = multiply_add(g[p], x, gate[p][t]);
        linear[p][t] = multiply_add(l[p], x, linear[p][t]);
      }
    }
  }
  for (int t = 0; t < tokens; ++t)
    for (int p = 0; p < units; ++p) {
      gates[t * UNITS + p] = total(gate[p][t]);
      linears[t * UNITS + p] = total(linear[p][t]);
      scales[t * UNITS + p] = weights[t];
    }
}

/* partials[t] += sum over UNITS units u of coefficients[t][u] * fc2[u], for TOKENS tokens (a constant where it is called). */
static inline __attribute__((always_inline)) void unit_outputs(int64_t hidden, const float *fc2, const float (*coefficients)[UNITS], int tokens,
                                                               float *const *partials) {
  for (int64_t h = 0; h < hidden; h += FC2_FLOATS) {
    vector out[FC2_TOKENS][FC2_VECTORS];
    for (int t = 0; t < tokens; ++t)
      for (int v = 0; v < FC2_VECTORS; ++v) out[t][v] = load(partials[t] + h + v * LANES);
    for (int u = 0; u < UNITS; ++u) {
      vector w[FC2_VECTORS];
      for (int v = 0; v < FC2_VECTORS; ++v) w[v] = load(fc2 + u * hidden + h + v * LANES);
      for (int t = 0; t < tokens; ++t) {
        vector c = splat(coefficients[t][u]);
        for (int v = 0; v < FC2_VECTORS; ++v) out[t][v] = multiply_add(c, w[v], out[t][v]);
      }
    }
    for (int t = 0; t < tokens; ++t)
      for (int v = 0; v < FC2_VECTORS; ++v) store(partials[t] + h + v * LANES, out[t][v]);
  }
}

/* One pass over UNITS units for up to GROUP_TOKENS routes (`count`), as pass(); `fetch`: the next units' rows
   fetched ahead, for an expert with fewer than PROMPT_ROUTES routes (a verify's), which waits on its weights
   while the hardware's prefetcher fetches them late. A prompt's many have time for them, and the hints cost it:
   bench-moe's prefill of 400 tokens 1.04x the time with them. */
static void group_pass(const Call *call, const float *fc1, const float *fc2, const float *const *xs, const float *weights, int64_t count,
                       float *const *partials, int fetch) {
  int64_t hidden = call->hidden;
  ALIGNED float gates[GROUP_TOKENS][UNITS], linears[GROUP_TOKENS][UNITS], scales[GROUP_TOKENS][UNITS], coefficients[GROUP_TOKENS][UNITS];
  for (int64_t u = 0; u < UNITS; u += FC1_UNITS) {
    const float *rows = fc1 + 2 * u * hidden;
    for (int64_t t = 0; t < count; t += FC1_TOKENS) {
      float *g = &gates[t][u], *l = &linears[t][u], *w = &scales[t][u];
      const float *const *x = xs + t;
      const float *fc2_row = fc2 + u * hidden, *weight = weights + t;
      switch (count - t < FC1_TOKENS ? count - t : FC1_TOKENS) {
        case 1: unit_activations(call, rows, fc2_row, fetch, x, weight, FC1_UNITS, 1, g, l, w); break;
        case 2: unit_activations(call, rows, fc2_row, fetch, x, weight, FC1_UNITS, 2, g, l, w); break;
        case 3: unit_activations(call, rows, fc2_row, fetch, x, weight, FC1_UNITS, 3, g, l, w); break;
#if FC1_TOKENS > 4
        case 4: unit_activations(call, rows, fc2_row, fetch, x, weight, FC1_UNITS, 4, g, l, w); break;
        case 5: unit_activations(call, rows, fc2_row, fetch, x, weight, FC1_UNITS, 5, g, l, w); break;
#endif
        default: unit_activations(call, rows, fc2_row, fetch, x, weight, FC1_UNITS, FC1_TOKENS, g, l, w); break;
      }
    }
  }
  activate(call->kernel, gates[0], linears[0], scales[0], coefficients[0], count * UNITS);
  for (int64_t t = 0; t < count; t += FC2_TOKENS) {
    switch (count - t < FC2_TOKENS ? count - t : FC2_TOKENS) {
      case 1: unit_outputs(hidden, fc2, coefficients + t, 1, partials + t); break;
      case 2: unit_outputs(hidden, fc2, coefficients + t, 2, partials + t); break;
      case 3: unit_outputs(hidden, fc2, coefficients + t, 3, partials + t); break;
      case 4: unit_outputs(hidden, fc2, coefficients + t, 4, partials + t); break;
      case 5: unit_outputs(hidden, fc2, coefficients + t, 5, partials + t); break;
      default: unit_outputs(hidden, fc2, coefficients + t, 6, partials + t); break;
    }
  }
}

/* moecc.QMoE's weights as floats, in every loop alike: fc1's at inputs d .. d + LANES of a row (its level times
   its block's scale, less the offset times it), and fc2's at outputs h .. h + LANES of a unit's row. */
static inline vector fc1_weight(const uint8_t *levels, float scale, float shift) { return multiply_add(levels_at(levels), splat(scale), splat(-shift)); }
static inline vector fc2_weight(const uint8_t *levels, float offset, vector scale) { return (levels_at(levels) - offset) * scale; }

/* UNITS units of a quantized expert from `unit` as group_pass's float rows: their 2 * UNITS fc1 rows, then their
   UNITS fc2 rows, each weight the number pass_quantized() makes of it. */
static void dequantize(const Call *call, int64_t expert, int64_t unit, float *out) {
  int64_t hidden = call->hidden, inter = call->inter, blocks = hidden / call->block1;
  float offset = call->kernel->offset;
  for (int64_t r = 0; r < 2 * UNITS; ++r) {
    int64_t row = expert * 2 * inter + 2 * unit + r;
    const uint8_t *levels = call->fc1_levels + row * hidden;
    for (int64_t block = 0; block < blocks; ++block) {
      float scale = call->fc1[row * blocks + block], shift = offset * scale;
      for (int64_t d = block * call->block1; d < (block + 1) * call->block1; d += LANES) store(out + r * hidden + d, fc1_weight(levels + d, scale, shift));
    }
  }
  const uint8_t *columns = call->fc2_levels + (expert * inter + unit) * hidden;
  const float *scales = call->fc2 + (expert * (inter / call->block2) + unit / call->block2) * hidden;
  for (int64_t u = 0; u < UNITS; ++u)
    for (int64_t h = 0; h < hidden; h += LANES) store(out + (2 * UNITS + u) * hidden + h, fc2_weight(columns + u * hidden + h, offset, load(scales + h)));
}

/* pass() for moecc.QMoE: the same steps, on levels turned into floats as they are read and scaled per block (a
   pass's UNITS units lie in one block of fc2's: B2 is a multiple of UNITS). */
static inline __attribute__((always_inline)) void pass_quantized(const Call *call, int64_t expert, int64_t unit, const float *const *xs,
                                                                 const float *weights, int64_t token_count, float *const *partials) {
  int64_t hidden = call->hidden, inter = call->inter, blocks = hidden / call->block1;
  float offset = call->kernel->offset;
  ALIGNED float gates[UNITS * MAX_TOKENS], linears[UNITS * MAX_TOKENS], scales_of[UNITS * MAX_TOKENS], coefficients[UNITS * MAX_TOKENS]; /* [u][t] */
  for (int64_t u = 0; u < UNITS; u += ROWS / 2) {
    int64_t row = expert * 2 * inter + 2 * (unit + u); /* the first of this step's ROWS fc1 rows */
    const uint8_t *rows = call->fc1_levels + row * hidden;
    const float *scales = call->fc1 + row * blocks;
    vector sums[ROWS][MAX_TOKENS];
    for (int64_t r = 0; r < ROWS; ++r)
      for (int64_t t = 0; t < token_count; ++t) sums[r][t] = (vector){0};
    for (int64_t block = 0; block < blocks; ++block) {
      float scale[ROWS], shift[ROWS];
      for (int64_t r = 0; r < ROWS; ++r) shift[r] = offset * (scale[r] = scales[r * blocks + block]);
      for (int64_t d = block * call->block1; d < (block + 1) * call->block1; d += LANES) {
        vector x[MAX_TOKENS];
        for (int64_t t = 0; t < token_count; ++t) x[t] = load(xs[t] + d);
        for (int64_t r = 0; r < ROWS; ++r) {
          vector w = fc1_weight(rows + r * hidden + d, scale[r], shift[r]);
          for (int64_t t = 0; t < token_count; ++t) sums[r][t] = multiply_add(w, x[t], sums[r][t]);
        }
      }
    }
    gather_totals(sums, u, token_count, weights, gates, linears, scales_of);
  }
  activate(call->kernel, gates, linears, scales_of, coefficients, UNITS * token_count);
  const uint8_t *columns = call->fc2_levels + (expert * inter + unit) * hidden;
  const float *scales = call->fc2 + (expert * (inter / call->block2) + unit / call->block2) * hidden;
  for (int64_t h = 0; h < hidden; h += LANES) {
    vector out[MAX_TOKENS], scale = load(scales + h);
    for (int64_t t = 0; t < token_count; ++t) out[t] = load(partials[t] + h);
    for (int64_t u = 0; u < UNITS; ++u) {
      vector w = fc2_weight(columns + u * hidden + h, offset, scale);
      for (int64_t t = 0; t < token_count; ++t) out[t] = multiply_add(splat(coefficients[u * token_count + t]), w, out[t]);
    }
    for (int64_t t = 0; t < token_count; ++t) store(partials[t] + h, out[t]);
  }
}

/* Routes route .. route + count - 1: each one's token (its input row) and its partial output of item `part`. */
static void route_rows(const Call *call, int64_t part, int64_t route, int64_t count, const float **xs, float **partials) {
  int64_t hidden = call->hidden, routes = call->tokens * call->k;
  for (int64_t t = 0; t < count; ++t) {
    xs[t] = call->x + call->route_token[route + t] * hidden;
    partials[t] = call->partial + (part * routes + route + t) * hidden;
  }
}

/* First phase, one work item: units_per_item units of one chosen expert, for all its routes, into this item's
   partial outputs of those routes. */
static void expert(void *data, size_t item) {
  const Call *call = data;
  int64_t expert = call->active[(int64_t)item / call->items_per_expert], part = (int64_t)item % call->items_per_expert;
  int64_t hidden = call->hidden, routes = call->tokens * call->k, first = call->first[expert], end = call->first[expert + 1];
  for (int64_t route = first; route < end; ++route) memset(call->partial + (part * routes + route) * hidden, 0, hidden * sizeof(float));
  int64_t last = (part + 1) * call->units_per_item < call->inter ? (part + 1) * call->units_per_item : call->inter;
  int quantized = call->fc1_levels != NULL, many = end - first >= (quantized ? MANY_QUANTIZED_ROUTES : MANY_ROUTES);
  /* a quantized expert's units as floats for group_pass, once per UNITS units; without the memory, pass_quantized() */
  float *floats = quantized && many ? malloc((size_t)(3 * UNITS * hidden) * sizeof(float)) : NULL;
  for (int64_t unit = part * call->units_per_item; unit < last; unit += UNITS) {
    const float *fc1 = quantized ? floats : call->fc1 + (expert * 2 * call->inter + 2 * unit) * hidden;
    const float *fc2 = quantized ? (floats ? floats + 2 * UNITS * hidden : NULL) : call->fc2 + (expert * call->inter + unit) * hidden;
    if (many && (!quantized || floats)) {
      if (quantized) dequantize(call, expert, unit, floats);
      for (int64_t route = first; route < end; route += GROUP_TOKENS) {
        int64_t count = end - route < GROUP_TOKENS ? end - route : GROUP_TOKENS;
        const float *xs[GROUP_TOKENS];
        float *partials[GROUP_TOKENS];
        route_rows(call, part, route, count, xs, partials);
        group_pass(call, fc1, fc2, xs, call->route_weight + route, count, partials, end - first < PROMPT_ROUTES);
      }
      continue;
    }
    for (int64_t route = first; route < end; route += MAX_TOKENS) {
      int64_t count = end - route < MAX_TOKENS ? end - route : MAX_TOKENS;
      const float *xs[MAX_TOKENS];
      float *partials[MAX_TOKENS];
      route_rows(call, part, route, count, xs, partials);
      const float *weights = call->route_weight + route;
      switch (count * 2 + quantized) { /* constants for the inlined loops */
        case 2: pass(call, fc1, fc2, xs, weights, 1, partials); break;
        case 4: pass(call, fc1, fc2, xs, weights, 2, partials); break;
        case 6: pass(call, fc1, fc2, xs, weights, 3, partials); break;
        case 8: pass(call, fc1, fc2, xs, weights, 4, partials); break;
        case 3: pass_quantized(call, expert, unit, xs, weights, 1, partials); break;
        case 5: pass_quantized(call, expert, unit, xs, weights, 2, partials); break;
        case 7: pass_quantized(call, expert, unit, xs, weights, 3, partials); break;
        default: pass_quantized(call, expert, unit, xs, weights, 4, partials); break;
      }
    }
  }
  free(floats);
}

/* Second phase, one work item: HIDDEN_PER_SUM outputs of one token, the sum of its routes' partials (in a
   fixed order, so a token's output does not depend on the threads). */
static void sum(void *data, size_t item) {
  const Call *call = data;
  int64_t blocks = (call->hidden + HIDDEN_PER_SUM - 1) / HIDDEN_PER_SUM, hidden = call->hidden, routes = call->tokens * call->k;
  int64_t token = (int64_t)item / blocks, first = (int64_t)item % blocks * HIDDEN_PER_SUM;
  int64_t last = first + HIDDEN_PER_SUM < hidden ? first + HIDDEN_PER_SUM : hidden;
  for (int64_t h = first; h < last; h += LANES) {
    vector out = {0};
    for (int64_t j = 0; j < call->k; ++j) {
      int64_t route = call->token_routes[token * call->k + j];
      if (route < 0) continue;
      for (int64_t part = 0; part < call->items_per_expert; ++part) out += load(call->partial + (part * routes + route) * hidden + h);
    }
    store(call->out + token * hidden + h, out);
  }
}

/* Each token's k experts and weights, grouped by expert into the call's route arrays (`chosen` is scratch for
   routes + E integers, `weights` for routes floats, `probabilities` for E). */
static void route(Call *call, const float *logits, int64_t experts, int64_t *chosen, float *weights, float *probabilities) {
  int64_t k = call->k, routes = call->tokens * k;
  memset(call->first, 0, (experts + 1) * sizeof(int64_t));
  for (int64_t token = 0; token < call->tokens; ++token) {
    const float *row = logits + token * experts;
    float top = row[0], sum = 0.f;
    for (int64_t e = 1; e < experts; ++e) top = row[e] > top ? row[e] : top;
    for (int64_t e = 0; e < experts; ++e) sum += probabilities[e] = expf(row[e] - top);
    for (int64_t e = 0; e < experts; ++e) probabilities[e] /= sum;
    int64_t *mine = chosen + token * k;
    float *weight = weights + token * k, chosen_sum = 0.f;
    for (int64_t j = 0; j < k; ++j) { /* k passes: k is small */
      int64_t best = 0;
      for (int64_t e = 1; e < experts; ++e) best = probabilities[e] >= probabilities[best] ? e : best;
      mine[j] = best;
      chosen_sum += weight[j] = call->mixing ? call->mixing[token * experts + best] : probabilities[best];
      probabilities[best] = -1.f; /* taken */
    }
    for (int64_t j = 0; j < k; ++j) {
      if (call->kernel->normalize) weight[j] /= chosen_sum;
      if (weight[j] > 0.f) /* decided once (a NaN weight is skipped): fast-math may not keep both tests alike */
        ++call->first[mine[j] + 1];
      else
        mine[j] = -1;
    }
  }
  call->active_count = 0;
  for (int64_t e = 0; e < experts; ++e) {
    if (call->first[e + 1]) call->active[call->active_count++] = e;
    call->first[e + 1] += call->first[e];
  }
  int64_t *next = chosen + routes; /* each expert's next free route */
  memcpy(next, call->first, experts * sizeof(int64_t));
  for (int64_t i = 0; i < routes; ++i) {
    if (chosen[i] < 0) {
      call->token_routes[i] = -1;
      continue;
    }
    int64_t slot = next[chosen[i]]++;
    call->token_routes[i] = slot;
    call->route_token[slot] = i / k;
    call->route_weight[slot] = weights[i];
  }
}

/* The tokens' hidden size, count and experts, from the input and router logits both ops take; NULL if they fit. */
static OrtStatus *check_tokens(const Tensor *in, int64_t *hidden, int64_t *tokens, int64_t *experts, const Kernel *kernel) {
  if (in[INPUT].rank < 2 || in[INPUT].rank > 3) return fail("moecc.MoE: the input must be [tokens, H] or [B, S, H]");
  *hidden = in[INPUT].shape[in[INPUT].rank - 1];
  *tokens = elements(&in[INPUT]) / (*hidden ? *hidden : 1);
  if (!shaped(&in[ROUTER], 2, *tokens, -1, -1)) return fail("moecc.MoE: the router logits must be [tokens, E]");
  *experts = in[ROUTER].shape[1];
  if (kernel->k > *experts) return fail("moecc.MoE: k is larger than the number of experts");
  return NULL;
}

/* The routed tokens' outputs `out` [tokens, H] once the weights are checked (in `call`): each chunk of tokens
   routed by its rows of `logits` [tokens, E], then the two phases. */
static OrtStatus *mix(const Kernel *kernel, OrtKernelContext *context, const float *x, const float *logits, int64_t tokens, int64_t experts, Call call, float *out) {
  int64_t hidden = call.hidden, inter = call.inter;
  if (hidden <= 0 || inter <= 0 || hidden % 16 || inter % UNITS) return fail("moecc kernels: experts' H and I must be positive multiples of 16");
  if (!tokens) return NULL;
  /* Long prompts go in chunks of CHUNK tokens, so that the partial sums stay within tens of megabytes (each
     chunk reads the chosen experts again, but then every expert has many of the chunk's tokens to share it). */
  int64_t chunk = tokens < CHUNK ? tokens : CHUNK, routes = chunk * kernel->k;
  /* one allocation: integers (active E, first E + 1, chosen and its scratch routes + E, route_token routes,
     token_routes routes), then floats (route_weight and weights 2 routes, probabilities E) */
  size_t integers = (size_t)(3 * experts + 1 + 3 * routes), floats = (size_t)(2 * routes + experts);
  void *scratch = malloc(integers * sizeof(int64_t) + floats * sizeof(float));
  if (!scratch) return ort->CreateStatus(ORT_FAIL, "moecc.MoE: out of memory");
  call.active = scratch;
  call.first = call.active + experts;
  int64_t *chosen = call.first + experts + 1;
  call.route_token = chosen + routes + experts;
  call.token_routes = call.route_token + routes;
  call.route_weight = (float *)(call.token_routes + routes);
  float *weights = call.route_weight + routes, *probabilities = weights + routes;
  OrtStatus *status = NULL;
  for (int64_t start = 0; start < tokens && !status; start += chunk) {
    call.tokens = tokens - start < chunk ? tokens - start : chunk;
    call.x = x + start * hidden;
    call.out = out + start * hidden;
    route(&call, logits + start * experts, experts, chosen, weights, probabilities);
    if (call.mixing) call.mixing += call.tokens * experts; /* the next chunk's rows */
    int64_t blocks = inter / UNITS, wanted = (TARGET_ITEMS + kernel->k - 1) / kernel->k;
    int64_t blocks_per_item = wanted >= blocks ? 1 : (blocks + wanted - 1) / wanted;
    call.units_per_item = blocks_per_item * UNITS;
    call.items_per_expert = (blocks + blocks_per_item - 1) / blocks_per_item;
    call.partial = malloc((size_t)(call.items_per_expert * call.tokens * kernel->k * hidden) * sizeof(float));
    if (!call.partial) {
      status = ort->CreateStatus(ORT_FAIL, "moecc.MoE: out of memory");
      break;
    }
    status = for_each_item(context, expert, (size_t)(call.active_count * call.items_per_expert), &call);
    int64_t sums = (hidden + HIDDEN_PER_SUM - 1) / HIDDEN_PER_SUM;
    if (!status) status = for_each_item(context, sum, (size_t)(call.tokens * sums), &call);
    free(call.partial);
  }
  free(scratch);
  return status;
}

/* Both ops' call once its weights are checked (in `call`), into their output. */
static OrtStatus *run(const Kernel *kernel, OrtKernelContext *context, const Tensor *in, int64_t tokens, int64_t experts, Call call) {
  Tensor out;
  CHECK(output(context, 0, in[INPUT].shape, in[INPUT].rank, &out));
  return mix(kernel, context, in[INPUT].data, in[ROUTER].data, tokens, experts, call, out.data);
}

OrtStatus *experts_run(OrtKernelContext *context, const ExpertMix *kernel, const float *x, const float *logits, int64_t tokens, int64_t experts,
                       int64_t hidden, int64_t inter, const float *fc1, const float *fc2, float *out) {
  return mix(kernel, context, x, logits, tokens, experts, (Call){.hidden = hidden, .inter = inter, .k = kernel->k, .kernel = kernel, .fc1 = fc1, .fc2 = fc2}, out);
}

static OrtStatus *ORT_API_CALL compute(void *state, OrtKernelContext *context) {
  const Kernel *kernel = state;
  Tensor in[INPUT_COUNT];
  for (size_t i = 0; i < INPUT_COUNT; ++i) CHECK(input(context, i, &in[i]));
  int64_t hidden = 0, tokens = 0, experts = 0;
  CHECK(check_tokens(in, &hidden, &tokens, &experts, kernel));
  if (!shaped(&in[FC1], 3, experts, -1, hidden) || in[FC1].shape[1] % 2) return fail("moecc.MoE: fc1 must be [E, 2I, H]");
  int64_t inter = in[FC1].shape[1] / 2;
  if (!shaped(&in[FC2], 3, experts, inter, hidden)) return fail("moecc.MoE: fc2 must be transposed, [E, I, H]");
  return run(kernel, context, in, tokens, experts, (Call){.hidden = hidden, .inter = inter, .k = kernel->k, .kernel = kernel, .fc1 = in[FC1].data, .fc2 = in[FC2].data});
}

static OrtStatus *ORT_API_CALL compute_quantized(void *state, OrtKernelContext *context) {
  const Kernel *kernel = state;
  Tensor in[QUANTIZED_INPUT_COUNT] = {0};
  size_t given;
  CHECK(ort->KernelContext_GetInputCount(context, &given));
  for (size_t i = 0; i < QUANTIZED_INPUT_COUNT && i < given; ++i) CHECK(input(context, i, &in[i]));
  int64_t hidden = 0, tokens = 0, experts = 0;
  CHECK(check_tokens(in, &hidden, &tokens, &experts, kernel));
  if (!shaped(&in[FC1_LEVELS], 3, experts, -1, hidden) || in[FC1_LEVELS].shape[1] % 2) return fail("moecc.QMoE: fc1's levels must be [E, 2I, H]");
  int64_t inter = in[FC1_LEVELS].shape[1] / 2;
  if (!shaped(&in[FC2_LEVELS], 3, experts, inter, hidden)) return fail("moecc.QMoE: fc2's levels must be transposed, [E, I, H]");
  int64_t blocks1 = in[FC1_SCALES].rank == 3 ? in[FC1_SCALES].shape[2] : 0, blocks2 = in[FC2_SCALES].rank == 3 ? in[FC2_SCALES].shape[1] : 0;
  if (!shaped(&in[FC1_SCALES], 3, experts, 2 * inter, -1) || blocks1 <= 0 || hidden % blocks1 || hidden / blocks1 % 16)
    return fail("moecc.QMoE: fc1's scales must be [E, 2I, H / B1], B1 a multiple of 16");
  if (!shaped(&in[FC2_SCALES], 3, experts, -1, hidden) || blocks2 <= 0 || inter % blocks2 || inter / blocks2 % UNITS)
    return fail("moecc.QMoE: fc2's scales must be transposed, [E, I / B2, H], B2 a multiple of 16");
  if (in[MIXING].value && !shaped(&in[MIXING], 2, tokens, experts, -1)) return fail("moecc.QMoE: the mixing weights must be [tokens, E]");
  return run(kernel, context, in, tokens, experts,
             (Call){.hidden = hidden, .inter = inter, .k = kernel->k, .kernel = kernel, .fc1 = in[FC1_SCALES].data, .fc2 = in[FC2_SCALES].data,
                    .fc1_levels = in[FC1_LEVELS].data, .fc2_levels = in[FC2_LEVELS].data, .block1 = hidden / blocks1, .block2 = inter / blocks2,
                    .mixing = in[MIXING].value ? in[MIXING].data : NULL});
}

OrtStatus *read_expert_mix(const OrtKernelInfo *info, const char *message, ExpertMix *mix) {
  *mix = (ExpertMix){.k = int_attribute(info, "k", 0)};
  if (mix->k <= 0) return fail(message);
  mix->normalize = int_attribute(info, "normalize_routing_weights", 0) == 1; /* as ONNX Runtime's */
  mix->alpha = float_attribute(info, "activation_alpha", 1.f, NULL);
  mix->beta = float_attribute(info, "activation_beta", 0.f, NULL);
  mix->limit = float_attribute(info, "swiglu_limit", 0.f, &mix->limited);
  mix->limited = mix->limited && mix->limit < 3.4e38f; /* ONNX Runtime's default is no limit */
  return NULL;
}

static OrtStatus *ORT_API_CALL create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **state) {
  (void)op, (void)api;
  Kernel *kernel = calloc(1, sizeof(Kernel));
  if (!kernel) return ort->CreateStatus(ORT_FAIL, "moecc.MoE: out of memory");
  OrtStatus *status = read_expert_mix(info, "moecc.MoE: k must be positive", kernel);
  if (status) {
    free(kernel);
    return status;
  }
  *state = kernel;
  return NULL;
}

static OrtStatus *ORT_API_CALL create_quantized(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **state) {
  int64_t bits = int_attribute(info, "expert_weight_bits", 0);
  if (bits != 4 && bits != 8) return fail("moecc.QMoE: expert_weight_bits must be 4 or 8");
  CHECK(create(op, api, info, state));
  ((Kernel *)*state)->offset = bits == 4 ? 8.f : 128.f;
  return NULL;
}

static const char *ORT_API_CALL name(const OrtCustomOp *op) { (void)op; return "MoE"; }
static size_t ORT_API_CALL input_count(const OrtCustomOp *op) { (void)op; return INPUT_COUNT; }

static const char *ORT_API_CALL quantized_name(const OrtCustomOp *op) { (void)op; return "QMoE"; }
static size_t ORT_API_CALL quantized_input_count(const OrtCustomOp *op) { (void)op; return QUANTIZED_INPUT_COUNT; }
static ONNXTensorElementDataType ORT_API_CALL quantized_input_type(const OrtCustomOp *op, size_t index) {
  (void)op;
  return index == FC1_LEVELS || index == FC2_LEVELS ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

static OrtCustomOpInputOutputCharacteristic ORT_API_CALL quantized_input_characteristic(const OrtCustomOp *op, size_t index) {
  (void)op;
  return index == MIXING ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}

static const OrtCustomOp moe_op = {
    .version = ORT_API_VERSION, .GetName = name, .GetExecutionProviderType = cpu_provider, .GetInputType = float_type,
    .GetInputTypeCount = input_count, .GetOutputType = float_type, .GetOutputTypeCount = one_output, .KernelDestroy = free_state,
    .GetInputCharacteristic = required, .GetOutputCharacteristic = required, .GetInputMemoryType = cpu_memory,
    .CreateKernelV2 = create, .KernelComputeV2 = compute,
};

static const OrtCustomOp quantized_moe_op = {
    .version = ORT_API_VERSION, .GetName = quantized_name, .GetExecutionProviderType = cpu_provider, .GetInputType = quantized_input_type,
    .GetInputTypeCount = quantized_input_count, .GetOutputType = float_type, .GetOutputTypeCount = one_output, .KernelDestroy = free_state,
    .GetInputCharacteristic = quantized_input_characteristic, .GetOutputCharacteristic = required, .GetInputMemoryType = cpu_memory,
    .CreateKernelV2 = create_quantized, .KernelComputeV2 = compute_quantized,
};

OrtStatus *add_moe_ops(OrtCustomOpDomain *domain) {
  CHECK(ort->CustomOpDomain_Add(domain, &moe_op));
  return ort->CustomOpDomain_Add(domain, &quantized_moe_op);
}
