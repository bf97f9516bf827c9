// Philox-4x32-10 dropout mask, bit-identical to Triton's `tl.rand(seed, offset)` for int32
// offsets, i.e. to kernels/dropout.py's `dropout_keep`: element (m, k) of an M x K input is
// kept when rand(seed, m * K + k) >= p. Every kernel (forward shrink, backward dx and dA)
// calls `dropout_keep` with the same seed and numbering, so backward regenerates the
// forward's mask; the mask is never stored.
//
// Plain C++ when not compiled by nvcc, so tests can check it on a CPU against Triton.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PF_HD __host__ __device__ __forceinline__
#else
#define PF_HD inline
#endif

namespace peft_fast {

PF_HD uint32_t umulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First output word of Philox-4x32 with 10 rounds on counter (c0, 0, 0, 0) and the 64-bit
// key `seed`, as triton.language.random.randint.
PF_HD uint32_t philox_first(uint64_t seed, uint32_t c0) {
  uint32_t c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffu);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = umulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = umulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Uniform float in [0, 1) from 32 random bits, as triton.language.random.uint_to_uniform_float.
PF_HD float uint_to_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// True when element `index` (row-major m * K + k over the logical input) is kept.
PF_HD bool dropout_keep(uint64_t seed, int64_t index, float p) {
  return uint_to_uniform(philox_first(seed, static_cast<uint32_t>(index))) >= p;
}

}  // namespace peft_fast
