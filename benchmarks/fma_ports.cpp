// How much other vector work slows 256-bit multiply-adds on this core: 8 independent multiply-add
// chains per loop iteration (enough to keep both multiply-add pipes busy at 4 cycles' latency), with
// and without the non-multiply instructions the AVX2 scan's exp uses beside them. Written in inline
// assembly so that the compiler can neither fold the extra instructions away nor merge the chains.
// docs/benchmarks.md ("Selective scan") cites its figures.
//
//   g++ -O2 -mavx2 -mfma -o /tmp/fma_ports benchmarks/fma_ports.cpp && /tmp/fma_ports
#include <chrono>
#include <cstdio>

#define FMAS                                                                                   \
  "vfmadd132ps %%ymm8, %%ymm9, %%ymm0\n vfmadd132ps %%ymm8, %%ymm9, %%ymm1\n"                  \
  "vfmadd132ps %%ymm8, %%ymm9, %%ymm2\n vfmadd132ps %%ymm8, %%ymm9, %%ymm3\n"                  \
  "vfmadd132ps %%ymm8, %%ymm9, %%ymm4\n vfmadd132ps %%ymm8, %%ymm9, %%ymm5\n"                  \
  "vfmadd132ps %%ymm8, %%ymm9, %%ymm6\n vfmadd132ps %%ymm8, %%ymm9, %%ymm7\n"

// Multiply-adds per second (8-wide) over `iters` iterations of FMAS followed by EXTRA.
#define CASE(NAME, EXTRA)                                                                      \
  {                                                                                            \
    static const float one[8] = {1, 1, 1, 1, 1, 1, 1, 1};                                      \
    static const float m[8] = {.999f, .999f, .999f, .999f, .999f, .999f, .999f, .999f};        \
    static const float c[8] = {1e-7f, 1e-7f, 1e-7f, 1e-7f, 1e-7f, 1e-7f, 1e-7f, 1e-7f};        \
    long n = iters;                                                                            \
    const auto t0 = std::chrono::steady_clock::now();                                          \
    asm volatile("vmovups (%1), %%ymm0\n vmovaps %%ymm0, %%ymm1\n vmovaps %%ymm0, %%ymm2\n"    \
                 "vmovaps %%ymm0, %%ymm3\n vmovaps %%ymm0, %%ymm4\n vmovaps %%ymm0, %%ymm5\n"  \
                 "vmovaps %%ymm0, %%ymm6\n vmovaps %%ymm0, %%ymm7\n vmovups (%2), %%ymm8\n"    \
                 "vmovups (%3), %%ymm9\n vmovaps %%ymm0, %%ymm10\n vmovaps %%ymm8, %%ymm11\n"  \
                 "1:\n" FMAS EXTRA "dec %0\n jnz 1b\n"                                         \
                 : "+r"(n)                                                                     \
                 : "r"(one), "r"(m), "r"(c)                                                    \
                 : "ymm0", "ymm1", "ymm2", "ymm3", "ymm4", "ymm5", "ymm6", "ymm7", "ymm8",     \
                   "ymm9", "ymm10", "ymm11", "ymm12", "ymm13", "ymm14", "ymm15", "cc");        \
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); \
    std::printf("%-58s %.2f G multiply-adds/s\n", NAME, 8.0 * iters / s / 1e9);               \
  }

#define X4(OP) OP " %%ymm10, %%ymm11, %%ymm12\n" OP " %%ymm11, %%ymm10, %%ymm13\n" \
               OP " %%ymm10, %%ymm11, %%ymm14\n" OP " %%ymm11, %%ymm10, %%ymm15\n"
#define U4(OP) OP " %%ymm10, %%ymm12\n" OP " %%ymm11, %%ymm13\n" OP " %%ymm10, %%ymm14\n" OP " %%ymm11, %%ymm15\n"

int main() {
  const long iters = 300000000;
  CASE("8 multiply-adds alone", "")
  CASE("+ 4 vmulps (a control: these do share the pipes)", X4("vmulps"))
  CASE("+ 4 vpaddd", X4("vpaddd"))
  CASE("+ 8 vpaddd", X4("vpaddd") X4("vpaddd"))
  CASE("+ 4 vcvttps2dq", U4("vcvttps2dq"))
  CASE("+ 8 vcvttps2dq", U4("vcvttps2dq") U4("vcvttps2dq"))
  CASE("+ 4 vpslld $23", U4("vpslld $23,"))
  CASE("+ 4 vroundps $1", U4("vroundps $1,"))
  CASE("+ 4 vsubps", X4("vsubps"))
  CASE("+ 16: 4 each of vroundps, vsubps, vcvttps2dq, vpaddd",
       U4("vroundps $1,") X4("vsubps") U4("vcvttps2dq") X4("vpaddd"))
  return 0;
}
