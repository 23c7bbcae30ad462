/* An LD_PRELOAD shim for llama.cpp's tests/test-backend-ops in tools/bench_linear.py: that
 * program gives the CPU backend hardware_concurrency() / 2 threads, and libstdc++ takes
 * hardware_concurrency() from glibc's get_nprocs(). This get_nprocs() returns
 * DQGEN_BENCH_NPROCS (twice the threads wanted), so the CPU backend runs the thread count
 * that dqgen's side of the comparison runs. Without the variable it returns 2 (one thread).
 */
#include <stdlib.h>

int get_nprocs(void)
{
    const char *value = getenv("DQGEN_BENCH_NPROCS");
    const int n = value ? atoi(value) : 0;
    return n > 0 ? n : 2;
}
