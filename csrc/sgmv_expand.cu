// sgmv_expand: expand-accumulate into an existing output, per segment of rows,
//
//   out[row, n] += alpha_s · keep(row, n) · Σ_j round(h[row, j]) · B[n, rank_offset_s + j],  j < rank_s
//
// out: M × N in the base dtype (inner stride 1), already holding x Wᵀ + b from cuBLAS;
// h: M × ≥rank fp32; B: the stacked adapters' (N, R_total), contiguous. h is rounded to B's
// dtype (the adapter dtype) before the product, accumulation is fp32, the sum is rounded
// once to out's dtype. The M × N LoRA product is never written on its own.
// Forward: y += s · h Bᵀ. Backward: dx (= dy W from cuBLAS) += mask ⊙ (dh A) / (1-p) with
// Aᵀ (contiguous copy, K × r) as B and the forward's keep bytes (csrc/keep_bytes.cu; read,
// no Philox): they cover out's M × N, which for dx is x's M × K.
//
// Block: 32 rows of one segment × (16 vectors of 16 bytes) columns, 256 threads; each thread
// owns 2 rows × one vector of columns. Its two output vectors and their keep bits are loaded
// first (in flight while h and B tiles are staged through shared memory in chunks of 32
// ranks), then updated and stored with 16-byte accesses.
#include "common.cuh"

namespace peft_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kBM = 32;
constexpr int kRC = 32;  // ranks per shared-memory chunk

template <typename TO, typename TW>
__global__ void __launch_bounds__(kThreads)
    sgmv_expand_kernel(dev_t<TO>* __restrict__ out, int64_t stride_om, int N, const float* __restrict__ h,
                       int64_t stride_hm, const dev_t<TW>* __restrict__ w, int64_t stride_wn,
                       const int32_t* __restrict__ rows, const uint8_t* __restrict__ keep, int64_t stride_kb,
                       SegmentTable segs, bool vec) {
  constexpr int V = vec_width<TO>();
  constexpr int kBN = 16 * V;
  constexpr int kWPerThread = kRC * kBN / kThreads;

  const int s = blockIdx.z;
  if (s >= segs.count) return;
  const int pos0 = segs.start[s] + blockIdx.x * kBM;
  const int pos_end = segs.start[s + 1];
  const int rank = segs.rank[s];
  const int n0 = blockIdx.y * kBN;
  if (pos0 >= pos_end || rank == 0) return;
  const int w_col0 = segs.rank_offset[s];
  const float p = segs.p[s];

  __shared__ float hs[kBM][kRC + 1];
  __shared__ __align__(16) float ws[kRC][kBN + 4];

  const int tid = threadIdx.x;
  const int cl = tid % 16, rl = tid / 16;
  const int n = n0 + cl * V;
  int64_t grow[2];
  bool valid[2];
  float cur[2][V];
  // Keep bits of the two rows' V elements, row i in byte i of one register (bit v: column
  // n + v), loaded with the output vectors; all set without dropout. n is a multiple of V and
  // V divides 8: a row's V elements share one keep byte.
  static_assert(8 % V == 0, "a thread's elements must lie in one keep byte");
  uint32_t kept = 0xffffu;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int pos = pos0 + rl + 16 * i;
    valid[i] = pos < pos_end;
    grow[i] = valid[i] ? (rows ? rows[pos] : pos) : 0;
    if (p > 0.f && valid[i] && n < N) {
      const uint32_t dropped = ~keep_bits(keep, stride_kb, grow[i], n) & 0xffu;
      kept &= ~(dropped << (8 * i));
    }
    const dev_t<TO>* src = out + grow[i] * stride_om + n;
    if (vec && valid[i] && n < N) {
      load_vec_rw<TO>(src, cur[i]);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) cur[i][v] = (valid[i] && n + v < N) ? Elem<TO>::to_float(src[v]) : 0.f;
    }
  }

  float acc[2][V];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int v = 0; v < V; ++v) acc[i][v] = 0.f;

  for (int c0 = 0; c0 < rank; c0 += kRC) {
    // h tile: kBM × kRC, 4 elements per thread, rounded to the adapter dtype.
#pragma unroll
    for (int i = 0; i < kBM * kRC / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      const int m = idx / kRC, j = idx % kRC;
      const int pos = pos0 + m;
      float v = 0.f;
      if (pos < pos_end && c0 + j < rank) {
        const int64_t g = rows ? rows[pos] : pos;
        v = round_to<TW>(h[g * stride_hm + c0 + j]);
      }
      hs[m][j] = v;
    }
    // B tile: kBN columns × kRC ranks, read along ranks (contiguous in B's rows).
#pragma unroll
    for (int i = 0; i < kWPerThread; ++i) {
      const int idx = tid + i * kThreads;
      const int j = idx % kRC, nn = idx / kRC;
      const bool ok = c0 + j < rank && n0 + nn < N;
      ws[j][nn] = ok ? Elem<TW>::to_float(w[static_cast<int64_t>(n0 + nn) * stride_wn + w_col0 + c0 + j]) : 0.f;
    }
    __syncthreads();
    const int jn = min(kRC, rank - c0);
    for (int j = 0; j < jn; ++j) {
      const float h0 = hs[rl][j], h1 = hs[rl + 16][j];
      float wv[V];
#pragma unroll
      for (int v = 0; v < V; v += 4) {
        const float4 q = *reinterpret_cast<const float4*>(&ws[j][cl * V + v]);
        wv[v] = q.x; wv[v + 1] = q.y; wv[v + 2] = q.z; wv[v + 3] = q.w;
      }
#pragma unroll
      for (int v = 0; v < V; ++v) {
        acc[0][v] = fmaf(h0, wv[v], acc[0][v]);
        acc[1][v] = fmaf(h1, wv[v], acc[1][v]);
      }
    }
    __syncthreads();
  }

  const float alpha = segs.scale[s];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!valid[i]) continue;
    float res[V];
    const uint32_t row_kept = kept >> (8 * i);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const float d = ((row_kept >> v) & 1u) ? alpha * acc[i][v] : 0.f;
      res[v] = cur[i][v] + d;
    }
    dev_t<TO>* dst = out + grow[i] * stride_om + n;
    if (vec && n < N) {
      store_vec<TO>(dst, res);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v)
        if (n + v < N) dst[v] = Elem<TO>::from_float(res[v]);
    }
  }
}

template <typename TO, typename TW>
void launch(at::Tensor& out, const at::Tensor& h, const at::Tensor& w, const int32_t* rows, const uint8_t* keep,
            int64_t stride_kb, const Segments& segs, cudaStream_t stream) {
  const bool vec = vector_ok(out);
  const int64_t N = out.size(1);
  constexpr int kBN = 16 * vec_width<TO>();
  for (const SegmentTable& t : segs.tables()) {
    int max_len = 0;
    for (int s = 0; s < t.count; ++s) max_len = std::max(max_len, t.start[s + 1] - t.start[s]);
    if (max_len == 0) continue;
    const dim3 grid(ceil_div(max_len, kBM), ceil_div(N, kBN), t.count);
    sgmv_expand_kernel<TO, TW><<<grid, kThreads, 0, stream>>>(
        reinterpret_cast<dev_t<TO>*>(out.data_ptr()), out.stride(0), static_cast<int>(N), h.data_ptr<float>(),
        h.stride(0), reinterpret_cast<const dev_t<TW>*>(w.data_ptr()), w.stride(0), rows, keep, stride_kb, t,
        vec);
    PF_CHECK_LAUNCH();
  }
}

}  // namespace

void sgmv_expand_(at::Tensor& out, const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& rows,
                  c10::IntArrayRef seg_starts, c10::IntArrayRef rank_offsets, c10::IntArrayRef ranks,
                  c10::ArrayRef<double> alphas, c10::ArrayRef<double> dropout_ps,
                  const c10::optional<at::Tensor>& keep) {
  check_cuda_2d(out, "out");
  check_cuda_2d(h, "h");
  check_cuda_2d(w, "w");
  check_same_device(out, "out", h, "h");
  check_same_device(out, "out", w, "w");
  TORCH_CHECK_TYPE(h.scalar_type() == at::kFloat, "h must be float32, got ", h.scalar_type());
  TORCH_CHECK_VALUE(h.size(0) == out.size(0), "h must have out's ", out.size(0), " rows, got ", h.sizes());
  TORCH_CHECK_VALUE(w.is_contiguous() && w.size(0) == out.size(1),
                    "w must be a contiguous (", out.size(1), ", R_total) tensor, got ", w.sizes(), " strides ",
                    w.strides());
  const int64_t n_pos = rows.has_value() ? rows->numel() : out.size(0);
  const Segments segs = check_segments(seg_starts, rank_offsets, ranks, alphas, dropout_ps, n_pos, w.size(1));
  TORCH_CHECK_VALUE(h.size(1) >= segs.max_rank(), "h must have at least ", segs.max_rank(), " columns, got ",
                    h.size(1));
  if (out.size(0) == 0 || out.size(1) == 0) return;
  const c10::DeviceGuard guard(out.device());
  const int32_t* rp = rows_ptr(rows, out.device(), out.size(0));
  const uint8_t* kp = keep_ptr(keep, segs, out.device(), out.size(0), out.size(1));
  const int64_t skb = keep_stride(keep);
  const cudaStream_t stream = current_stream(out.device());
  dispatch_float(out.scalar_type(), "out", [&](auto to) {
    using TO = decltype(to);
    TORCH_CHECK_TYPE(w.scalar_type() == out.scalar_type() || w.scalar_type() == at::kFloat,
                     "w must have out's dtype or float32, got ", w.scalar_type());
    if (w.scalar_type() == at::kFloat) launch<TO, float>(out, h, w, rp, kp, skb, segs, stream);
    else launch<TO, TO>(out, h, w, rp, kp, skb, segs, stream);
  });
}

}  // namespace peft_fast
