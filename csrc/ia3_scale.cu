// IA³ scaling around cuBLAS's base product, and the scale vector's gradient as a fused
// reduction:
//
//   ia3_scale:       out[m, n] = round(t[m, n] · scale[n])
//   ia3_scale_grad:  gs[m, n]  = round(g[m, n] · scale[n]),  dscale[n] = Σ_m g[m, n] · r[m, n] (fp32)
//
// IA³ maps onto them (the products stay on cuBLAS through ATen):
//   attention-style layer (l: out)  forward  y = ia3_scale(x Wᵀ + b, l), z = x Wᵀ + b kept when l needs grad
//                                   backward (dz, dl) = ia3_scale_grad(dy, z, l); dx = dz W
//   feed-forward layer (l: in)      forward  y = ia3_scale(x, l) Wᵀ + b
//                                   backward g = dy W; (dx, dl) = ia3_scale_grad(g, x, l)
// Both are memory-bound: 16-byte vector loads and stores along n, each thread keeping two
// rows' loads in flight. The reduction writes one fp32 partial per row chunk, summed with
// ATen in a fixed order (deterministic, no atomics).
#include "common.cuh"

namespace peft_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kColLanes = 32;                     // threads along n, V columns each
constexpr int kRowLanes = kThreads / kColLanes;   // 8 rows at a time

template <typename T, typename TS>
__device__ __forceinline__ void load_scale(const dev_t<TS>* scale, int n, int N, float (&out)[vec_width<T>()]) {
#pragma unroll
  for (int v = 0; v < vec_width<T>(); ++v) out[v] = n + v < N ? Elem<TS>::to_float(scale[n + v]) : 0.f;
}

template <typename T>
__device__ __forceinline__ void load_row(const dev_t<T>* src, int n, int N, bool vec, float (&out)[vec_width<T>()]) {
  if (vec && n < N) {
    load_vec<T>(src, out);
  } else {
#pragma unroll
    for (int v = 0; v < vec_width<T>(); ++v) out[v] = n + v < N ? Elem<T>::to_float(src[v]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_row(dev_t<T>* dst, int n, int N, bool vec, const float (&in)[vec_width<T>()]) {
  if (vec && n < N) {
    store_vec<T>(dst, in);
  } else {
#pragma unroll
    for (int v = 0; v < vec_width<T>(); ++v)
      if (n + v < N) dst[v] = Elem<T>::from_float(in[v]);
  }
}

// Grid: (column tiles, row chunks). Rows of a chunk are walked kRowLanes at a time, two
// steps per iteration so two loads per tensor are in flight.
template <typename T, typename TS, bool GRAD>
__global__ void __launch_bounds__(kThreads)
    ia3_scale_kernel(const dev_t<T>* __restrict__ t, int64_t stride_tm, const dev_t<T>* __restrict__ r,
                     int64_t stride_rm, const dev_t<TS>* __restrict__ scale, dev_t<T>* __restrict__ out,
                     int64_t stride_om, float* __restrict__ partial, int M, int N, int chunk_len, bool vec) {
  constexpr int V = vec_width<T>();
  const int cl = threadIdx.x % kColLanes, rl = threadIdx.x / kColLanes;
  const int n = (blockIdx.x * kColLanes + cl) * V;
  const int m_begin = blockIdx.y * chunk_len;
  const int m_end = min(M, m_begin + chunk_len);
  float sc[V];
  load_scale<T, TS>(scale, n, N, sc);
  float red[V];
#pragma unroll
  for (int v = 0; v < V; ++v) red[v] = 0.f;

  for (int m = m_begin + rl; m < m_end; m += 2 * kRowLanes) {
    const int m2 = m + kRowLanes;
    const bool has2 = m2 < m_end;
    float a[V], b[V] = {}, ra[V] = {}, rb[V] = {};
    load_row<T>(t + static_cast<int64_t>(m) * stride_tm + n, n, N, vec, a);
    if (has2) load_row<T>(t + static_cast<int64_t>(m2) * stride_tm + n, n, N, vec, b);
    if (GRAD) {
      load_row<T>(r + static_cast<int64_t>(m) * stride_rm + n, n, N, vec, ra);
      if (has2) load_row<T>(r + static_cast<int64_t>(m2) * stride_rm + n, n, N, vec, rb);
    }
    float oa[V], ob[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      oa[v] = a[v] * sc[v];
      ob[v] = b[v] * sc[v];
      if (GRAD) red[v] = fmaf(a[v], ra[v], red[v]);
      if (GRAD && has2) red[v] = fmaf(b[v], rb[v], red[v]);
    }
    store_row<T>(out + static_cast<int64_t>(m) * stride_om + n, n, N, vec, oa);
    if (has2) store_row<T>(out + static_cast<int64_t>(m2) * stride_om + n, n, N, vec, ob);
  }

  if (GRAD) {
    __shared__ float sred[kRowLanes][kColLanes * V];
#pragma unroll
    for (int v = 0; v < V; ++v) sred[rl][cl * V + v] = red[v];
    __syncthreads();
    for (int c = threadIdx.x; c < kColLanes * V; c += kThreads) {
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kRowLanes; ++i) sum += sred[i][c];
      const int col = blockIdx.x * kColLanes * V + c;
      if (col < N) partial[static_cast<int64_t>(blockIdx.y) * N + col] = sum;
    }
  }
}

void check_scale(const at::Tensor& t, const at::Tensor& scale) {
  check_cuda_2d(t, "t");
  check_same_device(t, "t", scale, "scale");
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == t.size(1) && scale.is_contiguous(),
                    "scale must be a contiguous (", t.size(1), ",) vector, got ", scale.sizes());
  TORCH_CHECK_TYPE(scale.scalar_type() == t.scalar_type() || scale.scalar_type() == at::kFloat,
                   "scale must have the scaled tensor's dtype or float32, got ", scale.scalar_type());
}

// (column tiles, row chunks, rows per chunk) for an M × N launch with V columns per thread.
std::tuple<int64_t, int64_t, int64_t> grid_of(int64_t M, int64_t N, int64_t V, const c10::Device& device) {
  const int64_t col_tiles = ceil_div(N, kColLanes * V);
  int64_t chunks = std::max<int64_t>(1, std::min(ceil_div(2 * sm_count(device), col_tiles), ceil_div(M, 64)));
  const int64_t chunk_len = ceil_div(M, chunks);
  chunks = ceil_div(M, chunk_len);
  return {col_tiles, chunks, chunk_len};
}

template <bool GRAD>
void run(const at::Tensor& t, const at::Tensor* r, const at::Tensor& scale, at::Tensor& out, at::Tensor* partial,
         int64_t chunks, int64_t col_tiles, int64_t chunk_len) {
  const cudaStream_t stream = current_stream(t.device());
  const bool vec = vector_ok(t) && vector_ok(out) && (r == nullptr || vector_ok(*r));
  dispatch_float(t.scalar_type(), "t", [&](auto tag) {
    using T = decltype(tag);
    auto go = [&](auto stag) {
      using TS = decltype(stag);
      ia3_scale_kernel<T, TS, GRAD><<<dim3(col_tiles, chunks), kThreads, 0, stream>>>(
          reinterpret_cast<const dev_t<T>*>(t.data_ptr()), t.stride(0),
          r ? reinterpret_cast<const dev_t<T>*>(r->data_ptr()) : nullptr, r ? r->stride(0) : 0,
          reinterpret_cast<const dev_t<TS>*>(scale.data_ptr()), reinterpret_cast<dev_t<T>*>(out.data_ptr()),
          out.stride(0), partial ? partial->data_ptr<float>() : nullptr, static_cast<int>(t.size(0)),
          static_cast<int>(t.size(1)), static_cast<int>(chunk_len), vec);
    };
    if (scale.scalar_type() == at::kFloat) go(float{});
    else go(T{});
  });
  PF_CHECK_LAUNCH();
}

}  // namespace

at::Tensor ia3_scale(const at::Tensor& t, const at::Tensor& scale) {
  check_scale(t, scale);
  const c10::DeviceGuard guard(t.device());
  at::Tensor out = at::empty(t.sizes(), t.options());
  if (t.numel() == 0) return out;
  // No reduction here: one row chunk per ~64 rows keeps every SM busy.
  const int64_t V = 16 / t.element_size();
  const int64_t col_tiles = ceil_div(t.size(1), kColLanes * V);
  const int64_t chunk_len = std::max<int64_t>(64, ceil_div(t.size(0), 65535));  // grid.y <= 65535
  run<false>(t, nullptr, scale, out, nullptr, ceil_div(t.size(0), chunk_len), col_tiles, chunk_len);
  return out;
}

std::tuple<at::Tensor, at::Tensor> ia3_scale_grad(const at::Tensor& g, const at::Tensor& r, const at::Tensor& scale) {
  check_scale(g, scale);
  check_cuda_2d(r, "r");
  check_same_device(g, "g", r, "r");
  TORCH_CHECK_VALUE(r.sizes() == g.sizes(), "r must have g's shape ", g.sizes(), ", got ", r.sizes());
  TORCH_CHECK_TYPE(r.scalar_type() == g.scalar_type(), "r must have g's dtype ", g.scalar_type(), ", got ",
                   r.scalar_type());
  const c10::DeviceGuard guard(g.device());
  at::Tensor out = at::empty(g.sizes(), g.options());
  if (g.size(0) == 0 || g.size(1) == 0) return {out, at::zeros({g.size(1)}, g.options().dtype(at::kFloat))};
  auto [col_tiles, chunks, chunk_len] = grid_of(g.size(0), g.size(1), 16 / g.element_size(), g.device());
  at::Tensor partial = at::empty({chunks, g.size(1)}, g.options().dtype(at::kFloat));
  run<true>(g, &r, scale, out, &partial, chunks, col_tiles, chunk_len);
  return {out, chunks == 1 ? partial[0] : partial.sum(0)};
}

}  // namespace peft_fast
