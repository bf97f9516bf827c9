// What every peft_fast CUDA kernel file shares: element types, 16-byte vector access,
// rounding to an operand dtype, the current CUDA stream, launch checks, segment tables.
//
// Only CPU-side torch headers (ATen, c10/core) are used: no c10/cuda or ATen/cuda headers,
// so the files compile against a CPU build of torch too (CI's compile check), and the
// stream comes from the device-generic c10 guard interface.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "philox.h"

namespace peft_fast {

// ---- element types ---------------------------------------------------------------------

template <typename T> struct Elem;
template <> struct Elem<float> {
  using dev = float;
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <> struct Elem<at::Half> {
  using dev = __half;
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Elem<at::BFloat16> {
  using dev = __nv_bfloat16;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// `v` rounded to T's precision (a no-op for float): operands are cast to the product's dtype
// before the product, as the reference casts x to the adapter dtype.
template <typename T> __device__ __forceinline__ float round_to(float v) {
  return Elem<T>::to_float(Elem<T>::from_float(v));
}

template <typename T> using dev_t = typename Elem<T>::dev;

// ---- 16-byte vectors ---------------------------------------------------------------------

// VEC elements of T in one 16-byte load/store (8 halves, 8 bf16, 4 floats).
template <typename T> constexpr int vec_width() { return 16 / static_cast<int>(sizeof(T)); }

struct alignas(16) Bytes16 {
  uint4 v;
};

// Loads VEC = vec_width<T>() consecutive elements from a 16-byte aligned address as floats.
template <typename T>
__device__ __forceinline__ void load_vec(const dev_t<T>* p, float (&out)[vec_width<T>()]) {
  constexpr int V = vec_width<T>();
  union {
    uint4 raw;
    dev_t<T> e[V];
  } u;
  u.raw = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = Elem<T>::to_float(u.e[i]);
}

// Stores VEC floats, rounded to T, to a 16-byte aligned address.
template <typename T>
__device__ __forceinline__ void store_vec(dev_t<T>* p, const float (&in)[vec_width<T>()]) {
  constexpr int V = vec_width<T>();
  union {
    uint4 raw;
    dev_t<T> e[V];
  } u;
#pragma unroll
  for (int i = 0; i < V; ++i) u.e[i] = Elem<T>::from_float(in[i]);
  *reinterpret_cast<uint4*>(p) = u.raw;
}

// Same as load_vec but through the normal (coherent) path: for tensors the kernel also writes.
template <typename T>
__device__ __forceinline__ void load_vec_rw(const dev_t<T>* p, float (&out)[vec_width<T>()]) {
  constexpr int V = vec_width<T>();
  union {
    uint4 raw;
    dev_t<T> e[V];
  } u;
  u.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = Elem<T>::to_float(u.e[i]);
}

// True when rows of `t` (2-D, inner stride 1) can be read with 16-byte vectors of its dtype.
inline bool vector_ok(const at::Tensor& t) {
  const int64_t v = 16 / t.element_size();
  return t.stride(-1) == 1 && t.size(-1) % v == 0 && (t.dim() < 2 || t.stride(0) % v == 0) &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// ---- segments ----------------------------------------------------------------------------

// Rows of a mixed-adapter batch grouped by adapter: segment s covers positions
// [start[s], start[s+1]) of `rows` (or of x's rows when there is no `rows` array) and uses
// ranks [rank_offset[s], rank_offset[s] + rank[s]) of the stacked adapter weights, with its
// own scale and dropout probability. Passed by value as a kernel argument (no copies to the
// device); launchers split longer tables into groups of kMaxSegments.
constexpr int kMaxSegments = 48;

struct SegmentTable {
  int count;
  int start[kMaxSegments + 1];
  int rank_offset[kMaxSegments];
  int rank[kMaxSegments];
  float scale[kMaxSegments];
  float p[kMaxSegments];
};

// Host-side segment lists as the ops receive them (validated by `check_segments`).
struct Segments {
  std::vector<int64_t> starts;        // S + 1 positions
  std::vector<int64_t> rank_offsets;  // S
  std::vector<int64_t> ranks;         // S
  std::vector<double> scales;         // S
  std::vector<double> ps;             // S

  int64_t count() const { return static_cast<int64_t>(ranks.size()); }
  int64_t max_len() const;
  int64_t max_rank() const;
  bool any_dropout() const;
  // Tables of at most kMaxSegments segments each, in order.
  std::vector<SegmentTable> tables() const;
};

// Validates the lists (lengths, monotone starts within [0, n_positions], ranks within
// [0, total_rank], p in [0, 1)) with errors naming the argument; returns them bundled.
Segments check_segments(c10::IntArrayRef starts, c10::IntArrayRef rank_offsets, c10::IntArrayRef ranks,
                        c10::ArrayRef<double> scales, c10::ArrayRef<double> ps, int64_t n_positions,
                        int64_t total_rank);

// ---- launch helpers ----------------------------------------------------------------------

// The current CUDA stream of `device` through c10's device-generic guard interface.
inline cudaStream_t current_stream(const c10::Device& device) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(device).native_handle());
}

#define PF_CHECK_LAUNCH()                                                                   \
  do {                                                                                      \
    const cudaError_t err_ = cudaGetLastError();                                            \
    TORCH_CHECK(err_ == cudaSuccess, "peft_fast CUDA kernel launch failed: ",               \
                cudaGetErrorString(err_));                                                  \
  } while (0)

// Checks shared by the ops: a CUDA tensor, of a kernel dtype, 2-D, inner stride 1.
void check_cuda_2d(const at::Tensor& t, const char* name);
void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name);
// The seed pointer for dropout: a one-element int64 CUDA tensor on `device`, or nullptr when
// no segment applies dropout.
const int64_t* seed_ptr(const c10::optional<at::Tensor>& seed, const Segments& segs, const c10::Device& device);
// The dropout mask's keep bytes (csrc/keep_bytes.cu; philox.h): a (M, ceil(K / 8)) uint8
// tensor on `device` with unit column stride, or nullptr when no segment applies dropout.
const uint8_t* keep_ptr(const c10::optional<at::Tensor>& keep, const Segments& segs, const c10::Device& device,
                        int64_t M, int64_t K);
// Row stride of the keep bytes (0 when there are none).
inline int64_t keep_stride(const c10::optional<at::Tensor>& keep) { return keep.has_value() ? keep->stride(0) : 0; }
// The rows array (int32 on `device`) or nullptr for "row i is position i".
const int32_t* rows_ptr(const c10::optional<at::Tensor>& rows, const c10::Device& device, int64_t n_rows);

// Calls `fn(T{})` with T the C++ element type of `dtype` (float, at::Half, at::BFloat16).
template <typename Fn> void dispatch_float(at::ScalarType dtype, const char* name, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ", dtype);
  }
}

// Streaming multiprocessors of `device` (100 when the runtime cannot say): sizes split-K grids.
int sm_count(const c10::Device& device);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace peft_fast
