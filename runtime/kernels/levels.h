/* Bytes as floats, for the kernels that read 8-bit levels as floats (moe.c's quantized experts);
   the includer defines LANES and its float `vector` of LANES lanes. */
#ifndef MOECC_LEVELS_H
#define MOECC_LEVELS_H

#include <stdint.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* LANES levels (bytes) as floats. By intrinsics where the machine has them: GCC (12) turns a vector-extension
   conversion from bytes into one lane at a time. */
static inline vector levels_at(const uint8_t *levels) {
#if defined(__AVX512F__)
  return (vector)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)levels)));
#elif defined(__AVX2__)
  return (vector)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)levels)));
#else
  vector out;
  for (int lane = 0; lane < LANES; ++lane) out[lane] = levels[lane];
  return out;
#endif
}

#endif
