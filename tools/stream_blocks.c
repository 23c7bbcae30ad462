/* The bandwidth baseline of the GGML rows of tools/bench_formats.py: read the same block
 * bytes a dequantize reads and write the same output bytes, with the least work that
 * makes the outputs depend on the inputs. Blocks go GROUP at a time: the group's bytes
 * are XOR-reduced (one vectorized read loop), and the group's outputs all get that value
 * (one vectorized store loop, plain stores, as dqgen's kernels).
 *
 * Built with dqgen's compiler and flags (-O3, -march for the ISA, -fopenmp) and split
 * over OpenMP threads as dqgen's kernels are (one contiguous run of blocks a thread).
 */
#include <stdint.h>
#include <omp.h>

#define GROUP 64 /* blocks a step */

static uint32_t reduce(const uint8_t *restrict p, int64_t n)
{
    uint8_t acc = 0;
    for (int64_t i = 0; i < n; ++i)
        acc ^= p[i];
    return acc;
}

static void run(const uint8_t *restrict data, void *restrict y, int64_t b, int64_t e,
                int64_t bb, int64_t bv, int32_t width)
{
    for (int64_t g = b; g < e; g += GROUP) {
        const int64_t n = e - g < GROUP ? e - g : GROUP;
        const uint32_t x = reduce(data + g * bb, n * bb);
        if (width == 4) {
            float *restrict out = (float *)y + g * bv;
            const float v = (float)x;
            for (int64_t i = 0; i < n * bv; ++i)
                out[i] = v;
        } else {
            uint16_t *restrict out = (uint16_t *)y + g * bv;
            for (int64_t i = 0; i < n * bv; ++i)
                out[i] = (uint16_t)x;
        }
    }
}

/* blocks blocks of bb bytes at data -> blocks * bv outputs of width bytes (2 or 4). */
int32_t stream_blocks(const void *data, void *y, int64_t blocks, int64_t bb, int64_t bv,
                      int32_t width, int32_t num_threads)
{
    if (width != 2 && width != 4)
        return -1;
#pragma omp parallel num_threads(num_threads > 0 ? num_threads : 1)
    {
        const int64_t nt = omp_get_num_threads();
        const int64_t chunk = (blocks + nt - 1) / nt;
        const int64_t b = chunk * omp_get_thread_num();
        const int64_t e = b + chunk < blocks ? b + chunk : blocks;
        if (b < e)
            run((const uint8_t *)data, y, b, e, bb, bv, width);
    }
    return 0;
}
