// Run-time SIMD dispatch for CPU kernels without -march=native in the shipped build.
//
// Usage: write the kernel body as a template function marked WAGLE_ALWAYS_INLINE, then call it
// from three thin wrappers tagged WAGLE_TARGET_AVX512 / WAGLE_TARGET_AVX2 / (none). GCC/Clang
// inline the body into each wrapper and vectorise it for that ISA; cpu_isa() picks one at run time.
#pragma once
#include <cstdlib>
#include <cstring>

#define WAGLE_ALWAYS_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) || defined(__i386__)
#define WAGLE_X86 1
#define WAGLE_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")))
#define WAGLE_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2,popcnt")))
#else
#define WAGLE_X86 0
#define WAGLE_TARGET_AVX512
#define WAGLE_TARGET_AVX2
#endif

namespace wagle {
namespace cpu {

enum class Isa : int { Default = 0, Avx2 = 1, Avx512 = 2 };

// WAGLE_CPU_ISA=default|avx2|avx512 caps the ISA (for tests of every path and for debugging).
inline Isa detect_isa() {
  Isa best = Isa::Default;
#if WAGLE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::Avx2;
  if (best == Isa::Avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::Avx512;
#endif
  if (const char* cap = std::getenv("WAGLE_CPU_ISA")) {
    Isa want = best;
    if (!std::strcmp(cap, "default")) want = Isa::Default;
    else if (!std::strcmp(cap, "avx2")) want = Isa::Avx2;
    else if (!std::strcmp(cap, "avx512")) want = Isa::Avx512;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}

// Read the environment on every call so tests can switch paths within one process.
inline Isa cpu_isa() { return detect_isa(); }

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "default";
  }
}

}  // namespace cpu
}  // namespace wagle
