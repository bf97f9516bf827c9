// Philox-4x32-10 dropout mask, bit-identical to kernels/dropout.py's `dropout_keep` (Triton's
// `tl.randint4x(seed, counter)`): element (m, k) of an M x K input takes 16 bits of the Philox
// output for counter m * ceil(K / 8) + k / 8 -- word (k % 8) / 2, its low half for even k and
// its high half for odd k -- and is kept when those bits u satisfy u >= p * 65536.
//
// The mask is drawn once per training step as *keep bytes*, an M x ceil(K / 8) uint8 tensor:
// byte (m, g) = `keep_byte(seed, m, g, K, p)`, bit j for element (m, 8g + j), one Philox
// evaluation per byte (the packing of kernels/dropout.py's `keep_bytes`). csrc/keep_bytes.cu
// draws them; the forward shrink, backward dx and dA read them (`keep_bits`), drawing nothing.
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

// The four output words of Philox-4x32 with 10 rounds on counter (c0, 0, 0, 0) and the 64-bit
// key `seed`, as triton.language.random.randint4x.
PF_HD void philox4(uint64_t seed, uint32_t c0, uint32_t& o0, uint32_t& o1, uint32_t& o2, uint32_t& o3) {
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
  o0 = c0;
  o1 = c1;
  o2 = c2;
  o3 = c3;
}

// True when element (m, k) of an M x `cols` input is kept (see the top of this file).
PF_HD bool dropout_keep(uint64_t seed, int64_t m, int64_t k, int64_t cols, float p) {
  uint32_t w0, w1, w2, w3;
  philox4(seed, static_cast<uint32_t>(m * ((cols + 7) / 8) + k / 8), w0, w1, w2, w3);
  // Selects, not an indexed array: a dynamically indexed array would live in local memory.
  const int word = static_cast<int>((k % 8) / 2);
  const uint32_t w = word == 0 ? w0 : word == 1 ? w1 : word == 2 ? w2 : w3;
  const uint32_t bits = (k % 2) ? (w >> 16) : (w & 0xffffu);
  return static_cast<float>(bits) >= p * 65536.f;
}

// The keep bits of the 8 elements k0 .. k0 + 7 of row m (k0 a multiple of 8), bit j for element
// k0 + j: one Philox evaluation for all eight, the same bits as dropout_keep.
PF_HD uint32_t dropout_keep8(uint64_t seed, int64_t m, int64_t k0, int64_t cols, float p) {
  uint32_t w[4];
  philox4(seed, static_cast<uint32_t>(m * ((cols + 7) / 8) + k0 / 8), w[0], w[1], w[2], w[3]);
  const float threshold = p * 65536.f;
  uint32_t bits = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t u = (j % 2) ? (w[j / 2] >> 16) : (w[j / 2] & 0xffffu);
    bits |= static_cast<uint32_t>(static_cast<float>(u) >= threshold) << j;
  }
  return bits;
}

// Keep byte g of row m: bits of elements 8g .. 8g + 7 (dropout_keep8), one Philox evaluation;
// 0xff without one when p is 0 (every element kept).
PF_HD uint8_t keep_byte(uint64_t seed, int64_t m, int64_t g, int64_t cols, float p) {
  return p > 0.f ? static_cast<uint8_t>(dropout_keep8(seed, m, 8 * g, cols, p)) : uint8_t{0xff};
}

// The keep bits of elements k, k + 1, ... of row m read from keep bytes `kb` (row stride
// `stride_kb`): bit v for element k + v, valid while (k % 8) + v < 8 (the rest of k's byte).
// No Philox; k must be < the input's columns.
PF_HD uint32_t keep_bits(const uint8_t* kb, int64_t stride_kb, int64_t m, int64_t k) {
  return static_cast<uint32_t>(kb[m * stride_kb + (k >> 3)]) >> (k & 7);
}

}  // namespace peft_fast
