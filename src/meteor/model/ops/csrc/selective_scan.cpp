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
// Why it is organised this way (figures in /work/shared/PERFORMANCE.md):
//  * The scan is compute-bound (~2.4 GFLOP at the FGF shape, dominated by the exp) and batch x channels
//    already gives hundreds of independent recurrences for 2 cores, so time stays sequential. We
//    vectorise over 16 neighbouring channels: one 16-float vector per state n, all N states of a block
//    held in registers, and B_t[n], C_t[n] are scalars broadcast to all lanes, so the forward needs no
//    horizontal sums.
//  * Contiguous inputs run along time per channel. Each 16-channel block is transposed once (16x16
//    in-register transposes) into an (L, 16) "tile" that stays in L2, and results are transposed back
//    at the end; channel-contiguous inputs are copied into the tile as they are. Elementwise work
//    (bias, softplus, D, z gating) is done on the tiles, fused with those passes.
//  * Outputs come from a small pool of reused blocks (OutputPool): fresh 66 MB tensors cost more in
//    page faults than the rest of the forward's overhead.
//  * exp(x) = 2^(x log2 e): a degree-5 polynomial of the fraction, the exponent applied with vscalefps.
//  * The forward stores the state every `chunk` steps. The backward recomputes one chunk at a time from
//    its checkpoint (decays and states into a small buffer), then runs the adjoint recurrence in
//    reverse, so nothing of size (batch, dim, L, N) is ever stored.
//  * dB and dC sum over channels: each reverse step reduces 16 lane-vectors with a shuffle tree into
//    one vector over n, accumulated into a per-thread (L, N) buffer, summed over threads at the end.
//
// Build: JIT-compiled by meteor/ops/_build.py with -O3 -march=native -fopenmp -ffp-contract=fast.
// Without AVX-512 (or with -DMETEOR_SCAN_PORTABLE) the same code uses GCC's generic vectors and a
// bit-manipulation exp; only exp2v() differs between the two.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <optional>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512DQ__) && !defined(METEOR_SCAN_PORTABLE)
#include <immintrin.h>
#define METEOR_SCAN_AVX512 1
#endif

#define INLINE inline __attribute__((always_inline))

namespace {

constexpr int W = 16;                  // lanes per vector = channels per block
constexpr int kMaxGenericState = 256;  // N beyond the specialised sizes runs the generic loop
constexpr float kLog2e = 1.4426950408889634f;

typedef float V __attribute__((vector_size(64), __may_alias__));
typedef float Vu __attribute__((vector_size(64), aligned(4), __may_alias__));  // unaligned access
typedef int32_t VI __attribute__((vector_size(64), __may_alias__));

inline V load(const float* p) { return *reinterpret_cast<const V*>(p); }  // p 64-byte aligned
inline void store(float* p, V v) { *reinterpret_cast<V*>(p) = v; }
inline V loadu(const float* p) { return *reinterpret_cast<const Vu*>(p); }
inline void storeu(float* p, V v) { *reinterpret_cast<Vu*>(p) = v; }
inline V splat(float x) { return V{} + x; }
inline V vabs(V x) { return (V)((VI)x & 0x7fffffff); }
inline V vmax0(V x) { return x > V{} ? x : V{}; }

// ---------------------------------------------------------------------------------------------
// exp and friends

// 2^f for f in [0, 1): minimax polynomial for the relative error, max 1.6e-7 after float32
// rounding (about 1.3 ulp; mamba's CUDA kernel uses the hardware exp2f approximation, ~2 ulp).
INLINE V exp2_fraction(V f) {
  V p = splat(0.0018775767f);
  p = p * f + 0.00898934f;
  p = p * f + 0.055826318f;
  p = p * f + 0.24015361f;
  p = p * f + 0.6931531f;
  return p * f + 0.99999994f;
}

INLINE V exp2v(V x) {
#ifdef METEOR_SCAN_AVX512
  // vreduceps gives x - floor(x) in one instruction and vscalefps multiplies by 2^floor(x) with
  // correct saturation to 0 and inf, so no clamping is needed: 7 instructions per 16 exps.
  const __m512 xm = (__m512)x;
  const V f = (V)_mm512_reduce_ps(xm, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  return (V)_mm512_scalef_ps((__m512)exp2_fraction(f), xm);
#else
  // Portable: split x = k + f by truncation and correction, build 2^k in the exponent bits.
  // Below -127 the result flushes to 0 (true value < 6e-39); above 128 it is inf.
  V xc = x < splat(-127.f) ? splat(-127.f) : x;
  xc = xc > splat(128.f) ? splat(128.f) : xc;
  VI k = __builtin_convertvector(xc, VI);
  k += (VI)(__builtin_convertvector(k, V) > xc);  // truncation rounded up a negative x: k -= 1
  const V f = xc - __builtin_convertvector(k, V);
  return exp2_fraction(f) * (V)((k + 127) << 23);
#endif
}

inline V expv(V x) { return exp2v(x * kLog2e); }

// 1 / x to about 1 ulp: rcp14 and one Newton step. A vdivps would stall the elementwise loops.
INLINE V reciprocal(V x) {
#ifdef METEOR_SCAN_AVX512
  const V r = (V)_mm512_rcp14_ps((__m512)x);
  return r + r * (1.f - x * r);
#else
  return 1.f / x;
#endif
}

// log(1 + e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) <= 1/3, series to s^13 (rel. err 1e-8).
inline V log1p_unit(V e) {
  const V s = e * reciprocal(e + 2.f);
  const V s2 = s * s;
  V p = splat(1.f / 13.f);
  p = p * s2 + 1.f / 11.f;
  p = p * s2 + 1.f / 9.f;
  p = p * s2 + 1.f / 7.f;
  p = p * s2 + 1.f / 5.f;
  p = p * s2 + 1.f / 3.f;
  p = p * s2 + 1.f;
  return 2.f * s * p;
}

// sigmoid(x) from e = exp(-|x|), stable for any x.
inline V sigmoid_from(V x, V e) {
  const V r = reciprocal(1.f + e);
  return x >= V{} ? r : e * r;
}

// ---------------------------------------------------------------------------------------------
// Register shuffles: 16x16 transpose and "lane sums" (lane j of the result = sum of vector j)

template <int S, bool Second>
constexpr int transpose_index(int j) {
  // One stage swaps the off-diagonal S x S blocks of each 2S x 2S block (indices >= 16 pick b).
  return Second ? ((j & S) ? 16 + j : j + S) : ((j & S) ? 16 + j - S : j);
}
template <int S, bool Second, size_t... J>
constexpr VI transpose_mask(std::index_sequence<J...>) {
  return VI{transpose_index<S, Second>(static_cast<int>(J))...};
}

template <int S>
inline void transpose_stage(V* r) {
  constexpr VI first = transpose_mask<S, false>(std::make_index_sequence<W>{});
  constexpr VI second = transpose_mask<S, true>(std::make_index_sequence<W>{});
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) {
    if (i & S) continue;
    const V a = r[i], b = r[i + S];
    r[i] = __builtin_shuffle(a, b, first);
    r[i + S] = __builtin_shuffle(a, b, second);
  }
}

inline void transpose16(V* r) {
  transpose_stage<8>(r);
  transpose_stage<4>(r);
  transpose_stage<2>(r);
  transpose_stage<1>(r);
}

template <int H, bool High>
constexpr int lane_sum_index(int j) {
  // Inputs x, y each hold 16 / (2H) partial sums of width 2H; the output holds twice as many of
  // width H: groups from x first, then from y; `High` picks the upper half of each width-2H group.
  const int per = 8 / H, g = j / H, w = j % H;
  return (g < per ? 0 : 16) + (g % per) * 2 * H + w + (High ? H : 0);
}
template <int H, bool High, size_t... J>
constexpr VI lane_sum_mask(std::index_sequence<J...>) {
  return VI{lane_sum_index<H, High>(static_cast<int>(J))...};
}
template <int H>
INLINE V lane_sum_stage(V x, V y) {
  constexpr VI lo = lane_sum_mask<H, false>(std::make_index_sequence<W>{});
  constexpr VI hi = lane_sum_mask<H, true>(std::make_index_sequence<W>{});
  return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, hi);
}

// Feeds vectors 0..15 one at a time and combines pairs as soon as they exist, so at most five
// partial vectors are live (the reverse loop already holds N carried adjoints in registers).
struct LaneSums16 {
  V pending, l1[2], l2[2], l3[2], result;
  INLINE void push(int n, V w) {  // n is a compile-time constant after unrolling
    if (!(n & 1)) { pending = w; return; }
    l1[(n >> 1) & 1] = lane_sum_stage<8>(pending, w);
    if ((n & 3) != 3) return;
    l2[(n >> 2) & 1] = lane_sum_stage<4>(l1[0], l1[1]);
    if ((n & 7) != 7) return;
    l3[(n >> 3) & 1] = lane_sum_stage<2>(l2[0], l2[1]);
    if (n == 15) result = lane_sum_stage<1>(l3[0], l3[1]);
  }
};

// Adds the lane sums of w[0..N) into acc[0..N): the shuffle tree per 16 states (zero-padded).
inline void add_lane_sums(const V* w, int N, float* acc) {
  for (int n0 = 0; n0 < N; n0 += W) {
    LaneSums16 sums;
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) sums.push(i, n0 + i < N ? w[n0 + i] : V{});
    if (N - n0 >= W) {
      storeu(acc + n0, loadu(acc + n0) + sums.result);
    } else {
      for (int i = 0; i < N - n0; ++i) acc[n0 + i] += sums.result[i];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tiles: (rows <= 16, L) slices of a (.., dim, L) tensor  <->  (L, 16) time-major buffers

void rows_to_tile(const float* src, int64_t stride, int rows, int64_t L, float* tile) {
  int64_t t = 0;
  if (rows == W) {
    for (; t + W <= L; t += W) {
      V r[W];
      for (int c = 0; c < W; ++c) r[c] = loadu(src + c * stride + t);
      transpose16(r);
      for (int j = 0; j < W; ++j) store(tile + (t + j) * W, r[j]);
    }
  }
  for (; t < L; ++t)  // ragged end of time, and blocks narrower than 16 (padded with zeros)
    for (int c = 0; c < W; ++c) tile[t * W + c] = c < rows ? src[c * stride + t] : 0.f;
}

void tile_to_rows(const float* tile, int rows, int64_t L, float* dst, int64_t stride) {
  int64_t t = 0;
  if (rows == W) {
    for (; t + W <= L; t += W) {
      V r[W];
      for (int j = 0; j < W; ++j) r[j] = load(tile + (t + j) * W);
      transpose16(r);
      for (int c = 0; c < W; ++c) storeu(dst + c * stride + t, r[c]);
    }
  }
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

// The (L, 16) tile of channels [d0, d0 + rows) of batch b; absent channels read as 0.
void load_tile(const Seq& s, int64_t b, int64_t d0, int rows, int64_t L, float* tile) {
  const float* src = s.block(b, d0);
  if (s.time_major()) return rows_to_tile(src, s.stride_d, rows, L, tile);
  for (int64_t t = 0; t < L; ++t) {
    const float* step = src + t * s.stride_t;
    if (rows == W) {
      store(tile + t * W, loadu(step));
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

// One work item: batch b, a block of up to 16 channels that all belong to one group of B / C.
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
V lanes_of(const float* p, const Item& it) {
  V v{};
  if (p)
    for (int c = 0; c < it.rows; ++c) v[c] = p[it.d0 + c];
  return v;
}

// (N, 16) lanes of A for this block, optionally scaled (by log2 e, for exp2v).
void state_lanes(const float* A, int64_t N, const Item& it, float scale, float* out) {
  for (int64_t n = 0; n < N; ++n)
    for (int c = 0; c < W; ++c) out[n * W + c] = c < it.rows ? A[(it.d0 + c) * N + n] * scale : 0.f;
}

// dt = softplus(delta + bias) in place on an (L, 16) tile; sig = its derivative sigmoid(delta + bias).
// The formula max(x, 0) + log1p(exp(-|x|)) equals torch's softplus (threshold 20) to float32 rounding.
void prepare_dt(float* dt, int64_t L, V bias, bool softplus, float* sig) {
  for (int64_t t = 0; t < L; ++t) {
    V x = load(dt + t * W) + bias;
    if (softplus) {
      const V e = expv(-vabs(x));
      if (sig) store(sig + t * W, sigmoid_from(x, e));
      x = vmax0(x) + log1p_unit(e);
    }
    store(dt + t * W, x);
  }
}

// Runs body(worker, claim) once per worker; claim() hands out item indices until none are left (-1).
// Items come from a shared counter rather than a static split: the machine is shared, and a worker
// that loses its core for a while should not leave the other idle at the end.
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
// Loading them only when the next item starts leaves the core waiting on DRAM: 16 rows per operand
// are more streams than the hardware prefetcher runs far enough ahead, and a channel-contiguous
// operand is one cache line per step, kilobytes apart, which it does not follow at all. Measured:
// 5-10% of the single-threaded forward at the FGF shape. (Loading and prefetching chunk by chunk
// instead was tried: slower for contiguous inputs, no better for channel-contiguous ones.)
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
  const float* A2;  // (N, 16) A * log2(e)
  float* ckpt;      // state before chunk k at ckpt + k * ckpt_stride, (N, 16)
  int64_t ckpt_stride;
  RowPrefetcher* prefetch;  // the next item's inputs, or null
  int prefetch_lines;       // cache lines to request per time step
};

template <int NS>
void forward_block(const BlockScan& s, const float* dt, const float* u, float* y, float* last) {
  const int N = NS > 0 ? NS : s.N;
  V h[NS > 0 ? NS : kMaxGenericState];
  for (int n = 0; n < N; ++n) h[n] = V{};
  for (int64_t t0 = 0, k = 0; t0 < s.L; t0 += s.chunk, ++k) {
    if (s.ckpt)
      for (int n = 0; n < N; ++n) store(s.ckpt + k * s.ckpt_stride + n * W, h[n]);
    const int64_t t1 = std::min(s.L, t0 + s.chunk);
    for (int64_t t = t0; t < t1; ++t) {
      if (s.prefetch) s.prefetch->step(s.prefetch_lines);
      const V d = load(dt + t * W);
      const V du = d * load(u + t * W);
      const float* Bn = s.Bt + t * N;
      const float* Cn = s.Ct + t * N;
      V y0{}, y1{};  // two accumulators: the sum over n is otherwise one long dependency chain
#pragma GCC unroll 16
      for (int n = 0; n < N; ++n) {
        const V a = exp2v(d * load(s.A2 + n * W));  // exp(dt * A)
        h[n] = a * h[n] + du * Bn[n];
        if (n & 1) y1 += h[n] * Cn[n]; else y0 += h[n] * Cn[n];
      }
      store(y + t * W, y0 + y1);
    }
  }
  for (int n = 0; n < N; ++n) store(last + n * W, h[n]);
}

struct BlockGrads {
  const float* Ar;  // (N, 16) A itself (the decay's derivative w.r.t. dt is A * decay)
  V D;              // per-lane D (zero if absent)
  float* go;        // (L, 16) in: dL/dy;              out: dL/du
  float* dt;        // (L, 16) in: dt;                 out: dL/d(dt)
  float* gz;        // (L, 16) in: dL/dout * silu'(z); out: dL/dz   (null without z)
  float* decay;     // (chunk, N, 16) scratch
  float* states;    // (chunk + 1, N, 16) scratch: the chunk's starting state, then h_t
  float* dA;        // (N, 16) out
  float* dBt;       // (L, N) accumulated
  float* dCt;       // (L, N) accumulated
  const float* dlast;  // (N, 16) or null
  V dD;             // out: sum_t dL/dy * u per lane
};

template <int NS>
void backward_block(const BlockScan& s, const float* u, BlockGrads& g) {
  const int N = NS > 0 ? NS : s.N;
  V carry[NS > 0 ? NS : kMaxGenericState];  // a_{t+1} * dL/dh_{t+1}: the adjoint flowing back in time
  V w[NS > 0 ? NS : kMaxGenericState];      // per-state vectors waiting for their lane sums
  V dA[NS > 0 ? NS : kMaxGenericState];
  for (int n = 0; n < N; ++n) {
    carry[n] = g.dlast ? load(g.dlast + n * W) : V{};
    dA[n] = V{};
  }
  V dD{};
  for (int64_t k = s.L > 0 ? (s.L - 1) / s.chunk : -1; k >= 0; --k) {
    const int64_t t0 = k * s.chunk, len = std::min(s.chunk, s.L - t0);

    // 1. Recompute the chunk from its checkpoint, keeping decays and states; dC and dz need the
    //    states and y, which are only available here.
    V h[NS > 0 ? NS : kMaxGenericState];
    for (int n = 0; n < N; ++n) {
      h[n] = load(s.ckpt + k * s.ckpt_stride + n * W);
      store(g.states + n * W, h[n]);
    }
    for (int64_t j = 0; j < len; ++j) {
      if (s.prefetch) s.prefetch->step(s.prefetch_lines);
      const int64_t t = t0 + j;
      const V d = load(g.dt + t * W), uu = load(u + t * W), du = d * uu, gy = load(g.go + t * W);
      const float* Bn = s.Bt + t * N;
      const float* Cn = s.Ct + t * N;
      float* a_out = g.decay + j * N * W;
      float* h_out = g.states + (j + 1) * N * W;
      V y0{}, y1{};
      LaneSums16 sums;
#pragma GCC unroll 16
      for (int n = 0; n < N; ++n) {
        const V a = exp2v(d * load(s.A2 + n * W));
        h[n] = a * h[n] + du * Bn[n];
        store(a_out + n * W, a);
        store(h_out + n * W, h[n]);
        if (n & 1) y1 += h[n] * Cn[n]; else y0 += h[n] * Cn[n];
        // dC_t[n] = sum over channels of dL/dy_t * h_t[n]
        if constexpr (NS == W) sums.push(n, gy * h[n]); else w[n] = gy * h[n];
      }
      if constexpr (NS == W) storeu(g.dCt + t * N, loadu(g.dCt + t * N) + sums.result);
      else add_lane_sums(w, N, g.dCt + t * N);
      if (g.gz) store(g.gz + t * W, load(g.gz + t * W) * (y0 + y1 + g.D * uu));
    }

    // 2. Adjoint recurrence, in reverse: gh = dL/dh_t = C_t dL/dy_t + a_{t+1} dL/dh_{t+1}.
    for (int64_t j = len - 1; j >= 0; --j) {
      if (s.prefetch) s.prefetch->step(s.prefetch_lines);
      const int64_t t = t0 + j;
      const V d = load(g.dt + t * W), uu = load(u + t * W), du = d * uu, gy = load(g.go + t * W);
      const float* Bn = s.Bt + t * N;
      const float* Cn = s.Ct + t * N;
      const float* a_in = g.decay + j * N * W;
      const float* hprev = g.states + j * N * W;
      V ddt0{}, ddt1{}, sb0{}, sb1{};
      LaneSums16 sums;
#pragma GCC unroll 16
      for (int n = 0; n < N; ++n) {
        const V a = load(a_in + n * W);
        const V gh = carry[n] + gy * Cn[n];
        const V q = gh * load(hprev + n * W) * a;  // dL/d(decay) * decay
        if (n & 1) {
          ddt1 += q * load(g.Ar + n * W);
          sb1 += gh * Bn[n];
        } else {
          ddt0 += q * load(g.Ar + n * W);
          sb0 += gh * Bn[n];
        }
        dA[n] += q * d;
        // dB_t[n] = sum over channels of dL/dh_t[n] * dt_t * u_t. For N = 16 the shuffle tree is fed
        // as we go, so the 16 products never need registers at the same time as the 16 carries.
        if constexpr (NS == W) sums.push(n, gh * du); else w[n] = gh * du;
        carry[n] = gh * a;
      }
      if constexpr (NS == W) storeu(g.dBt + t * N, loadu(g.dBt + t * N) + sums.result);
      else add_lane_sums(w, N, g.dBt + t * N);
      const V sb = sb0 + sb1;  // sum_n dL/dh_t[n] B_t[n]
      dD += gy * uu;
      store(g.go + t * W, gy * g.D + d * sb);
      store(g.dt + t * W, ddt0 + ddt1 + uu * sb);
    }
  }
  for (int n = 0; n < N; ++n) store(g.dA + n * W, dA[n]);
  g.dD = dD;
}

template <typename F>
void dispatch_state_size(int64_t N, const F& f) {
  switch (N) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
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

// Returns (out, last_state (batch, dim, N), checkpoints (batch, n_chunks, blocks, N, 16) or empty).
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
      load_tile(delta_s, it.b, it.d0, it.rows, L, dt.data);
      prepare_dt(dt.data, L, lanes_of(bias_p, it), delta_softplus, nullptr);
      load_tile(u_s, it.b, it.d0, it.rows, L, ut.data);
      state_lanes(A_p, N, it, kLog2e, A2.data);

      const BlockScan scan{L, geo.chunk, static_cast<int>(N), Bt_p + (it.b * geo.groups + it.group) * L * N,
                           Ct_p + (it.b * geo.groups + it.group) * L * N, A2.data,
                           ckpt_p ? ckpt_p + (it.b * geo.n_chunks * geo.blocks + it.block) * N * W : nullptr,
                           geo.blocks * N * W, next >= 0 ? &prefetch : nullptr,
                           prefetch.lines_per_step(L * 3 / 4)};  // all requested by 3/4 of the scan
      dispatch_state_size(N, [&](auto ns) { forward_block<decltype(ns)::value>(scan, dt.data, ut.data, yt.data, last_lanes.data); });

      // out = (y + D u) * silu(z), on the tile so the epilogue needs no ragged row ends.
      const V Dv = lanes_of(D_p, it);
      if (z_s) load_tile(z_s, it.b, it.d0, it.rows, L, zt.data);
      for (int64_t t = 0; t < L; ++t) {
        V o = load(yt.data + t * W) + Dv * load(ut.data + t * W);
        if (z_s) {
          const V zz = load(zt.data + t * W);
          o = o * zz * sigmoid_from(zz, expv(-vabs(zz)));
        }
        store(yt.data + t * W, o);
      }
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
              "meteor selective scan backward: checkpoints do not match the inputs (was chunk changed?)");
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
      prepare_dt(dt.data, L, lanes_of(bias_p, it), delta_softplus, delta_softplus ? sig.data : nullptr);
      load_tile(u_s, it.b, it.d0, it.rows, L, ut.data);
      load_tile(dout_s, it.b, it.d0, it.rows, L, go.data);
      if (has_z) {
        // out = o * silu(z): dL/do = dout * silu(z) and dL/dz = dout * o * silu'(z); o is rebuilt in
        // the recompute, so keep dout * silu'(z) until then.
        load_tile(z_s, it.b, it.d0, it.rows, L, gz.data);
        for (int64_t t = 0; t < L; ++t) {
          const V zz = load(gz.data + t * W), g = load(go.data + t * W);
          const V sz = sigmoid_from(zz, expv(-vabs(zz)));
          store(go.data + t * W, g * zz * sz);
          store(gz.data + t * W, g * sz * (1.f + zz * (1.f - sz)));
        }
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
                       dlast_p ? dlast_lanes.data : nullptr, V{}};
      dispatch_state_size(N, [&](auto ns) { backward_block<decltype(ns)::value>(scan, ut.data, grads); });

      // dL/d(delta) = dL/d(dt) * softplus'(delta + bias); the bias gradient sums it over time.
      V dbias{};
      for (int64_t t = 0; t < L; ++t) {
        V g = load(dt.data + t * W);
        if (delta_softplus) g = g * load(sig.data + t * W);
        store(dt.data + t * W, g);
        dbias += g;
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
  m.doc() = "Mamba-1 selective scan, fused CPU kernels (see meteor/ops/selective_scan.py)";
#ifdef METEOR_SCAN_AVX512
  m.attr("simd") = "avx512";
#else
  m.attr("simd") = "generic-vector";
#endif
  m.def("forward", &scan_forward, "selective scan forward: (out, last_state, checkpoints)");
  m.def("release_cached_memory", [] { OutputPool::instance().release_all(); },
        "free the idle output blocks kept for reuse");
  m.def("backward", &scan_backward, "selective scan backward: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)");
}
