/* The bandwidth baseline of tools/bench.py: a copy-like stream that reads an int8 array
 * once and writes an output of the float dtype's width once, with the least work that
 * makes every output depend on its input (a widening conversion).
 *
 * Built with the same compiler and flags as dqgen's kernels (-O3, -march for the ISA,
 * -fopenmp, never fast-math) and split over OpenMP threads the way dqgen's kernels are
 * (one contiguous chunk a thread, static). The outputs go to caller-owned memory through
 * an external entry point, so the compiler cannot drop the loads or the stores.
 *
 * Two store kinds: plain stores (the stream the targets compare against) and
 * non-temporal stores (what streaming the output past the cache can reach). And, for
 * f16/bf16 outputs, the conversion floor (floor_i8, below).
 */
#include <stdint.h>
#include <omp.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define CHUNK_ALIGN 64 /* elements: chunk borders on cache lines for every width */

/* Plain loops: gcc -O3 vectorizes each (widen, convert, store). */
static void plain_w2(const int8_t *restrict q, int16_t *restrict y, int64_t b, int64_t e)
{
    for (int64_t i = b; i < e; ++i)
        y[i] = (int16_t)q[i];
}

static void plain_w4(const int8_t *restrict q, float *restrict y, int64_t b, int64_t e)
{
    for (int64_t i = b; i < e; ++i)
        y[i] = (float)q[i];
}

static void plain_w8(const int8_t *restrict q, double *restrict y, int64_t b, int64_t e)
{
    for (int64_t i = b; i < e; ++i)
        y[i] = (double)q[i];
}

#if defined(__AVX2__)
/* Non-temporal: scalar head up to a 32-byte aligned output, streamed body, scalar tail. */
static void nt_w2(const int8_t *restrict q, int16_t *restrict y, int64_t b, int64_t e)
{
    int64_t i = b;
    for (; i < e && ((uintptr_t)(y + i) & 31u); ++i)
        y[i] = (int16_t)q[i];
    for (; i + 16 <= e; i += 16) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(q + i));
        _mm256_stream_si256((__m256i *)(y + i), _mm256_cvtepi8_epi16(v));
    }
    for (; i < e; ++i)
        y[i] = (int16_t)q[i];
}

static void nt_w4(const int8_t *restrict q, float *restrict y, int64_t b, int64_t e)
{
    int64_t i = b;
    for (; i < e && ((uintptr_t)(y + i) & 31u); ++i)
        y[i] = (float)q[i];
    for (; i + 8 <= e; i += 8) {
        const __m128i v = _mm_loadl_epi64((const __m128i *)(q + i));
        _mm256_stream_ps(y + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)));
    }
    for (; i < e; ++i)
        y[i] = (float)q[i];
}

static void nt_w8(const int8_t *restrict q, double *restrict y, int64_t b, int64_t e)
{
    int64_t i = b;
    for (; i < e && ((uintptr_t)(y + i) & 31u); ++i)
        y[i] = (double)q[i];
    for (; i + 4 <= e; i += 4) {
        int32_t four;
        __builtin_memcpy(&four, q + i, sizeof four);
        const __m128i v = _mm_cvtepi8_epi32(_mm_cvtsi32_si128(four));
        _mm256_stream_pd(y + i, _mm256_cvtepi32_pd(v));
    }
    for (; i < e; ++i)
        y[i] = (double)q[i];
}
#define NT_AVAILABLE 1
#else
#define nt_w2 plain_w2
#define nt_w4 plain_w4
#define nt_w8 plain_w8
#define NT_AVAILABLE 0
#endif

static void run_range(const int8_t *q, void *y, int64_t b, int64_t e, int32_t width, int32_t nt)
{
    switch (width * 2 + (nt != 0)) {
    case 4: plain_w2(q, (int16_t *)y, b, e); break;
    case 5: nt_w2(q, (int16_t *)y, b, e); break;
    case 8: plain_w4(q, (float *)y, b, e); break;
    case 9: nt_w4(q, (float *)y, b, e); break;
    case 16: plain_w8(q, (double *)y, b, e); break;
    case 17: nt_w8(q, (double *)y, b, e); break;
    default: break;
    }
#if defined(__AVX2__)
    if (nt)
        _mm_sfence(); /* each thread orders its own streamed stores before the join */
#endif
}

/* The conversion floor: y[i] = F((float)q[i]) for a 16-bit float F, rounded to
 * nearest-even exactly as dqgen's kernels round (F16C for f16; integer rounding on the
 * bits for bf16, which AVX2 has no instruction for), with plain stores. No scale, no
 * zero point: the least work any bit-exact int8 -> f16/bf16 kernel does per element on
 * this ISA, so dqgen / floor is what the scale and zero point cost, and floor / stream
 * what the conversion alone costs beyond moving the bytes. Each ISA level's floor uses
 * the conversions dqgen's kernels use there. */
#if defined(__AVX512FP16__) && defined(__AVX512BF16__)
/* AVX-512 with AVX512-FP16 and AVX512_BF16 (the avx512_fp16 level): what dqgen's kernels
 * there use. q converts exactly to f16 from 16-bit lanes (|q| <= 255), thirty-two a step;
 * for bf16, two float vectors narrow in one vcvtne2ps2bf16 (rounding to nearest-even; q
 * is never subnormal, so its flushing does not matter). */
static void floor_f16(const int8_t *restrict q, uint16_t *restrict y, int64_t b, int64_t e)
{
    int64_t i = b;
    for (; i + 32 <= e; i += 32) {
        const __m512h v = _mm512_cvtepi16_ph(_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(q + i))));
        _mm512_storeu_si512((void *)(y + i), _mm512_castph_si512(v));
    }
    for (; i < e; ++i)
        y[i] = (uint16_t)_cvtss_sh((float)q[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

static void floor_bf16(const int8_t *restrict q, uint16_t *restrict y, int64_t b, int64_t e)
{
    int64_t i = b;
    for (; i + 32 <= e; i += 32) {
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i))));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i + 16))));
        _mm512_storeu_si512((void *)(y + i), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    for (; i < e; ++i) {
        const float f = (float)q[i];
        uint32_t u;
        __builtin_memcpy(&u, &f, sizeof u);
        y[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}
#define FLOOR_AVAILABLE 1
#elif defined(__AVX2__) && defined(__F16C__)
static void floor_f16(const int8_t *restrict q, uint16_t *restrict y, int64_t b, int64_t e)
{
    int64_t i = b;
    for (; i + 8 <= e; i += 8) {
        const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + i))));
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i < e; ++i)
        y[i] = (uint16_t)_cvtss_sh((float)q[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/* The bf16 kernels' sixteen-lane step: even and odd elements split out of the widened
 * 16-bit vector, rounded in 16-bit lanes (see store16_bf16 in templates/c/kernel.c.j2). */
static void floor_bf16(const int8_t *restrict q, uint16_t *restrict y, int64_t b, int64_t e)
{
    int64_t i = b;
    for (; i + 16 <= e; i += 16) {
        const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + i)));
        const __m256i even = _mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_madd_epi16(w, _mm256_set1_epi32(1))));
        const __m256i odd = _mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_srai_epi32(w, 16)));
        const __m256i high = _mm256_blend_epi16(_mm256_srli_epi32(even, 16), odd, 0xaa);
        const __m256i low = _mm256_blend_epi16(even, _mm256_slli_epi32(odd, 16), 0xaa);
        const __m256i bias = _mm256_or_si256(_mm256_and_si256(high, _mm256_set1_epi16(1)), _mm256_set1_epi16(0x7ffe));
        _mm256_storeu_si256((__m256i *)(y + i), _mm256_add_epi16(high, _mm256_srli_epi16(_mm256_avg_epu16(low, bias), 15)));
    }
    for (; i < e; ++i) {
        const float f = (float)q[i];
        uint32_t u;
        __builtin_memcpy(&u, &f, sizeof u);
        y[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}
#define FLOOR_AVAILABLE 1
#else
static void floor_f16(const int8_t *restrict q, uint16_t *restrict y, int64_t b, int64_t e)
{
    (void)q; (void)y; (void)b; (void)e;
}
#define floor_bf16 floor_f16
#define FLOOR_AVAILABLE 0
#endif

/* 1 when the conversion floor is compiled in (AVX2 with F16C), else 0. */
int32_t stream_floor_available(void)
{
    return FLOOR_AVAILABLE;
}

/* y[i] = F((float)q[i]) for i < n, F = f16 (kind 0) or bf16 (kind 1); split over threads
 * like stream_i8. Returns 0, or -1 for an unknown kind or no floor compiled in. */
int32_t floor_i8(const int8_t *q, uint16_t *y, int64_t n, int32_t kind, int32_t num_threads,
                 int64_t parallel_min)
{
    if ((kind != 0 && kind != 1) || !FLOOR_AVAILABLE)
        return -1;
    if (n <= 0)
        return 0;
    if (num_threads > 1 && n >= parallel_min) {
#pragma omp parallel num_threads(num_threads)
        {
            const int64_t nth = omp_get_num_threads();
            int64_t chunk = (n + nth - 1) / nth;
            chunk = (chunk + CHUNK_ALIGN - 1) / CHUNK_ALIGN * CHUNK_ALIGN;
            const int64_t b = chunk * omp_get_thread_num();
            const int64_t e = b + chunk < n ? b + chunk : n;
            if (b < e)
                (kind ? floor_bf16 : floor_f16)(q, y, b, e);
        }
    } else {
        (kind ? floor_bf16 : floor_f16)(q, y, 0, n);
    }
    return 0;
}

/* 1 when non-temporal stores are compiled in (AVX2), else 0 (nt falls back to plain). */
int32_t stream_nt_available(void)
{
    return NT_AVAILABLE;
}

/* y[i] = widen(q[i]) for i < n; y has `width` (2, 4 or 8) bytes an element. Returns 0,
 * or -1 for an unknown width. `nontemporal` picks the store kind; `num_threads` > 1 and
 * n >= parallel_min split the range over that many OpenMP threads. */
int32_t stream_i8(const int8_t *q, void *y, int64_t n, int32_t width, int32_t nontemporal,
                  int32_t num_threads, int64_t parallel_min)
{
    if (width != 2 && width != 4 && width != 8)
        return -1;
    if (n <= 0)
        return 0;
    if (num_threads > 1 && n >= parallel_min) {
#pragma omp parallel num_threads(num_threads)
        {
            const int64_t nth = omp_get_num_threads();
            int64_t chunk = (n + nth - 1) / nth;
            chunk = (chunk + CHUNK_ALIGN - 1) / CHUNK_ALIGN * CHUNK_ALIGN;
            const int64_t b = chunk * omp_get_thread_num();
            const int64_t e = b + chunk < n ? b + chunk : n;
            if (b < e)
                run_range(q, y, b, e, width, nontemporal);
        }
    } else {
        run_range(q, y, 0, n, width, nontemporal);
    }
    return 0;
}
