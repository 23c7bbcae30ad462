/* The read-only bandwidth baseline of tools/bench_linear.py: read a buffer of the weight's
 * size once, as a matrix-vector product reads its weight, with the least work that makes
 * every byte count (a sum of 64-bit words in eight independent accumulators, which gcc
 * -O3 keeps in vector registers). Nothing is written but the one sum returned.
 *
 * Built with dqgen's compiler and flags (-O3, -march for the ISA, -fopenmp, no fast-math)
 * and split over OpenMP threads as dqgen's kernels split rows (one contiguous run of
 * cache lines a thread, static).
 */
#include <stdint.h>
#include <omp.h>

#define LINE_WORDS 8 /* 64-bit words a 64-byte cache line */

static uint64_t sum_words(const uint64_t *restrict w, int64_t b, int64_t e)
{
    uint64_t acc[LINE_WORDS] = {0};
    int64_t i = b;
    for (; i + LINE_WORDS <= e; i += LINE_WORDS)
        for (int j = 0; j < LINE_WORDS; ++j)
            acc[j] += w[i + j];
    for (; i < e; ++i)
        acc[0] += w[i];
    uint64_t total = 0;
    for (int j = 0; j < LINE_WORDS; ++j)
        total += acc[j];
    return total;
}

/* The sum of the ``bytes / 8`` 64-bit words at ``data`` (the tail bytes added one by one),
 * read by ``num_threads`` threads (0: OpenMP's default). */
uint64_t stream_read(const void *data, int64_t bytes, int32_t num_threads)
{
    const uint64_t *w = (const uint64_t *)data;
    const int64_t words = bytes / 8;
    const int64_t lines = (words + LINE_WORDS - 1) / LINE_WORDS;
    uint64_t total = 0;
    if (num_threads <= 0)
        num_threads = omp_get_max_threads();
#pragma omp parallel num_threads(num_threads) reduction(+ : total)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t b = lines * t / nt * LINE_WORDS, e = lines * (t + 1) / nt * LINE_WORDS;
        if (e > words)
            e = words;
        if (b < e)
            total += sum_words(w, b, e);
    }
    for (int64_t i = words * 8; i < bytes; ++i)
        total += ((const uint8_t *)data)[i];
    return total;
}
