// Host emulation of the CUDA device dialect used by dqgen's kernels.
//
// Lets a .cu kernel text compile with g++ as C++17 and run on the CPU (see emu.py): the
// blocks one after the other, a block's threads each on a host thread of its own, so the
// warp shuffles meet as they do on a device and CUDA kernels can be checked bit for bit on
// machines without a GPU. Every conversion here rounds exactly as the CUDA intrinsic of
// the same name: round-to-nearest-even, subnormals kept, NaN and infinities preserved. Build with
// -ffp-contract=off so that a*b+c is never fused (nvrtc runs with --fmad=false).
// Not emulated: block barriers (__syncthreads aborts), atomics, warp votes.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <pthread.h>
#include <type_traits>
#include <stdint.h>

// ---- qualifiers -------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __shared__ static
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// __restrict__ is native in g++.

// ---- thread geometry --------------------------------------------------------------
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int a = 1, unsigned int b = 1, unsigned int c = 1) : x(a), y(b), z(c) {}
};
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

[[noreturn]] inline void __syncthreads() {
  std::fprintf(stderr, "cuda_emu: __syncthreads is not supported\n");
  std::abort();
}

// ---- warps: the lanes of a mask meet at each shuffle ----------------------------------
// (pthreads, not <thread>: the emulation compiles once a kernel, and these headers are light)
struct __emu_meeting {
  unsigned mask = 0;   // 0: free
  unsigned arrived = 0;
  unsigned long long generation = 0;
};
struct __emu_warp {
  pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
  pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
  __emu_meeting meetings[4];   // one a mask in use: half-warps meet apart
  unsigned long long slot[32];
};
inline __emu_warp* __emu_all_warps = nullptr;               // every block's warps
inline thread_local __emu_warp* __emu_block_warps = nullptr;  // the running block's

// Returns once every one of ``count`` threads has called it with ``mask`` (as often).
inline void __emu_meet(__emu_warp& w, unsigned mask, unsigned count) {
  pthread_mutex_lock(&w.mu);
  __emu_meeting* m = nullptr;
  for (__emu_meeting& c : w.meetings)
    if (c.mask == mask) { m = &c; break; }
  for (__emu_meeting& c : w.meetings)
    if (!m && c.mask == 0) { m = &c; c.mask = mask; }
  if (!m) {
    std::fprintf(stderr, "cuda_emu: more than 4 shuffle masks in one warp\n");
    std::abort();
  }
  const unsigned long long gen = m->generation;
  if (++m->arrived == count) {
    m->arrived = 0;
    ++m->generation;
    pthread_cond_broadcast(&w.cv);
  } else {
    while (m->generation == gen)
      pthread_cond_wait(&w.cv, &w.mu);
  }
  pthread_mutex_unlock(&w.mu);
}

// __shfl_down_sync: lane l gets lane l + delta's value within its segment of ``width``
// lanes, its own where that runs past the segment.
template <class T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
  __emu_warp& w = __emu_block_warps[threadIdx.x / warpSize];
  const unsigned lane = threadIdx.x % warpSize;
  const unsigned count = unsigned(__builtin_popcount(mask));
  unsigned long long bits = 0;
  std::memcpy(&bits, &value, sizeof value);
  w.slot[lane] = bits;
  __emu_meet(w, mask, count);   // every lane has written
  T out = value;
  if ((lane % unsigned(width)) + delta < unsigned(width))
    std::memcpy(&out, &w.slot[lane + delta], sizeof out);
  __emu_meet(w, mask, count);   // every lane has read: the slots may be written again
  return out;
}

// The grid: a host thread for each thread of a block, running every block in turn; a
// block's warps meet in records of their own, so no thread waits for another block
// (emu.py's entry points call it).
template <class Kernel>
struct __emu_grid {
  Kernel* kernel;
  unsigned grid, block, t;
  static void* run(void* arg) {
    const __emu_grid& g = *static_cast<__emu_grid*>(arg);
    gridDim = dim3(g.grid, 1, 1);
    blockDim = dim3(g.block, 1, 1);
    threadIdx = uint3{g.t, 0, 0};
    const unsigned warps = (g.block + warpSize - 1) / warpSize;
    for (unsigned b = 0; b < g.grid; ++b) {
      blockIdx = uint3{b, 0, 0};
      __emu_block_warps = __emu_all_warps + size_t(b) * warps;
      (*g.kernel)();
    }
    return nullptr;
  }
};

template <class Kernel>
inline void __emu_run_grid(unsigned grid, unsigned block, Kernel&& kernel) {
  const unsigned warps = (block + warpSize - 1) / warpSize;
  __emu_all_warps = new __emu_warp[size_t(grid) * warps];
  using Grid = __emu_grid<typename std::remove_reference<Kernel>::type>;
  Grid* each = new Grid[block];
  pthread_t* threads = new pthread_t[block];
  for (unsigned t = 0; t < block; ++t) {
    each[t] = Grid{&kernel, grid, block, t};
    if (pthread_create(&threads[t], nullptr, &Grid::run, &each[t]) != 0) {
      std::fprintf(stderr, "cuda_emu: cannot start thread %u of a block\n", t);
      std::abort();
    }
  }
  for (unsigned t = 0; t < block; ++t)
    pthread_join(threads[t], nullptr);
  delete[] threads;
  delete[] each;
  delete[] __emu_all_warps;
  __emu_all_warps = nullptr;
}

// ---- bit casts --------------------------------------------------------------------
template <class To, class From>
inline To __emu_bitcast(From v) {
  static_assert(sizeof(To) == sizeof(From), "size mismatch");
  To out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}
inline int __float_as_int(float x) { return __emu_bitcast<int>(x); }
inline unsigned int __float_as_uint(float x) { return __emu_bitcast<unsigned int>(x); }
inline float __int_as_float(int x) { return __emu_bitcast<float>(x); }
inline float __uint_as_float(unsigned int x) { return __emu_bitcast<float>(x); }
inline long long __double_as_longlong(double x) { return __emu_bitcast<long long>(x); }
inline double __longlong_as_double(long long x) { return __emu_bitcast<double>(x); }

// ---- 16-bit float formats -----------------------------------------------------------
// Round a double once to a binary format with `ebits` exponent and `mbits` fraction bits
// (RNE). A float input widens to double exactly, so float->half rounds only once.
inline uint16_t __emu_round16(double x, int ebits, int mbits) {
  const uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
  const int64_t inf_bits = ((int64_t(1) << ebits) - 1) << mbits;
  if (std::isnan(x)) return 0x7fffu;  // canonical NaN, as the CUDA intrinsics return
  const double a = std::fabs(x);
  if (std::isinf(a)) return sign | uint16_t(inf_bits);
  if (a == 0.0) return sign;
  const int bias = (1 << (ebits - 1)) - 1;
  int e;
  std::frexp(a, &e);                       // a in [2^(e-1), 2^e)
  int q = e - 1 < 1 - bias ? 1 - bias : e - 1;  // exponent of the quantum (subnormals: min)
  if (q > bias) return sign | uint16_t(inf_bits);
  const double m = std::nearbyint(std::ldexp(a, mbits - q));  // exact scale, one RNE
  // Normal: exponent field q+bias, m in [2^mbits, 2^(mbits+1)] (a carry bumps the field);
  // subnormal: q = 1-bias and m < 2^mbits lands in field 0. One formula covers both.
  const int64_t bits = (int64_t(q + bias - 1) << mbits) + int64_t(m);
  return sign | uint16_t(bits >= inf_bits ? inf_bits : bits);
}

inline float __emu_half_bits_to_float(uint16_t h) {
  const int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float mag;
  if (exp == 0) mag = std::ldexp(float(man), -24);
  else if (exp == 31) mag = man ? __uint_as_float(0x7fc00000u | (unsigned(man) << 13)) : INFINITY;
  else mag = std::ldexp(float(man | 0x400), exp - 25);
  return (h & 0x8000) ? -mag : mag;
}

struct __half;
struct __nv_bfloat16;
inline __half __float2half_rn(float x);
inline float __half2float(__half h);
inline __nv_bfloat16 __float2bfloat16_rn(float x);
inline float __bfloat162float(__nv_bfloat16 b);

struct __align__(2) __half {
  uint16_t __x;
  __half() = default;
  // CUDA's implicit conversions, both round-to-nearest-even.
  __half(float f) : __x(__emu_round16(f, 5, 10)) {}
  __half(double d) : __x(__emu_round16(d, 5, 10)) {}
  operator float() const { return __emu_half_bits_to_float(__x); }
};
struct __align__(2) __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(__emu_round16(f, 8, 7)) {}
  __nv_bfloat16(double d) : __x(__emu_round16(d, 8, 7)) {}
  operator float() const { return __uint_as_float(unsigned(__x) << 16); }
};
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;

inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 b; b.__x = u; return b; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }

inline __half __float2half_rn(float x) { return __ushort_as_half(__emu_round16(x, 5, 10)); }
inline __half __float2half(float x) { return __float2half_rn(x); }
inline __half __double2half(double x) { return __ushort_as_half(__emu_round16(x, 5, 10)); }
inline float __half2float(__half h) { return __emu_half_bits_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __ushort_as_bfloat16(__emu_round16(x, 8, 7)); }
inline __nv_bfloat16 __float2bfloat16(float x) { return __float2bfloat16_rn(x); }
inline __nv_bfloat16 __double2bfloat16(double x) { return __ushort_as_bfloat16(__emu_round16(x, 8, 7)); }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(unsigned(b.__x) << 16); }

// ---- vector types -----------------------------------------------------------------
#define __EMU_VEC2(T, N, A) \
  struct __align__(A) N##2 { T x, y; }; \
  inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define __EMU_VEC4(T, N, A) \
  struct __align__(A) N##4 { T x, y, z, w; }; \
  inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
__EMU_VEC2(signed char, char, 2)
__EMU_VEC4(signed char, char, 4)
__EMU_VEC2(unsigned char, uchar, 2)
__EMU_VEC4(unsigned char, uchar, 4)
__EMU_VEC2(short, short, 4)
__EMU_VEC4(short, short, 8)
__EMU_VEC2(unsigned short, ushort, 4)
__EMU_VEC4(unsigned short, ushort, 8)
__EMU_VEC2(int, int, 8)
__EMU_VEC4(int, int, 16)
__EMU_VEC2(unsigned int, uint, 8)
__EMU_VEC4(unsigned int, uint, 16)
__EMU_VEC2(float, float, 8)
__EMU_VEC4(float, float, 16)
__EMU_VEC2(long long, longlong, 16)
__EMU_VEC2(unsigned long long, ulonglong, 16)
__EMU_VEC2(double, double, 16)
#undef __EMU_VEC2
#undef __EMU_VEC4

struct __align__(4) __half2 { __half x, y; };
struct __align__(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 b) {
  return float2{__bfloat162float(b.x), __bfloat162float(b.y)};
}

// ---- loads ------------------------------------------------------------------------
template <class T>
inline T __ldg(const T* p) { return *p; }

// ---- IEEE arithmetic with explicit rounding (x86-64 SSE is IEEE RNE) ---------------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }

// ---- integer -> float conversions (the default rounding mode is RNE) ----------------
inline float __int2float_rn(int x) { return float(x); }
inline float __uint2float_rn(unsigned int x) { return float(x); }
inline float __ll2float_rn(long long x) { return float(x); }
inline float __ull2float_rn(unsigned long long x) { return float(x); }
inline double __int2double_rn(int x) { return double(x); }
inline double __uint2double_rn(unsigned int x) { return double(x); }
inline double __ll2double_rn(long long x) { return double(x); }
inline double __ull2double_rn(unsigned long long x) { return double(x); }
inline float __double2float_rn(double x) { return float(x); }

// ---- float -> integer conversions: RNE, saturating, NaN -> 0 (PTX cvt.rni.sat) -------
template <class I, class F>
inline I __emu_f2i_rn(F x) {
  using L = std::numeric_limits<I>;
  if (std::isnan(x)) return 0;
  const F r = std::nearbyint(x);
  const F hi_excl = std::ldexp(F(1), L::digits);  // 2^31, 2^32 or 2^63: exact in F
  if (r <= F(L::min())) return L::min();
  if (r >= hi_excl) return L::max();
  return I(r);
}
inline int __float2int_rn(float x) { return __emu_f2i_rn<int>(x); }
inline unsigned int __float2uint_rn(float x) { return __emu_f2i_rn<unsigned int>(x); }
inline long long __float2ll_rn(float x) { return __emu_f2i_rn<long long>(x); }
inline int __double2int_rn(double x) { return __emu_f2i_rn<int>(x); }
inline long long __double2ll_rn(double x) { return __emu_f2i_rn<long long>(x); }

// ---- CUDA's integer min/max overloads ------------------------------------------------
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
