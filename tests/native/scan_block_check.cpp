// The selective-scan kernel's per-block arithmetic, checked without libtorch: this file includes the
// kernel source as it is and calls its block-level functions (exp2v, softplus, the tile preparation,
// the forward and backward recurrences for a specialised and a generic state size) on plain arrays,
// against double-precision references. tests/test_ops_native.py cross-compiles it for aarch64 (the
// kernel's NEON build: PyTorch's Vectorized<float> is a float32x4_t there) and runs it under qemu,
// which is how this project checks the ARM build without an ARM machine, and builds it natively with
// the avx2 and avx512 flags where the CPU runs them. Exit status 0 when every check passes; one line
// per check.

#include "selective_scan.cpp"

#include <cstdio>
#include <random>

namespace {

int failures = 0;

void report(const char* what, double error, double limit) {
  const bool ok = error <= limit;
  failures += !ok;
  std::printf("%-44s %-4s max error %.3g (limit %.3g)\n", what, ok ? "ok" : "FAIL", error, limit);
}

double softplus_ref(double x) { return x > 20 ? x : std::log1p(std::exp(x)); }

void check_exp2() {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> wide(-126.f, 127.f);  // where every build gives a normal float
  double worst = 0;
  for (int i = 0; i < 100000; ++i) {
    alignas(64) float x[W], y[W];
    for (int c = 0; c < W; ++c) x[c] = wide(rng);
    exp2v<false>(load(x)).store(y);
    for (int c = 0; c < W; ++c) {
      const double ref = std::exp2(static_cast<double>(x[c]));
      worst = std::max(worst, std::fabs(y[c] / ref - 1.0));
    }
  }
  report("exp2, relative, x in [-126, 127]", worst, 2e-7);
  alignas(64) float x[W], y[W];
  for (int c = 0; c < W; ++c) x[c] = NAN;
  exp2v<false>(load(x)).store(y);
  report("exp2 keeps NaN", std::isnan(y[0]) && std::isnan(y[W - 1]) ? 0.0 : 1.0, 0.0);
}

// softplus and the silu gate through prepare_tiles, as the forward uses them, on an (L, W) tile.
void check_tiles() {
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> spread(-15.f, 30.f);
  const int64_t L = 4003;  // not a multiple of four: by_fours' tail too
  AlignedFloats dt(L * W), z(L * W), dt0(L * W), z0(L * W);
  for (int64_t i = 0; i < L * W; ++i) dt0.data[i] = dt.data[i] = spread(rng), z0.data[i] = z.data[i] = spread(rng);
  // gates far out, where exp(-z) saturates or overflows: silu must stay finite (-0 to the left)
  const float far[] = {-90.f, 90.f, -200.f, 200.f, -1e30f, 1e30f, -3e38f, 3e38f};
  for (size_t i = 0; i < std::size(far); ++i) z0.data[i] = z.data[i] = far[i];
  alignas(64) float bias[W];
  for (int c = 0; c < W; ++c) bias[c] = 0.25f * c - 0.5f;
  prepare_tiles(dt.data, z.data, L, load(bias), true, nullptr);
  double worst_sp = 0, worst_gate = 0;
  for (int64_t i = 0; i < L * W; ++i) {
    const double x = static_cast<double>(dt0.data[i]) + bias[i % W], s = softplus_ref(x);
    worst_sp = std::max(worst_sp, std::fabs(dt.data[i] - s) / s);
    const double zz = z0.data[i], g = zz < -700 ? 0.0 : zz / (1 + std::exp(-zz));
    worst_gate = std::max(worst_gate, std::fabs(z.data[i] - g) / std::max(1.0, std::fabs(g)));
  }
  // softplus relative 2e-6: exp of a float argument near -15 carries that argument's own rounding (~1e-6)
  report("softplus(delta + bias), relative", worst_sp, 2e-6);
  report("silu(z), relative (absolute below 1)", worst_gate, 1e-6);
}

// forward_block against h_t = exp(dt A) h + dt B u, y = C h, out = (y + D u) silu(z), in doubles.
template <int NS>
void check_forward(int N, const char* what) {
  std::mt19937 rng(3 + N);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> dts(0.001f, 0.5f);
  const int64_t L = 37, chunk = 16, n_chunks = (L + chunk - 1) / chunk;
  AlignedFloats dt(L * W), u(L * W), gate(L * W), out(L * W), Bt(L * N), Ct(L * N), A2(N * W), last(N * W),
      ckpt(n_chunks * N * W);
  std::vector<double> A(N * W);
  for (int64_t i = 0; i < L * W; ++i) dt.data[i] = dts(rng), u.data[i] = normal(rng), gate.data[i] = normal(rng);
  for (int64_t i = 0; i < L * N; ++i) Bt.data[i] = normal(rng), Ct.data[i] = normal(rng);
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < W; ++c) A[n * W + c] = -(n + 1) * (0.5 + 0.1 * c), A2.data[n * W + c] = A[n * W + c] * kLog2e;
  alignas(64) float D[W];
  for (int c = 0; c < W; ++c) D[c] = 0.5f + c;
  const BlockScan scan{L, chunk, N, Bt.data, Ct.data, A2.data, ckpt.data, N * W, nullptr, 0};
  forward_block<NS, false>(scan, dt.data, u.data, gate.data, load(D), out.data, last.data);
  double worst = 0, worst_ckpt = 0;
  for (int c = 0; c < W; ++c) {
    std::vector<double> h(N, 0.0);
    for (int64_t t = 0; t < L; ++t) {
      if (t % chunk == 0)
        for (int n = 0; n < N; ++n)
          worst_ckpt = std::max(worst_ckpt, std::fabs(ckpt.data[(t / chunk) * N * W + n * W + c] - h[n]));
      const double d = dt.data[t * W + c], uu = u.data[t * W + c];
      double y = 0;
      for (int n = 0; n < N; ++n) {
        h[n] = std::exp(d * A[n * W + c]) * h[n] + d * Bt.data[t * N + n] * uu;
        y += Ct.data[t * N + n] * h[n];
      }
      const double o = (y + D[c] * uu) * gate.data[t * W + c];
      worst = std::max(worst, std::fabs(out.data[t * W + c] - o) / std::max(1.0, std::fabs(o)));
    }
    for (int n = 0; n < N; ++n) worst = std::max(worst, std::fabs(last.data[n * W + c] - h[n]));
  }
  report(what, worst, 2e-5);
  report("  its checkpoints", worst_ckpt, 2e-5);
}


// backward_block (without the z gate, which scan_backward folds in around it) against reverse-mode
// derivatives of the same recurrence in doubles, for the loss sum_t,c go[t, c] * out[t, c].
template <int NS>
void check_backward(int N, const char* what) {
  std::mt19937 rng(7 + N);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> dts(0.001f, 0.5f);
  const int64_t L = 37, chunk = 16, n_chunks = (L + chunk - 1) / chunk;
  AlignedFloats dt(L * W), dt_in(L * W), u(L * W), go(L * W), go_in(L * W), out(L * W), Bt(L * N), Ct(L * N),
      A2(N * W), Ar(N * W), last(N * W), ckpt(n_chunks * N * W), decay(chunk * N * W), states((chunk + 1) * N * W),
      dA(N * W), dBt(L * N), dCt(L * N);
  for (int64_t i = 0; i < L * W; ++i) dt_in.data[i] = dt.data[i] = dts(rng), u.data[i] = normal(rng),
                                      go_in.data[i] = go.data[i] = normal(rng);
  for (int64_t i = 0; i < L * N; ++i) Bt.data[i] = normal(rng), Ct.data[i] = normal(rng), dBt.data[i] = dCt.data[i] = 0;
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < W; ++c) Ar.data[n * W + c] = -(n + 1) * (0.5f + 0.1f * c), A2.data[n * W + c] = Ar.data[n * W + c] * kLog2e;
  alignas(64) float D[W], dD[W];
  for (int c = 0; c < W; ++c) D[c] = 0.5f + c;
  const BlockScan scan{L, chunk, N, Bt.data, Ct.data, A2.data, ckpt.data, N * W, nullptr, 0};
  forward_block<NS, false>(scan, dt.data, u.data, nullptr, load(D), out.data, last.data);
  BlockGrads g{Ar.data, load(D), go.data, dt.data, nullptr, decay.data, states.data, dA.data, dBt.data, dCt.data,
               nullptr, zeros()};
  backward_block<NS, false>(scan, u.data, g);
  g.dD.store(dD);

  double worst = 0;
  const auto compare = [&](double got, double want) {
    worst = std::max(worst, std::fabs(got - want) / std::max(1.0, std::fabs(want)));
  };
  std::vector<double> ref_dB(L * N, 0.0), ref_dC(L * N, 0.0);
  for (int c = 0; c < W; ++c) {
    std::vector<double> h((L + 1) * N, 0.0), a(L * N);  // h[(t + 1) * N + n] = h_t[n]
    for (int64_t t = 0; t < L; ++t)
      for (int n = 0; n < N; ++n) {
        a[t * N + n] = std::exp(double(dt_in.data[t * W + c]) * Ar.data[n * W + c]);
        h[(t + 1) * N + n] = a[t * N + n] * h[t * N + n] + double(dt_in.data[t * W + c]) * Bt.data[t * N + n] * u.data[t * W + c];
      }
    std::vector<double> carry(N, 0.0), ref_dA(N, 0.0);
    double ref_dD = 0;
    for (int64_t t = L - 1; t >= 0; --t) {
      const double gy = go_in.data[t * W + c], d = dt_in.data[t * W + c], uu = u.data[t * W + c];
      double ddt = 0, du = gy * D[c];
      for (int n = 0; n < N; ++n) {
        const double gh = gy * Ct.data[t * N + n] + carry[n], q = gh * h[t * N + n] * a[t * N + n];
        ref_dA[n] += q * d;
        ddt += q * Ar.data[n * W + c] + gh * Bt.data[t * N + n] * uu;
        du += gh * d * Bt.data[t * N + n];
        ref_dB[t * N + n] += gh * d * uu;
        ref_dC[t * N + n] += gy * h[(t + 1) * N + n];
        carry[n] = gh * a[t * N + n];
      }
      ref_dD += gy * uu;
      compare(go.data[t * W + c], du);
      compare(dt.data[t * W + c], ddt);
    }
    for (int n = 0; n < N; ++n) compare(dA.data[n * W + c], ref_dA[n]);
    compare(dD[c], ref_dD);
  }
  for (int64_t i = 0; i < L * N; ++i) compare(dBt.data[i], ref_dB[i]), compare(dCt.data[i], ref_dC[i]);
  report(what, worst, 5e-5);
}

}  // namespace

int main() {
  std::printf("build %s, %d lanes\n", METEOR_SCAN_ISA, W);
  check_exp2();
  check_tiles();
  check_forward<16>(16, "forward recurrence, N = 16 (unrolled)");
  check_forward<0>(5, "forward recurrence, N = 5 (generic)");
  check_backward<16>(16, "backward: du, ddt, dA, dB, dC, dD, N = 16");
  check_backward<0>(5, "backward, N = 5 (generic)");
  return failures ? 1 : 0;
}
