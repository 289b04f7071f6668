// Mamba-1 selective scan on CPU: the fused forward and backward behind meteor.model.ops.selective_scan.
//
// Contract (validated by the Python wrapper in selective_scan.py; re-checked cheaply here):
//   u, delta, z      (batch, dim, L)   float32, time- or channel-contiguous (see Seq)   dim = d_inner
//   A                (dim, N)          real, contiguous (as every other operand)
//   B, C             (batch, G, N, L)  G groups of dim / G channels   (mamba's (batch, N, L) is G = 1)
//   D, delta_bias    (dim,)
//   dt  = softplus(delta + delta_bias)                  (bias and softplus each optional)
//   h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t    (per channel, per state n)
//   y_t = sum_n C_t[n] h_t[n];   out = (y + D * u) * silu(z)
//
// One source, several instruction sets. The arithmetic is written on at::vec::Vectorized<float>,
// PyTorch's portable SIMD type, whose width W is 16 floats under AVX-512, 8 under AVX2, and the
// baseline's (8 floats as plain arrays on x86-64, 4 NEON lanes on aarch64) otherwise. _build.py
// compiles this file once per instruction set, as PyTorch compiles its own CPU kernels:
//   -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma
//   -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 -mavx2 -mfma -mf16c
//   -DCPU_CAPABILITY=DEFAULT                  (no extension beyond the architecture's baseline)
// and loads the one the CPU runs. Nothing depends on the machine that compiled it beyond those
// flags. A few helpers have explicit AVX-512 / AVX2 bodies (exp2, 1/x, -|x|, the lane-sum shuffle
// tree, AVX-512's 16 x 16 transpose) and exp2 a NEON one (the aarch64 baseline build); each has a
// plain version used by the other baseline builds. tests/native/scan_block_check.cpp runs this file's
// block-level functions without libtorch, which is how the aarch64 build is checked under qemu.
//
// Why it is organised this way:
//  * The scan is compute-bound (~2.4 GFLOP at the FGF shape, dominated by the exp) and batch x channels
//    already gives hundreds of independent recurrences for a few cores, so time stays sequential. We
//    vectorise over W neighbouring channels: one W-float vector per state n, all N states of a block
//    held in registers (as many as fit), and B_t[n], C_t[n] are scalars broadcast to all lanes, so the
//    forward needs no horizontal sums.
//  * Contiguous inputs run along time per channel. Each W-channel block is transposed once (W x W
//    in-register transposes) into an (L, W) "tile" that stays in L2, and results are transposed back
//    at the end; channel-contiguous inputs are copied into the tile as they are. Elementwise work is
//    done on the tiles: bias, softplus and silu(z) in one pass before the recurrence (four steps at a
//    time, interleaved: see Pack), D and the gate as each step's output is stored.
//  * Outputs come from a small pool of reused blocks (OutputPool): fresh 66 MB tensors cost more in
//    page faults than the rest of the forward's overhead.
//  * exp(x) = 2^(x log2 e): a degree-5 polynomial of the fraction, times 2^floor. The recurrence is
//    bound by the FMA units (9 of its ~18 instructions per state and step use them under AVX2).
//  * The forward stores the state every `chunk` steps. The backward recomputes one chunk at a time from
//    its checkpoint (decays and states into a small buffer), then runs the adjoint recurrence in
//    reverse, so nothing of size (batch, dim, L, N) is ever stored.
//  * dB and dC sum over channels: each reverse step reduces W lane-vectors with a shuffle tree into
//    one vector over n, accumulated into a per-thread (L, N) buffer, summed over threads at the end.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <mutex>
#include <new>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(CPU_CAPABILITY_AVX512)
#define METEOR_SCAN_ISA "avx512"
#elif defined(CPU_CAPABILITY_AVX2)
#define METEOR_SCAN_ISA "avx2"
#else
#define METEOR_SCAN_ISA "default"
#endif

#define INLINE inline __attribute__((always_inline))

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int W = Vec::size();         // lanes per vector = channels per block
static_assert(W == 4 || W == 8 || W == 16, "the lane-sum tree and the tiles expect 4, 8 or 16 lanes");
constexpr int kMaxGenericState = 256;  // N beyond the specialised sizes runs the generic loop
constexpr float kLog2e = 1.4426950408889634f;

INLINE Vec load(const float* p) { return Vec::loadu(p); }
INLINE void store(float* p, const Vec& v) { v.store(p); }
INLINE Vec splat(float x) { return Vec(x); }
INLINE Vec zeros() { return Vec(0.f); }
INLINE Vec fma(const Vec& a, const Vec& b, const Vec& c) { return at::vec::fmadd(a, b, c); }  // a * b + c

// ---------------------------------------------------------------------------------------------
// exp and friends, on packs of K independent vectors
//
// The elementwise passes (softplus, the z gate) are long dependency chains per vector (exp, a
// reciprocal, a polynomial: ~90 cycles), and one chain after another fills the core's out-of-order
// window long before the FMA units are busy. So these functions take a Pack of K vectors and apply
// each operation to all K before the next, interleaving K chains in the instruction stream. Measured
// under AVX2: 6.3 ns per 8 softplus one vector at a time, 3.8 with K = 4 (the FMA bound is ~3.5).
// The recurrences call them with K = 1.

template <int K>
struct Pack {
  Vec v[K];
};

template <int K>
INLINE Pack<K> broadcast(const Vec& x) {
  Pack<K> r;
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) r.v[k] = x;
  return r;
}

template <int K, typename F>
INLINE Pack<K> map(const F& f, const Pack<K>& a) {
  Pack<K> r;
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) r.v[k] = f(a.v[k]);
  return r;
}

template <int K, typename F>
INLINE Pack<K> map(const F& f, const Pack<K>& a, const Pack<K>& b) {
  Pack<K> r;
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) r.v[k] = f(a.v[k], b.v[k]);
  return r;
}

template <int K, typename F>
INLINE Pack<K> map(const F& f, const Pack<K>& a, const Pack<K>& b, const Pack<K>& c) {
  Pack<K> r;
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) r.v[k] = f(a.v[k], b.v[k], c.v[k]);
  return r;
}

#define METEOR_PACK_OPERATOR(op)                                                                       \
  template <int K>                                                                                     \
  INLINE Pack<K> operator op(const Pack<K>& a, const Pack<K>& b) {                                     \
    return map([](const Vec& x, const Vec& y) { return x op y; }, a, b);                               \
  }                                                                                                    \
  template <int K>                                                                                     \
  INLINE Pack<K> operator op(const Pack<K>& a, const Vec& b) {                                         \
    return map([&b](const Vec& x) { return x op b; }, a);                                              \
  }
METEOR_PACK_OPERATOR(+)
METEOR_PACK_OPERATOR(-)
METEOR_PACK_OPERATOR(*)
METEOR_PACK_OPERATOR(/)
#undef METEOR_PACK_OPERATOR

template <int K>
INLINE Pack<K> fma(const Pack<K>& a, const Pack<K>& b, const Pack<K>& c) {  // a * b + c
  return map([](const Vec& x, const Vec& y, const Vec& z) { return fma(x, y, z); }, a, b, c);
}

template <int K>
INLINE Pack<K> fma(const Pack<K>& a, const Pack<K>& b, const Vec& c) {
  return map([&c](const Vec& x, const Vec& y) { return fma(x, y, c); }, a, b);
}

template <int K>
INLINE Pack<K> fnmadd(const Pack<K>& a, const Pack<K>& b, const Vec& c) {  // c - a * b
  return map([&c](const Vec& x, const Vec& y) { return at::vec::fnmadd(x, y, c); }, a, b);
}

// Horner's rule, coefficients from the highest degree down.
template <int K, size_t M>
INLINE Pack<K> horner(const Pack<K>& x, const float (&c)[M]) {
  Pack<K> p = fma(broadcast<K>(splat(c[0])), x, splat(c[1]));
#pragma GCC unroll 16
  for (size_t i = 2; i < M; ++i) p = fma(p, x, splat(c[i]));
  return p;
}

// 2^f for f in [0, 1): minimax polynomial for the relative error, max 1.6e-7 after float32
// rounding (about 1.3 ulp; mamba's CUDA kernel uses the hardware exp2f approximation, ~2 ulp).
constexpr float kExp2Poly[] = {0.0018775767f, 0.00898934f, 0.055826318f, 0.24015361f, 0.6931531f, 0.99999994f};

#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2) && !defined(__aarch64__)
// Baseline: split x = k + f with k = floor(x), build 2^k in the exponent bits. Written per lane
// on plain floats without branches, so that the compiler vectorises it for the baseline's SIMD (SSE2,
// NEON).
inline Vec exp2_lanes(const Vec& x) {
  alignas(64) float v[W], out[W];
  x.store(v);
  for (int i = 0; i < W; ++i) {
    const float xi = v[i];
    const bool nan = !(xi == xi);
    float xc = xi < -127.f ? -127.f : xi > 128.f ? 128.f : xi;
    xc = nan ? 0.f : xc;
    int32_t k = static_cast<int32_t>(xc);                  // truncation ...
    k -= static_cast<int32_t>(static_cast<float>(k) > xc);  // ... rounded down for negative x
    const float f = xc - static_cast<float>(k);
    float p = kExp2Poly[0];
    for (size_t j = 1; j < std::size(kExp2Poly); ++j) p = p * f + kExp2Poly[j];
    const int32_t bits = (k + 127) << 23;  // k = -127: 0.0f; k = 128: inf
    float two_k;
    std::memcpy(&two_k, &bits, sizeof(two_k));
    out[i] = nan ? xi : p * two_k;  // NaN stays NaN
  }
  return Vec::loadu(out);
}
#endif

// 2^x. Safe: the caller has checked that x lies in [-126, 127] (see exp_args_in_range), which lets
// the AVX2 version skip its clamps (two of its sixteen instructions per state and step). Ignored
// elsewhere.
template <bool Safe, int K>
INLINE Pack<K> exp2v(const Pack<K>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  // vreduceps gives x - floor(x) in one instruction and vscalefps multiplies by 2^floor(x) with
  // correct saturation to 0 and inf, so no clamping is needed: 7 instructions per 16 exps.
  const Pack<K> f = map([](const Vec& v) { return Vec(_mm512_reduce_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)); }, x);
  return map([](const Vec& p, const Vec& v) { return Vec(_mm512_scalef_ps(p, v)); }, horner(f, kExp2Poly), x);
#elif defined(CPU_CAPABILITY_AVX2)
  // x = k + f, k = floor(x) clamped to [-126, 127], and 2^k added to the polynomial's exponent
  // field (an integer add instead of a multiply: the FMA ports are the bottleneck here). Below -126
  // the result is 2^-126 * 2^f (< 2.4e-38 where the true value is smaller still); the upper clamp
  // is at 127.99999, so an overflowing exp returns ~3.4e38 instead of inf. x is the second operand of
  // max/min so that a NaN passes through.
  Pack<K> xc = x;
  if constexpr (!Safe)
    xc = map([](const Vec& v) {
      return Vec(_mm256_min_ps(_mm256_set1_ps(127.99999f), _mm256_max_ps(_mm256_set1_ps(-126.f), v)));
    }, x);
  const Pack<K> k = map([](const Vec& v) { return Vec(_mm256_floor_ps(v)); }, xc);
  return map([](const Vec& p, const Vec& kf) {
    const __m256i scale = _mm256_slli_epi32(_mm256_cvttps_epi32(kf), 23);
    return Vec(_mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), scale)));
  }, horner(xc - k, kExp2Poly), k);
#elif defined(__aarch64__)
  // The AVX2 scheme on NEON (Vectorized<float> is a float32x4_t here): FMAX/FMIN keep a NaN, FRINTM
  // floors, FCVTZS truncates (a NaN to 0, so its exponent is left alone).
  Pack<K> xc = x;
  if constexpr (!Safe)
    xc = map([](const Vec& v) {
      return Vec(vminq_f32(vdupq_n_f32(127.99999f), vmaxq_f32(vdupq_n_f32(-126.f), v)));
    }, x);
  const Pack<K> k = map([](const Vec& v) { return Vec(vrndmq_f32(v)); }, xc);
  return map([](const Vec& p, const Vec& kf) {
    const int32x4_t scale = vshlq_n_s32(vcvtq_s32_f32(kf), 23);
    return Vec(vreinterpretq_f32_s32(vaddq_s32(vreinterpretq_s32_f32(p), scale)));
  }, horner(xc - k, kExp2Poly), k);
#else
  return map([](const Vec& v) { return exp2_lanes(v); }, x);
#endif
}

template <bool Safe = false>
INLINE Vec exp2v(const Vec& x) {
  return exp2v<Safe>(Pack<1>{{x}}).v[0];
}

template <int K>
INLINE Pack<K> expv(const Pack<K>& x) {
  return exp2v<false>(x * splat(kLog2e));
}

// 1 / x for x in [1, 3] (all its callers). Under AVX-512, rcp14 (2^-14) and one Newton step, about
// 1 ulp: a vdivps would stall the elementwise loops there. Elsewhere a division, which measured
// faster under AVX2 than rcpps and its Newton step (two more FMAs where the FMA units are the limit).
template <int K>
INLINE Pack<K> reciprocal(const Pack<K>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const Pack<K> r = map([](const Vec& v) { return Vec(_mm512_rcp14_ps(v)); }, x);
  return fma(r, fnmadd(x, r, splat(1.f)), r);  // r + r (1 - x r)
#else
  return broadcast<K>(splat(1.f)) / x;
#endif
}

// log(1 + e) for e in [0, 1]: e q(e), q a degree-8 polynomial fitted for the relative error (max
// 1.7e-7 after float32 rounding, exact at e = 0). As many multiply-adds as 2 atanh(e / (2 + e)) and
// its series, without the division (with silu's below, 3 % of the AVX2 forward, docs/benchmarks.md).
constexpr float kLog1pPoly[] = {0.0052326815f, -0.029505186f, 0.078225866f, -0.13663238f, 0.19106004f,
                                -0.2484298f,   0.33319098f,   -0.49999493f, 0.99999994f};

template <int K>
INLINE Pack<K> log1p_unit(const Pack<K>& e) {
  return e * horner(e, kLog1pPoly);
}

// -|x|: one OR of the sign bit.
template <int K>
INLINE Pack<K> neg_abs(const Pack<K>& x) {
  return map([](const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
    return Vec(_mm512_or_ps(v, _mm512_set1_ps(-0.f)));
#elif defined(CPU_CAPABILITY_AVX2)
    return Vec(_mm256_or_ps(v, _mm256_set1_ps(-0.f)));
#else
    return zeros() - v.abs();
#endif
  }, x);
}

// x >= 0 ? if_nonneg : otherwise, per lane.
template <int K>
INLINE Pack<K> select_nonneg(const Pack<K>& x, const Pack<K>& if_nonneg, const Pack<K>& otherwise) {
  return map([](const Vec& v, const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
    return Vec(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GE_OQ), b, a));
#else
    return Vec::blendv(b, a, v >= zeros());
#endif
  }, x, if_nonneg, otherwise);
}

// sigmoid(x) from e = exp(-|x|), stable for any x.
template <int K>
INLINE Pack<K> sigmoid_from(const Pack<K>& x, const Pack<K>& e) {
  const Pack<K> r = reciprocal(e + splat(1.f));
  return select_nonneg(x, r, e * r);
}

template <int K>
INLINE Pack<K> vmax0(const Pack<K>& x) {
  return map([](const Vec& v) { return at::vec::clamp_min(v, zeros()); }, x);
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)): equals torch's softplus (threshold 20) to float32 rounding.
template <int K>
INLINE Pack<K> softplus(const Pack<K>& x) {
  return vmax0(x) + log1p_unit(expv(neg_abs(x)));
}

template <int K>
INLINE Pack<K> load_pack(const float* p) {  // K consecutive vectors (steps of an (L, W) tile)
  Pack<K> r;
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) r.v[k] = load(p + k * W);
  return r;
}

template <int K>
INLINE void store_pack(float* p, const Pack<K>& x) {
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) store(p + k * W, x.v[k]);
}

// body(t, pack size) over the steps [0, L) of a tile: four at a time, then one at a time.
template <typename F>
INLINE void by_fours(int64_t L, const F& body) {
  int64_t t = 0;
  for (; t + 4 <= L; t += 4) body(t, std::integral_constant<int, 4>{});
  for (; t < L; ++t) body(t, std::integral_constant<int, 1>{});
}

// ---------------------------------------------------------------------------------------------
// Lane sums: W vectors in, one vector out whose lane j is the sum of vector j's lanes.
//
// Under AVX2 / AVX-512 a shuffle tree: level 0 and 1 pair up neighbouring lanes inside each 128-bit
// lane (as vhaddps does), levels 2 and 3 fold 128-bit lanes together; every level halves the number
// of vectors and keeps lane order, so vector j's total lands in lane j. LaneSums::push feeds vectors
// one at a time and combines pairs as soon as they exist, so at most log2(W) + 1 partial vectors are
// live (the reverse loop already holds N carried adjoints in registers). The baseline keeps a plain
// array and sums it at the end.

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <int Level>
INLINE Vec combine(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = a, y = b;
  if constexpr (Level < 2) {
    return Vec(_mm512_add_ps(_mm512_shuffle_ps(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_ps(x, y, _MM_SHUFFLE(3, 1, 3, 1))));
  } else {
    return Vec(_mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD)));
  }
#else
  const __m256 x = a, y = b;
  if constexpr (Level < 2) {
    return Vec(_mm256_add_ps(_mm256_shuffle_ps(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm256_shuffle_ps(x, y, _MM_SHUFFLE(3, 1, 3, 1))));
  } else {
    return Vec(_mm256_add_ps(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31)));
  }
#endif
}

constexpr int kLaneLevels = W == 16 ? 4 : W == 8 ? 3 : 2;

struct LaneSums {
  Vec slot[kLaneLevels];  // slot[k]: the left operand waiting at level k
  Vec result;
  template <int K>
  INLINE void add(int index, const Vec& v) {  // v is item `index` of level K
    if constexpr (K == kLaneLevels) {
      result = v;
    } else {
      if (!(index & 1)) {
        slot[K] = v;
        return;
      }
      add<K + 1>(index >> 1, combine<K>(slot[K], v));
    }
  }
  INLINE void push(int n, const Vec& w) { add<0>(n, w); }  // n in [0, W), a constant after unrolling
};
#else
struct LaneSums {
  alignas(64) float lanes[W][W];
  Vec result;
  INLINE void push(int n, const Vec& w) {
    w.store(lanes[n]);
    if (n != W - 1) return;
    alignas(64) float sums[W];
    for (int j = 0; j < W; ++j) {
      float s = 0.f;
      for (int i = 0; i < W; ++i) s += lanes[j][i];
      sums[j] = s;
    }
    result = Vec::loadu(sums);
  }
};
#endif

// Adds the lane sums of the N vectors w[n * W ..] into acc[0..N): the tree per W states (zero-padded).
inline void add_lane_sums(const float* w, int N, float* acc) {
  for (int n0 = 0; n0 < N; n0 += W) {
    LaneSums sums;
    for (int i = 0; i < W; ++i) sums.push(i, n0 + i < N ? load(w + (n0 + i) * W) : zeros());
    if (N - n0 >= W) {
      store(acc + n0, load(acc + n0) + sums.result);
    } else {
      alignas(64) float r[W];
      sums.result.store(r);
      for (int i = 0; i < N - n0; ++i) acc[n0 + i] += r[i];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tiles: (rows <= W, L) slices of a (.., dim, L) tensor  <->  (L, W) time-major buffers

// dst[j * ld_dst + i] = src[i * ld_src + j] for a W x W block, in registers. AVX2 and the baseline use
// PyTorch's transpose_mxn (8 x 8 in 24 shuffles under AVX2, element by element in the baseline); its
// AVX-512 version takes runtime sizes and is not inlined, which cost ~15 % of the forward here, so
// AVX-512 has its own 16 x 16: interleave 32-bit, then 64-bit pairs, then 128-bit lanes twice.
#if defined(CPU_CAPABILITY_AVX512)
INLINE void transpose_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // r[i] now holds rows 4(i/4)..4(i/4)+3 of column set (i % 4) + 4k in 128-bit lane k.
#pragma GCC unroll 2
  for (int i = 0; i < 16; i += 8) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xDD);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    _mm512_storeu_ps(dst + j * ld_dst, _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88));
    _mm512_storeu_ps(dst + (j + 8) * ld_dst, _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD));
  }
}
#else
INLINE void transpose_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  at::vec::transpose_mxn<float, W, W>(src, ld_src, dst, ld_dst);
}
#endif

void rows_to_tile(const float* src, int64_t stride, int rows, int64_t L, float* tile) {
  int64_t t = 0;
  if (rows == W)
    for (; t + W <= L; t += W) transpose_block(src + t, stride, tile + t * W, W);
  for (; t < L; ++t)  // ragged end of time, and blocks narrower than W (padded with zeros)
    for (int c = 0; c < W; ++c) tile[t * W + c] = c < rows ? src[c * stride + t] : 0.f;
}

void tile_to_rows(const float* tile, int rows, int64_t L, float* dst, int64_t stride) {
  int64_t t = 0;
  if (rows == W)
    for (; t + W <= L; t += W) transpose_block(tile + t * W, W, dst + t, stride);
  for (; t < L; ++t)
    for (int c = 0; c < rows; ++c) dst[c * stride + t] = tile[t * W + c];
}

// A (batch, dim, L) operand read in place, in either of two layouts: time-contiguous (stride_t = 1,
// a contiguous tensor) or channel-contiguous (stride_d = 1: a transposed (batch, L, dim) tensor, the
// layout in which a Mamba block produces delta and z). The second needs no transpose at all.
struct Seq {
  const float* data = nullptr;
  int64_t stride_b = 0, stride_d = 0, stride_t = 0;

  Seq() = default;
  explicit Seq(const at::Tensor& t)
      : data(t.data_ptr<float>()), stride_b(t.stride(0)), stride_d(t.stride(1)), stride_t(t.stride(2)) {}
  explicit operator bool() const { return data != nullptr; }
  bool time_major() const { return stride_t == 1; }
  const float* block(int64_t b, int64_t d0) const { return data + b * stride_b + d0 * stride_d; }
};

// The (L, W) tile of channels [d0, d0 + rows) of batch b; absent channels read as 0.
void load_tile(const Seq& s, int64_t b, int64_t d0, int rows, int64_t L, float* tile) {
  const float* src = s.block(b, d0);
  if (s.time_major()) return rows_to_tile(src, s.stride_d, rows, L, tile);
  for (int64_t t = 0; t < L; ++t) {
    const float* step = src + t * s.stride_t;
    if (rows == W) {
      store(tile + t * W, load(step));
    } else {
      for (int c = 0; c < W; ++c) tile[t * W + c] = c < rows ? step[c] : 0.f;
    }
  }
}

// Output memory. glibc hands every block above 32 MiB back to the OS when it is freed, so a fresh
// (batch, dim, L) output (66 MB at the FGF shape) arrives as untouched pages that the OS must fault in
// and zero: ~9 ms per tensor measured here, a quarter of the forward, three quarters of it again in
// the backward. So the large outputs of this op come from a small pool: when such a tensor dies its
// block waits for the next call asking for the same size instead of going back to the OS. Fresh
// blocks are 2 MiB aligned and marked for transparent huge pages (one fault per 2 MiB, not per 4 KiB).
// Idle blocks are capped (kMaxIdle*), and release_cached_memory() returns them all.
class OutputPool {
 public:
  static OutputPool& instance() {
    static OutputPool* pool = new OutputPool();  // never destroyed: tensors may outlive static destructors
    return *pool;
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    int64_t numel = 1;
    for (int64_t s : sizes) numel *= s;
    const size_t bytes = static_cast<size_t>(numel) * sizeof(float);
    if (bytes < kMinPooledBytes) return at::empty(sizes, options);
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* block = take(rounded);
    return at::from_blob(block, sizes, [rounded](void* p) { OutputPool::instance().give(p, rounded); }, options);
  }

  void release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [bytes, block] : idle_) std::free(block);
    idle_.clear();
    idle_bytes_ = 0;
  }

 private:
  static constexpr size_t kHuge = size_t(2) << 20;
  static constexpr size_t kMinPooledBytes = size_t(4) << 20;
  static constexpr size_t kMaxIdleBytes = size_t(1) << 30;
  static constexpr size_t kMaxIdleBlocks = 12;  // a bidirectional layer's forward and backward outputs
  std::mutex mutex_;
  std::vector<std::pair<size_t, void*>> idle_;  // oldest first
  size_t idle_bytes_ = 0;

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = idle_.size(); i-- > 0;) {
        if (idle_[i].first != bytes) continue;
        void* block = idle_[i].second;
        idle_.erase(idle_.begin() + static_cast<std::ptrdiff_t>(i));
        idle_bytes_ -= bytes;
        return block;
      }
    }
    void* block = std::aligned_alloc(kHuge, bytes);
    if (!block) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(block, bytes, MADV_HUGEPAGE);  // only a hint: without THP nothing changes
#endif
    return block;
  }

  void give(void* block, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    idle_.emplace_back(bytes, block);
    idle_bytes_ += bytes;
    while (!idle_.empty() && (idle_bytes_ > kMaxIdleBytes || idle_.size() > kMaxIdleBlocks)) {
      std::free(idle_.front().second);
      idle_bytes_ -= idle_.front().first;
      idle_.erase(idle_.begin());
    }
  }
};

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return OutputPool::instance().empty(sizes, options);
}

struct AlignedFloats {
  float* data;
  explicit AlignedFloats(int64_t n) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float) + 63) / 64 * 64;
    data = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!data) throw std::bad_alloc();
  }
  ~AlignedFloats() { std::free(data); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
};

// ---------------------------------------------------------------------------------------------
// Problem geometry and per-block views

struct Geometry {
  int64_t batch, dim, L, N, groups, dim_per_group, blocks_per_group, blocks, chunk, n_chunks;

  Geometry(const at::Tensor& u, const at::Tensor& A, const at::Tensor& B, int64_t chunk_)
      : batch(u.size(0)), dim(u.size(1)), L(u.size(2)), N(A.size(1)), groups(B.size(1)),
        dim_per_group(dim / groups), blocks_per_group((dim_per_group + W - 1) / W),
        blocks(groups * blocks_per_group), chunk(chunk_), n_chunks((L + chunk_ - 1) / chunk_) {}
};

// One work item: batch b, a block of up to W channels that all belong to one group of B / C.
struct Item {
  int64_t b, block, group, d0;
  int rows;
  Item(const Geometry& g, int64_t index) {
    b = index / g.blocks;
    block = index % g.blocks;
    group = block / g.blocks_per_group;
    const int64_t first = (block % g.blocks_per_group) * W;
    d0 = group * g.dim_per_group + first;
    rows = static_cast<int>(std::min<int64_t>(W, g.dim_per_group - first));
  }
};

// Per-channel vector of a (dim,) parameter for this block; zero for padded lanes and absent tensors.
Vec lanes_of(const float* p, const Item& it) {
  alignas(64) float v[W] = {};
  if (p)
    for (int c = 0; c < it.rows; ++c) v[c] = p[it.d0 + c];
  return Vec::loadu(v);
}

// (N, W) lanes of A for this block, optionally scaled (by log2 e, for exp2v).
void state_lanes(const float* A, int64_t N, const Item& it, float scale, float* out) {
  for (int64_t n = 0; n < N; ++n)
    for (int c = 0; c < W; ++c) out[n * W + c] = c < it.rows ? A[(it.d0 + c) * N + n] * scale : 0.f;
}

struct DtRange {
  Vec lo, hi;  // per lane, the least and the greatest dt of the tile
};

// dt = softplus(delta + bias) in place on an (L, W) tile (and sig = its derivative sigmoid(delta +
// bias) when given), and gate = silu(z) = z / (1 + exp(-z)) in place on z's tile when given: one pass, so
// that the two long dependency chains of each step interleave as well. Returns dt's range per lane
// under AVX2 (see exp_args_in_range; the other builds skip it). A NaN may be left out of the range:
// exp2v<true> propagates NaN without the clamps.
DtRange prepare_tiles(float* dt, float* z, int64_t L, const Vec& bias, bool use_softplus, float* sig) {
  DtRange range{splat(INFINITY), splat(-INFINITY)};
  by_fours(L, [&](int64_t t, auto k) __attribute__((always_inline)) {
    constexpr int K = decltype(k)::value;
    Pack<K> x = load_pack<K>(dt + t * W) + bias;
    if (use_softplus) {
      const Pack<K> e = expv(neg_abs(x));
      if (sig) store_pack(sig + t * W, sigmoid_from(x, e));
      x = vmax0(x) + log1p_unit(e);
    }
    store_pack(dt + t * W, x);
    if (z) {  // z / (1 + e^-z), z clamped below at -88 (silu < 6e-37 there, and e^88 is finite); NaN stays
      const Pack<K> zz = map([](const Vec& v) { return at::vec::clamp_min(v, splat(-88.f)); }, load_pack<K>(z + t * W));
      store_pack(z + t * W, zz / (exp2v<false>(zz * splat(-kLog2e)) + splat(1.f)));
    }
#if defined(CPU_CAPABILITY_AVX2)
#pragma GCC unroll 4
    for (int i = 0; i < K; ++i) {
      range.lo = Vec(_mm256_min_ps(range.lo, x.v[i]));
      range.hi = Vec(_mm256_max_ps(range.hi, x.v[i]));
    }
#endif
  });
  return range;
}

// Whether every exponent dt * A * log2(e) of this block lies in [-126, 127], so that exp2v<true> may
// skip its clamps. Only the AVX2 build has clamps to skip; the others always answer false (and so
// compile one version of the recurrences).
bool exp_args_in_range(const DtRange& dt, const float* A2, int64_t N) {
#if defined(CPU_CAPABILITY_AVX2)
  Vec lo = splat(0.f), hi = splat(0.f);
  for (int64_t n = 0; n < N; ++n) {
    const Vec a = load(A2 + n * W), p = dt.lo * a, q = dt.hi * a;
    lo = Vec(_mm256_min_ps(lo, _mm256_min_ps(p, q)));
    hi = Vec(_mm256_max_ps(hi, _mm256_max_ps(p, q)));
  }
  alignas(64) float l[W], h[W];
  lo.store(l);
  hi.store(h);
  for (int c = 0; c < W; ++c)
    if (!(l[c] >= -126.f && h[c] <= 127.f)) return false;
  return true;
#else
  (void)dt, (void)A2, (void)N;
  return false;
#endif
}

// Runs body(worker, claim) once per worker; claim() hands out item indices until none are left (-1).
// Items come from a shared counter rather than a static split: the machine may be shared, and a
// worker that loses its core for a while should not leave the others idle at the end.
template <typename F>
void parallel_items(int64_t n_items, int n_workers, const F& body) {
  std::atomic<int64_t> counter{0};
  const auto claim = [&] {
    const int64_t i = counter.fetch_add(1);
    return i < n_items ? i : int64_t{-1};
  };
  at::parallel_for(0, n_workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t worker = w0; worker < w1; ++worker) body(worker, claim);
  });
}

// Pulls the next item's inputs towards L2 while this item computes, a few cache lines per time step.
// Loading them only when the next item starts leaves the core waiting on DRAM: W rows per operand
// are more streams than the hardware prefetcher runs far enough ahead, and a channel-contiguous
// operand is one cache line per step, kilobytes apart, which it does not follow at all. Measured at
// the FGF shape, single-threaded: it saves slightly more in the loads than its prefetches cost the
// recurrence (~2 ms of ~25 under AVX2). (Transposing the next item's tiles in during the recurrence,
// a block at a time, was tried too and measured slower under both AVX2 and AVX-512.)
struct RowPrefetcher {
  static constexpr int kMaxArrays = 4;
  struct Runs {  // `count` runs of `bytes` contiguous bytes, `stride` bytes apart
    const char* base;
    int64_t count, bytes, stride;
  };
  Runs runs[kMaxArrays] = {};
  int arrays = 0, array = 0;
  int64_t run = 0, offset = 0;

  void add(const Seq& s, int64_t b, int64_t d0, int rows, int64_t L) {
    const char* base = reinterpret_cast<const char*>(s.block(b, d0));
    constexpr int64_t f = sizeof(float);
    runs[arrays++] = s.time_major() ? Runs{base, rows, L * f, s.stride_d * f} : Runs{base, L, rows * f, s.stride_t * f};
  }
  INLINE void step(int lines) {
    for (int i = 0; i < lines && array < arrays; ++i) {
      const Runs& r = runs[array];
      __builtin_prefetch(r.base + run * r.stride + offset, 0, 2);
      if ((offset += 64) < r.bytes) continue;
      offset = 0;
      if (++run < r.count) continue;
      run = 0;
      ++array;
    }
  }
  // Lines per step so that everything is requested within `steps` steps.
  int lines_per_step(int64_t steps) const {
    int64_t total = 0;
    for (int i = 0; i < arrays; ++i) total += runs[i].count * ((runs[i].bytes + 63) / 64);
    return static_cast<int>(steps > 0 ? (total + steps - 1) / steps : total);
  }
};

// ---------------------------------------------------------------------------------------------
// The recurrences. NS > 0: N known at compile time, states unrolled into registers; NS = 0: any N.

struct BlockScan {
  int64_t L, chunk;
  int N;
  const float* Bt;  // (L, N) rows of B for this batch and group
  const float* Ct;  // (L, N)
  const float* A2;  // (N, W) A * log2(e)
  float* ckpt;      // state before chunk k at ckpt + k * ckpt_stride, (N, W)
  int64_t ckpt_stride;
  RowPrefetcher* prefetch;  // the next item's inputs, or null
  int prefetch_lines;       // cache lines to request per time step
};

template <int NS, bool Safe>
void forward_block(const BlockScan& s, const float* dt, const float* u, const float* gate, Vec D, float* out,
                   float* last) {
  const int N = NS > 0 ? NS : s.N;
  Vec h[NS > 0 ? NS : kMaxGenericState];
  for (int n = 0; n < N; ++n) h[n] = zeros();
  for (int64_t t0 = 0, k = 0; t0 < s.L; t0 += s.chunk, ++k) {
    if (s.ckpt)
      for (int n = 0; n < N; ++n) store(s.ckpt + k * s.ckpt_stride + n * W, h[n]);
    const int64_t t1 = std::min(s.L, t0 + s.chunk);
    for (int64_t t = t0; t < t1; ++t) {
      if (s.prefetch) s.prefetch->step(s.prefetch_lines);
      const Vec d = load(dt + t * W), uu = load(u + t * W);
      const Vec du = d * uu;
      const float* Bn = s.Bt + t * N;
      const float* Cn = s.Ct + t * N;
      Vec y0 = zeros(), y1 = zeros();  // two accumulators: the sum over n is otherwise one long dependency chain
#pragma GCC unroll 16
      for (int n = 0; n < N; ++n) {
        const Vec a = exp2v<Safe>(d * load(s.A2 + n * W));  // exp(dt * A)
        h[n] = fma(a, h[n], du * splat(Bn[n]));
        if (n & 1) y1 = fma(h[n], splat(Cn[n]), y1); else y0 = fma(h[n], splat(Cn[n]), y0);
      }
      const Vec o = fma(D, uu, y0 + y1);  // out = (y + D u) * silu(z)
      store(out + t * W, gate ? o * load(gate + t * W) : o);
    }
  }
  for (int n = 0; n < N; ++n) store(last + n * W, h[n]);
}

struct BlockGrads {
  const float* Ar;  // (N, W) A itself (the decay's derivative w.r.t. dt is A * decay)
  Vec D;            // per-lane D (zero if absent)
  float* go;        // (L, W) in: dL/dy;              out: dL/du
  float* dt;        // (L, W) in: dt;                 out: dL/d(dt)
  float* gz;        // (L, W) in: dL/dout * silu'(z); out: dL/dz   (null without z)
  float* decay;     // (chunk, N, W) scratch
  float* states;    // (chunk + 1, N, W) scratch: the chunk's starting state, then h_t
  float* dA;        // (N, W) out
  float* dBt;       // (L, N) accumulated
  float* dCt;       // (L, N) accumulated
  const float* dlast;  // (N, W) or null
  Vec dD;           // out: sum_t dL/dy * u per lane
};

// Lane sums of per-state vectors, streamed when N is a multiple of W (the tree is fed as the states
// are computed, so the products never all need registers at once), batched otherwise. The batch is
// plain floats: an array of Vec would be zero-filled on every step.
template <int NS>
struct StateSums {
  static constexpr bool kStreamed = NS > 0 && NS % W == 0;
  LaneSums tree;
  alignas(64) float w[kStreamed ? 1 : (NS > 0 ? NS : kMaxGenericState) * W];

  INLINE void put(int n, const Vec& v, float* acc) {
    if constexpr (kStreamed) {
      tree.push(n % W, v);
      if (n % W == W - 1) store(acc + n - (W - 1), load(acc + n - (W - 1)) + tree.result);
    } else {
      store(w + n * W, v);
    }
  }
  INLINE void finish(int N, float* acc) {
    if constexpr (!kStreamed) add_lane_sums(w, N, acc);
  }
};

template <int NS, bool Safe>
void backward_block(const BlockScan& s, const float* u, BlockGrads& g) {
  const int N = NS > 0 ? NS : s.N;
  Vec carry[NS > 0 ? NS : kMaxGenericState];  // a_{t+1} * dL/dh_{t+1}: the adjoint flowing back in time
  Vec dA[NS > 0 ? NS : kMaxGenericState];
  for (int n = 0; n < N; ++n) {
    carry[n] = g.dlast ? load(g.dlast + n * W) : zeros();
    dA[n] = zeros();
  }
  Vec dD = zeros();
  for (int64_t k = s.L > 0 ? (s.L - 1) / s.chunk : -1; k >= 0; --k) {
    const int64_t t0 = k * s.chunk, len = std::min(s.chunk, s.L - t0);

    // 1. Recompute the chunk from its checkpoint, keeping decays and states; dC and dz need the
    //    states and y, which are only available here.
    Vec h[NS > 0 ? NS : kMaxGenericState];
    for (int n = 0; n < N; ++n) {
      h[n] = load(s.ckpt + k * s.ckpt_stride + n * W);
      store(g.states + n * W, h[n]);
    }
    for (int64_t j = 0; j < len; ++j) {
      if (s.prefetch) s.prefetch->step(s.prefetch_lines);
      const int64_t t = t0 + j;
      const Vec d = load(g.dt + t * W), uu = load(u + t * W), du = d * uu, gy = load(g.go + t * W);
      const float* Bn = s.Bt + t * N;
      const float* Cn = s.Ct + t * N;
      float* a_out = g.decay + j * N * W;
      float* h_out = g.states + (j + 1) * N * W;
      Vec y0 = zeros(), y1 = zeros();
      StateSums<NS> sums;
#pragma GCC unroll 16
      for (int n = 0; n < N; ++n) {
        const Vec a = exp2v<Safe>(d * load(s.A2 + n * W));
        h[n] = fma(a, h[n], du * splat(Bn[n]));
        store(a_out + n * W, a);
        store(h_out + n * W, h[n]);
        if (n & 1) y1 = fma(h[n], splat(Cn[n]), y1); else y0 = fma(h[n], splat(Cn[n]), y0);
        sums.put(n, gy * h[n], g.dCt + t * N);  // dC_t[n] = sum over channels of dL/dy_t * h_t[n]
      }
      sums.finish(N, g.dCt + t * N);
      if (g.gz) store(g.gz + t * W, load(g.gz + t * W) * (y0 + y1 + g.D * uu));
    }

    // 2. Adjoint recurrence, in reverse: gh = dL/dh_t = C_t dL/dy_t + a_{t+1} dL/dh_{t+1}.
    for (int64_t j = len - 1; j >= 0; --j) {
      if (s.prefetch) s.prefetch->step(s.prefetch_lines);
      const int64_t t = t0 + j;
      const Vec d = load(g.dt + t * W), uu = load(u + t * W), du = d * uu, gy = load(g.go + t * W);
      const float* Bn = s.Bt + t * N;
      const float* Cn = s.Ct + t * N;
      const float* a_in = g.decay + j * N * W;
      const float* hprev = g.states + j * N * W;
      Vec ddt0 = zeros(), ddt1 = zeros(), sb0 = zeros(), sb1 = zeros();
      StateSums<NS> sums;
#pragma GCC unroll 16
      for (int n = 0; n < N; ++n) {
        const Vec a = load(a_in + n * W);
        const Vec gh = fma(gy, splat(Cn[n]), carry[n]);
        const Vec q = gh * load(hprev + n * W) * a;  // dL/d(decay) * decay
        if (n & 1) {
          ddt1 = fma(q, load(g.Ar + n * W), ddt1);
          sb1 = fma(gh, splat(Bn[n]), sb1);
        } else {
          ddt0 = fma(q, load(g.Ar + n * W), ddt0);
          sb0 = fma(gh, splat(Bn[n]), sb0);
        }
        dA[n] = fma(q, d, dA[n]);
        sums.put(n, gh * du, g.dBt + t * N);  // dB_t[n] = sum over channels of dL/dh_t[n] * dt_t * u_t
        carry[n] = gh * a;
      }
      sums.finish(N, g.dBt + t * N);
      const Vec sb = sb0 + sb1;  // sum_n dL/dh_t[n] B_t[n]
      dD = fma(gy, uu, dD);
      store(g.go + t * W, fma(gy, g.D, d * sb));
      store(g.dt + t * W, fma(uu, sb, ddt0 + ddt1));
    }
  }
  for (int n = 0; n < N; ++n) store(g.dA + n * W, dA[n]);
  g.dD = dD;
}

// Calls f(NS, Safe) with N as a compile-time constant where specialised, and Safe as one.
template <bool Safe, typename F>
void dispatch_state_size(int64_t N, const F& f) {
  switch (N) {
    case 16: f(std::integral_constant<int, 16>{}, std::bool_constant<Safe>{}); break;
    case 8: f(std::integral_constant<int, 8>{}, std::bool_constant<Safe>{}); break;
    case 4: f(std::integral_constant<int, 4>{}, std::bool_constant<Safe>{}); break;
    default: f(std::integral_constant<int, 0>{}, std::bool_constant<Safe>{}); break;
  }
}

template <typename F>
void dispatch(int64_t N, bool safe, const F& f) {
#if defined(CPU_CAPABILITY_AVX2)
  if (safe) return dispatch_state_size<true>(N, f);
#endif
  (void)safe;
  dispatch_state_size<false>(N, f);
}

// ---------------------------------------------------------------------------------------------
// Entry points

const float* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

// (batch, dim, L) operands may be time-contiguous or channel-contiguous (see Seq).
bool sequence_layout_ok(const at::Tensor& t) { return t.dim() == 3 && (t.stride(2) == 1 || t.stride(1) == 1); }

void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                  const std::optional<at::Tensor>& delta_bias, int64_t chunk) {
  // The Python wrapper gives the friendly messages; these guard the raw pointers below.
  const auto check = [](const at::Tensor& t, bool sequence) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat,
                "meteor selective scan kernel: expects float32 CPU tensors");
    TORCH_CHECK(sequence ? sequence_layout_ok(t) : t.is_contiguous(),
                "meteor selective scan kernel: u, delta, z must be time- or channel-contiguous, the rest contiguous");
  };
  check(u, true);
  check(delta, true);
  for (const at::Tensor* t : {&A, &B, &C}) check(*t, false);
  if (z.has_value() && z->defined()) check(*z, true);
  for (const std::optional<at::Tensor>* t : {&D, &delta_bias})
    if (t->has_value() && (*t)->defined()) check(**t, false);
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes() && A.dim() == 2 && A.size(0) == u.size(1) &&
                  B.dim() == 4 && C.sizes() == B.sizes() && B.size(0) == u.size(0) && B.size(2) == A.size(1) &&
                  B.size(3) == u.size(2) && B.size(1) >= 1 && u.size(1) % B.size(1) == 0,
              "meteor selective scan kernel: inconsistent shapes");
  TORCH_CHECK(A.size(1) <= kMaxGenericState, "meteor selective scan kernel: N = ", A.size(1),
              " exceeds the supported maximum ", kMaxGenericState);
  TORCH_CHECK(chunk >= 1, "meteor selective scan kernel: chunk must be >= 1");
  if (z.has_value() && z->defined()) TORCH_CHECK(z->sizes() == u.sizes(), "z must match u");
  if (D.has_value() && D->defined()) TORCH_CHECK(D->numel() == u.size(1), "D must be (dim,)");
  if (delta_bias.has_value() && delta_bias->defined())
    TORCH_CHECK(delta_bias->numel() == u.size(1), "delta_bias must be (dim,)");
}

// Returns (out, last_state (batch, dim, N), checkpoints (batch, n_chunks, blocks, N, W) or empty).
std::vector<at::Tensor> scan_forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                     const at::Tensor& B, const at::Tensor& C,
                                     const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                     const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                     int64_t chunk, bool save_checkpoints) {
  check_inputs(u, delta, A, B, C, D, z, delta_bias, chunk);
  const Geometry geo(u, A, B, chunk);
  const at::Tensor Bt = B.transpose(2, 3).contiguous();  // (batch, G, L, N): B_t[n] rows per step
  const at::Tensor Ct = C.transpose(2, 3).contiguous();
  at::Tensor out = pooled_empty(u.sizes(), u.options());  // contiguous, whatever u's layout
  at::Tensor last = at::empty({geo.batch, geo.dim, geo.N}, u.options());
  at::Tensor ckpt = save_checkpoints ? pooled_empty({geo.batch, geo.n_chunks, geo.blocks, geo.N, W}, u.options())
                                     : at::empty({0}, u.options());

  const Seq u_s(u), delta_s(delta), z_s = z.has_value() && z->defined() ? Seq(*z) : Seq();
  const float *A_p = A.data_ptr<float>(), *Bt_p = Bt.data_ptr<float>(), *Ct_p = Ct.data_ptr<float>();
  const float *D_p = data_or_null(D), *bias_p = data_or_null(delta_bias);
  float *out_p = out.data_ptr<float>(), *last_p = last.data_ptr<float>();
  float* ckpt_p = save_checkpoints ? ckpt.data_ptr<float>() : nullptr;
  const int64_t L = geo.L, N = geo.N;

  parallel_items(geo.batch * geo.blocks, at::get_num_threads(), [&](int64_t, const auto& claim) {
    AlignedFloats dt(L * W), ut(L * W), yt(L * W), zt(z_s ? L * W : 0), A2(N * W), last_lanes(N * W);
    for (int64_t index = claim(), next; index >= 0; index = next) {
      next = claim();
      RowPrefetcher prefetch;
      if (next >= 0) {
        const Item upcoming(geo, next);
        for (const Seq* p : {&delta_s, &u_s, &z_s})
          if (*p) prefetch.add(*p, upcoming.b, upcoming.d0, upcoming.rows, L);
      }
      const Item it(geo, index);
      const int64_t row0 = (it.b * geo.dim + it.d0) * L;  // first row of this block in the output
      const Vec bias = lanes_of(bias_p, it);
      load_tile(delta_s, it.b, it.d0, it.rows, L, dt.data);
      load_tile(u_s, it.b, it.d0, it.rows, L, ut.data);
      if (z_s) load_tile(z_s, it.b, it.d0, it.rows, L, zt.data);
      const DtRange range = prepare_tiles(dt.data, z_s ? zt.data : nullptr, L, bias, delta_softplus, nullptr);
      state_lanes(A_p, N, it, kLog2e, A2.data);

      const BlockScan scan{L, geo.chunk, static_cast<int>(N), Bt_p + (it.b * geo.groups + it.group) * L * N,
                           Ct_p + (it.b * geo.groups + it.group) * L * N, A2.data,
                           ckpt_p ? ckpt_p + (it.b * geo.n_chunks * geo.blocks + it.block) * N * W : nullptr,
                           geo.blocks * N * W, next >= 0 ? &prefetch : nullptr,
                           prefetch.lines_per_step(L * 3 / 4)};  // all requested by 3/4 of the scan
      const Vec Dv = lanes_of(D_p, it);
      dispatch(N, exp_args_in_range(range, A2.data, N), [&](auto ns, auto safe) {
        forward_block<decltype(ns)::value, decltype(safe)::value>(scan, dt.data, ut.data, z_s ? zt.data : nullptr, Dv,
                                                                  yt.data, last_lanes.data);
      });
      tile_to_rows(yt.data, it.rows, L, out_p + row0, L);
      for (int c = 0; c < it.rows; ++c)
        for (int64_t n = 0; n < N; ++n) last_p[((it.b * geo.dim) + it.d0 + c) * N + n] = last_lanes.data[n * W + c];
    }
  });
  return {out, last, ckpt};
}

// Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); the last three are undefined (None) when
// the corresponding input was absent. dB, dC have B's (batch, G, N, L) shape.
std::vector<at::Tensor> scan_backward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                      const at::Tensor& B, const at::Tensor& C,
                                      const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                      const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                      int64_t chunk, const at::Tensor& ckpt, const at::Tensor& dout,
                                      const std::optional<at::Tensor>& dlast) {
  check_inputs(u, delta, A, B, C, D, z, delta_bias, chunk);
  const Geometry geo(u, A, B, chunk);
  TORCH_CHECK(ckpt.dim() == 5 && ckpt.size(0) == geo.batch && ckpt.size(1) == geo.n_chunks &&
                  ckpt.size(2) == geo.blocks && ckpt.size(3) == geo.N && ckpt.size(4) == W && ckpt.is_contiguous(),
              "meteor selective scan backward: checkpoints do not match the inputs (was chunk changed, or were "
              "they made by another instruction-set build?)");
  TORCH_CHECK(dout.sizes() == u.sizes() && dout.scalar_type() == at::kFloat && sequence_layout_ok(dout),
              "meteor selective scan backward: dout must be a float32 tensor shaped like u, time- or channel-contiguous");
  const float* dlast_p = data_or_null(dlast);
  if (dlast_p)
    TORCH_CHECK(dlast->dim() == 3 && dlast->size(0) == geo.batch && dlast->size(1) == geo.dim &&
                    dlast->size(2) == geo.N && dlast->is_contiguous(),
                "meteor selective scan backward: dlast must be contiguous (batch, dim, N)");

  const int64_t L = geo.L, N = geo.N, n_items = geo.batch * geo.blocks;
  const int workers = at::get_num_threads();
  const at::Tensor Bt = B.transpose(2, 3).contiguous();
  const at::Tensor Ct = C.transpose(2, 3).contiguous();
  const auto f32 = u.options();
  at::Tensor du = pooled_empty(u.sizes(), f32), ddelta = pooled_empty(u.sizes(), f32);
  const bool has_z = z.has_value() && z->defined();
  at::Tensor dz = has_z ? pooled_empty(u.sizes(), f32) : at::Tensor();
  // dB, dC sum over channels, which several workers handle at once: one buffer per worker.
  at::Tensor dBt_w = at::zeros({workers, geo.batch, geo.groups, L, N}, f32);
  at::Tensor dCt_w = at::zeros({workers, geo.batch, geo.groups, L, N}, f32);
  // dA, dD, ddelta_bias sum over the batch: one slot per (batch, block), summed afterwards.
  at::Tensor dA_b = at::empty({geo.batch, geo.blocks, N, W}, f32);
  at::Tensor dD_b = at::empty({geo.batch, geo.blocks, W}, f32);
  at::Tensor dbias_b = at::empty({geo.batch, geo.blocks, W}, f32);

  const Seq u_s(u), delta_s(delta), dout_s(dout), z_s = has_z ? Seq(*z) : Seq();
  const float *A_p = A.data_ptr<float>(), *Bt_p = Bt.data_ptr<float>(), *Ct_p = Ct.data_ptr<float>();
  const float *D_p = data_or_null(D), *bias_p = data_or_null(delta_bias);
  const float* ckpt_p = ckpt.data_ptr<float>();
  float *du_p = du.data_ptr<float>(), *ddelta_p = ddelta.data_ptr<float>(), *dz_p = has_z ? dz.data_ptr<float>() : nullptr;
  float *dBt_p = dBt_w.data_ptr<float>(), *dCt_p = dCt_w.data_ptr<float>();
  float *dA_p = dA_b.data_ptr<float>(), *dD_p = dD_b.data_ptr<float>(), *dbias_p = dbias_b.data_ptr<float>();

  parallel_items(n_items, workers, [&](int64_t worker, const auto& claim) {
    AlignedFloats dt(L * W), ut(L * W), sig(delta_softplus ? L * W : 0), go(L * W), gz(has_z ? L * W : 0);
    AlignedFloats decay(geo.chunk * N * W), states((geo.chunk + 1) * N * W);
    AlignedFloats A2(N * W), Ar(N * W), dlast_lanes(N * W);
    for (int64_t index = claim(), next; index >= 0; index = next) {
      next = claim();
      RowPrefetcher prefetch;
      if (next >= 0) {
        const Item upcoming(geo, next);
        for (const Seq* p : {&delta_s, &u_s, &dout_s, &z_s})
          if (*p) prefetch.add(*p, upcoming.b, upcoming.d0, upcoming.rows, L);
      }
      const Item it(geo, index);
      const int64_t row0 = (it.b * geo.dim + it.d0) * L;
      load_tile(delta_s, it.b, it.d0, it.rows, L, dt.data);
      const DtRange range =
          prepare_tiles(dt.data, nullptr, L, lanes_of(bias_p, it), delta_softplus, delta_softplus ? sig.data : nullptr);
      load_tile(u_s, it.b, it.d0, it.rows, L, ut.data);
      load_tile(dout_s, it.b, it.d0, it.rows, L, go.data);
      if (has_z) {
        // out = o * silu(z): dL/do = dout * silu(z) and dL/dz = dout * o * silu'(z); o is rebuilt in
        // the recompute, so keep dout * silu'(z) until then.
        load_tile(z_s, it.b, it.d0, it.rows, L, gz.data);
        by_fours(L, [&](int64_t t, auto k) __attribute__((always_inline)) {
          constexpr int K = decltype(k)::value;
          const Pack<K> zz = load_pack<K>(gz.data + t * W), g = load_pack<K>(go.data + t * W);
          const Pack<K> sz = sigmoid_from(zz, expv(neg_abs(zz)));
          store_pack(go.data + t * W, g * zz * sz);
          store_pack(gz.data + t * W, g * sz * fma(zz, broadcast<K>(splat(1.f)) - sz, splat(1.f)));
        });
      }
      state_lanes(A_p, N, it, kLog2e, A2.data);
      state_lanes(A_p, N, it, 1.f, Ar.data);
      if (dlast_p)
        for (int64_t n = 0; n < N; ++n)
          for (int c = 0; c < W; ++c)
            dlast_lanes.data[n * W + c] = c < it.rows ? dlast_p[(it.b * geo.dim + it.d0 + c) * N + n] : 0.f;

      const int64_t bg = (it.b * geo.groups + it.group) * L * N;  // this batch and group in (.., L, N)
      const BlockScan scan{L, geo.chunk, static_cast<int>(N), Bt_p + bg, Ct_p + bg, A2.data,
                           const_cast<float*>(ckpt_p) + (it.b * geo.n_chunks * geo.blocks + it.block) * N * W,
                           geo.blocks * N * W, next >= 0 ? &prefetch : nullptr,
                           prefetch.lines_per_step(L * 3 / 2)};  // two passes over time in the backward
      float* worker_dB = dBt_p + worker * geo.batch * geo.groups * L * N;
      float* worker_dC = dCt_p + worker * geo.batch * geo.groups * L * N;
      BlockGrads grads{Ar.data, lanes_of(D_p, it), go.data, dt.data, has_z ? gz.data : nullptr, decay.data,
                       states.data, dA_p + (it.b * geo.blocks + it.block) * N * W, worker_dB + bg, worker_dC + bg,
                       dlast_p ? dlast_lanes.data : nullptr, zeros()};
      dispatch(N, exp_args_in_range(range, A2.data, N), [&](auto ns, auto safe) {
        backward_block<decltype(ns)::value, decltype(safe)::value>(scan, ut.data, grads);
      });

      // dL/d(delta) = dL/d(dt) * softplus'(delta + bias); the bias gradient sums it over time.
      Vec dbias = zeros();
      for (int64_t t = 0; t < L; ++t) {
        Vec g = load(dt.data + t * W);
        if (delta_softplus) g = g * load(sig.data + t * W);
        store(dt.data + t * W, g);
        dbias = dbias + g;
      }
      store(dbias_p + (it.b * geo.blocks + it.block) * W, dbias);
      store(dD_p + (it.b * geo.blocks + it.block) * W, grads.dD);
      tile_to_rows(dt.data, it.rows, L, ddelta_p + row0, L);
      tile_to_rows(go.data, it.rows, L, du_p + row0, L);
      if (has_z) tile_to_rows(gz.data, it.rows, L, dz_p + row0, L);
    }
  });

  // Fold the per-batch lane slots back onto channels.
  const at::Tensor dA_blocks = dA_b.sum(0), dD_blocks = dD_b.sum(0), dbias_blocks = dbias_b.sum(0);
  at::Tensor dA = at::empty({geo.dim, N}, f32), dD_all = at::empty({geo.dim}, f32), dbias_all = at::empty({geo.dim}, f32);
  const float *dAb = dA_blocks.data_ptr<float>(), *dDb = dD_blocks.data_ptr<float>(), *dbb = dbias_blocks.data_ptr<float>();
  float *dA_out = dA.data_ptr<float>(), *dD_out = dD_all.data_ptr<float>(), *dbias_out = dbias_all.data_ptr<float>();
  for (int64_t block = 0; block < geo.blocks; ++block) {
    const Item it(geo, block);  // b = 0: only the channel mapping is used
    for (int c = 0; c < it.rows; ++c) {
      for (int64_t n = 0; n < N; ++n) dA_out[(it.d0 + c) * N + n] = dAb[(block * N + n) * W + c];
      dD_out[it.d0 + c] = dDb[block * W + c];
      dbias_out[it.d0 + c] = dbb[block * W + c];
    }
  }
  const at::Tensor dB = dBt_w.sum(0).transpose(2, 3).contiguous();  // (batch, G, N, L)
  const at::Tensor dC = dCt_w.sum(0).transpose(2, 3).contiguous();
  return {du, ddelta, dA, dB, dC, D_p ? dD_all : at::Tensor(), dz, bias_p ? dbias_all : at::Tensor()};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Mamba-1 selective scan, fused CPU kernels (see meteor/model/ops/selective_scan.py)";
  m.attr("isa") = METEOR_SCAN_ISA;  // the instruction set this build was compiled for
  m.attr("lanes") = W;              // floats per vector = channels per block
  m.def("forward", &scan_forward, "selective scan forward: (out, last_state, checkpoints)");
  m.def("release_cached_memory", [] { OutputPool::instance().release_all(); },
        "free the idle output blocks kept for reuse");
  m.def("backward", &scan_backward, "selective scan backward: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)");
}
