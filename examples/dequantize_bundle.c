/* Dequantize a buffer with a prebuilt dqgen kernel, from C, without Python.
 *
 * The kernel comes from a bundle written by `dqgen aot` (see README.md beside this
 * file): its header, dqgen_kernels.h, declares the entry point and its shared object
 * c-<isa>/dequant_pg_s8_f32_g128.so defines it.
 *
 * The program fills a 3 x 512 s8 weight with 4 groups of 128 a row, dequantizes it to
 * f32 and checks every value bit for bit against y = (float)(q - zero_point) * scale,
 * which is the kernel's formula for f32 (exact integer difference, one rounding).
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "dqgen_kernels.h"

enum { ROWS = 3, COLS = 512, GROUP_SIZE = 128, GROUPS = COLS / GROUP_SIZE };

int main(void)
{
    static int8_t q[ROWS * COLS];
    static float scale[ROWS * GROUPS];
    static int32_t zero_point[ROWS * GROUPS];
    static float y[ROWS * COLS];

    for (int i = 0; i < ROWS * COLS; ++i)
        q[i] = (int8_t)((i * 37) % 256 - 128);
    for (int g = 0; g < ROWS * GROUPS; ++g) {
        scale[g] = (g % 2) ? 0.1f * (float)(g + 1) : 0.5f + 0.25f * (float)g;
        zero_point[g] = g % 5 - 2;
    }

    /* outer = ROWS, axis = COLS; 0 threads asks for OpenMP's default. */
    dqgen_dequant_pg_s8_f32_g128(q, scale, zero_point, y, ROWS, COLS, 0);

    int mismatches = 0;
    for (int i = 0; i < ROWS * COLS; ++i) {
        const int g = (i / COLS) * GROUPS + (i % COLS) / GROUP_SIZE;
        const float expected = (float)(q[i] - zero_point[g]) * scale[g];
        if (memcmp(&expected, &y[i], sizeof expected) != 0) {
            if (mismatches++ < 5)
                fprintf(stderr, "mismatch at %d: got %.9g, expected %.9g\n", i, y[i], expected);
        }
    }
    /* Two values worked out by hand: q[0] = -128, zero_point[0] = -2, scale[0] = 0.5, so
     * y[0] = -126 * 0.5; q[128] = (128 * 37) % 256 - 128 = 0, zero_point[1] = -1 and
     * scale[1] = 0.1f * 2, so y[128] = 1 * 0.2f. */
    const int hand_ok = y[0] == -63.0f && y[128] == 0.2f;
    if (mismatches || !hand_ok) {
        fprintf(stderr, "FAILED: %d mismatches, hand-checked values %s\n", mismatches,
                hand_ok ? "ok" : "wrong");
        return 1;
    }
    printf("ok: %d values dequantized bit-exactly (y[0] = %g, y[128] = %.9g, y[%d] = %.9g)\n",
           ROWS * COLS, y[0], y[128], ROWS * COLS - 1, y[ROWS * COLS - 1]);
    return 0;
}
