// sgmv_adapter_grad: the LoRA weight gradients, reductions over each segment's rows,
//
//   out[rank_offset_s + j, n] = scale_s · Σ_{rows of s} round(P[row, j]) · round(keep(row, n) · Q[row, n])
//
// P: M × ≥rank fp32 (h or dh), Q: M × N (x or dy, inner stride 1); out: (R_total, N) in
// `dtype`, operands rounded to `dtype` (the adapter dtype), fp32 accumulation.
//   dA = dhᵀ · dropout(x) / (1-p)   (P = dh, Q = x, mask read from the forward's keep bytes,
//                                    csrc/keep_bytes.cu: no Philox here)
//   dBᵀ = s · hᵀ · dy               (P = h, Q = dy, no dropout)
// Ranks of adapters without rows stay zero.
//
// Rank-sized outputs are small, so each segment's rows are split into chunks (split-K) to
// fill the GPU: block (rank tile × column tile, chunk, segment) writes an fp32 partial, and
// the partials are summed with ATen in a fixed order (deterministic, no atomics).
// Block: 32 ranks × (16 vectors of 16 bytes) columns, 256 threads, rows walked 32 at a time;
// Q's tile is read with two 16-byte vectors per thread per step.
#include "common.cuh"

namespace peft_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kRT = 32;  // ranks per block
constexpr int kBK = 32;  // rows per step

template <typename TQ, typename TA>
__global__ void __launch_bounds__(kThreads)
    sgmv_adapter_grad_kernel(const float* __restrict__ P, int64_t stride_pm, const dev_t<TQ>* __restrict__ Q,
                             int64_t stride_qm, int N, float* __restrict__ partial, int64_t stride_pc,
                             int n_col_tiles, int chunk_len, const int32_t* __restrict__ rows,
                             const uint8_t* __restrict__ keep, int64_t stride_kb, SegmentTable segs, bool vec) {
  constexpr int V = vec_width<TQ>();
  constexpr int kBN = 16 * V;
  constexpr int kQLoads = kBK * kBN / (kThreads * V);  // 16-byte vectors per thread per step: 2

  const int s = blockIdx.z;
  if (s >= segs.count) return;
  const int r0 = (blockIdx.x / n_col_tiles) * kRT;
  const int n0 = (blockIdx.x % n_col_tiles) * kBN;
  const int rank = segs.rank[s];
  const int pos_begin = segs.start[s] + blockIdx.y * chunk_len;
  const int pos_end = min(segs.start[s + 1], pos_begin + chunk_len);
  if (r0 >= rank || pos_begin >= pos_end) return;
  const float p = segs.p[s];
  static_assert(8 % V == 0, "a vector's elements must lie in one keep byte");

  __shared__ float ps[kBK][kRT + 1];
  __shared__ __align__(16) float qs[kBK][kBN + 4];

  const int tid = threadIdx.x;
  const int cl = tid % 16, rl = tid / 16;  // columns cl*V .. +V, ranks rl and rl + 16
  float acc[2][V];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int v = 0; v < V; ++v) acc[i][v] = 0.f;

  for (int k0 = pos_begin; k0 < pos_end; k0 += kBK) {
    // P tile: kBK rows × kRT ranks, 4 elements per thread.
#pragma unroll
    for (int i = 0; i < kBK * kRT / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      const int k = idx / kRT, j = idx % kRT;
      float v = 0.f;
      if (k0 + k < pos_end && r0 + j < rank) {
        const int64_t g = rows ? rows[k0 + k] : k0 + k;
        v = round_to<TA>(P[g * stride_pm + r0 + j]);
      }
      ps[k][j] = v;
    }
    // Q tile: kBK rows × kBN columns; all loads issued before any is used.
    float qr[kQLoads][V];
    uint32_t q_keep[kQLoads];  // keep bits of each vector's V elements (bit v: column n + v)
    int q_k[kQLoads], q_n[kQLoads];
    int64_t q_g[kQLoads];
#pragma unroll
    for (int l = 0; l < kQLoads; ++l) {
      const int vi = tid + l * kThreads;
      q_k[l] = vi / 16;
      q_n[l] = (vi % 16) * V;
      const bool row_ok = k0 + q_k[l] < pos_end;
      q_g[l] = row_ok ? (rows ? rows[k0 + q_k[l]] : k0 + q_k[l]) : 0;
      const int n = n0 + q_n[l];
      const dev_t<TQ>* src = Q + q_g[l] * stride_qm + n;
      q_keep[l] = (p > 0.f && row_ok && n < N) ? keep_bits(keep, stride_kb, q_g[l], n) : 0xffu;
      if (vec && row_ok && n < N) {
        load_vec<TQ>(src, qr[l]);
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) qr[l][v] = (row_ok && n + v < N) ? Elem<TQ>::to_float(src[v]) : 0.f;
      }
    }
#pragma unroll
    for (int l = 0; l < kQLoads; ++l) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        float q = round_to<TA>(qr[l][v]);
        if (!((q_keep[l] >> v) & 1u)) q = 0.f;
        qs[q_k[l]][q_n[l] + v] = q;
      }
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kBK; ++k) {
      const float p0 = ps[k][rl], p1 = ps[k][rl + 16];
#pragma unroll
      for (int v = 0; v < V; v += 4) {
        const float4 q = *reinterpret_cast<const float4*>(&qs[k][cl * V + v]);
        acc[0][v] = fmaf(p0, q.x, acc[0][v]);
        acc[0][v + 1] = fmaf(p0, q.y, acc[0][v + 1]);
        acc[0][v + 2] = fmaf(p0, q.z, acc[0][v + 2]);
        acc[0][v + 3] = fmaf(p0, q.w, acc[0][v + 3]);
        acc[1][v] = fmaf(p1, q.x, acc[1][v]);
        acc[1][v + 1] = fmaf(p1, q.y, acc[1][v + 1]);
        acc[1][v + 2] = fmaf(p1, q.z, acc[1][v + 2]);
        acc[1][v + 3] = fmaf(p1, q.w, acc[1][v + 3]);
      }
    }
    __syncthreads();
  }

  const float scale = segs.scale[s];
  float* dst = partial + blockIdx.y * stride_pc;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = r0 + rl + 16 * i;
    if (r >= rank) continue;
    float* row = dst + static_cast<int64_t>(segs.rank_offset[s] + r) * N;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int n = n0 + cl * V + v;
      if (n < N) row[n] = scale * acc[i][v];
    }
  }
}

template <typename TQ, typename TA>
at::Tensor launch(const at::Tensor& P, const at::Tensor& Q, const int32_t* rows, const uint8_t* keep,
                  int64_t stride_kb, const Segments& segs, int64_t total_rank, cudaStream_t stream) {
  constexpr int kBN = 16 * vec_width<TQ>();
  const int64_t N = Q.size(1);
  const int64_t col_tiles = ceil_div(N, kBN);
  const int64_t rank_tiles = ceil_div(std::max<int64_t>(segs.max_rank(), 1), kRT);
  const int64_t max_len = std::max<int64_t>(segs.max_len(), 1);
  const int64_t S = std::min<int64_t>(segs.count(), kMaxSegments);
  // Enough blocks for about two waves, each chunk at least 4 row steps long.
  const int64_t tiles = col_tiles * rank_tiles * std::max<int64_t>(S, 1);
  int64_t chunks = std::max<int64_t>(1, std::min(ceil_div(2 * sm_count(Q.device()), tiles), ceil_div(max_len, 4 * kBK)));
  const int64_t chunk_len = ceil_div(ceil_div(max_len, chunks), kBK) * kBK;
  chunks = ceil_div(max_len, chunk_len);
  at::Tensor partial = at::zeros({chunks, total_rank, N}, Q.options().dtype(at::kFloat));
  const bool vec = vector_ok(Q);
  for (const SegmentTable& t : segs.tables()) {
    const dim3 grid(col_tiles * rank_tiles, chunks, t.count);
    sgmv_adapter_grad_kernel<TQ, TA><<<grid, kThreads, 0, stream>>>(
        P.data_ptr<float>(), P.stride(0), reinterpret_cast<const dev_t<TQ>*>(Q.data_ptr()), Q.stride(0),
        static_cast<int>(N), partial.data_ptr<float>(), partial.stride(0), static_cast<int>(col_tiles),
        static_cast<int>(chunk_len), rows, keep, stride_kb, t, vec);
    PF_CHECK_LAUNCH();
  }
  return chunks == 1 ? partial[0] : partial.sum(0);
}

}  // namespace

at::Tensor sgmv_adapter_grad(const at::Tensor& P, const at::Tensor& Q, const c10::optional<at::Tensor>& rows,
                             c10::IntArrayRef seg_starts, c10::IntArrayRef rank_offsets, c10::IntArrayRef ranks,
                             c10::ArrayRef<double> scales, c10::ArrayRef<double> dropout_ps,
                             const c10::optional<at::Tensor>& keep, int64_t total_rank, at::ScalarType dtype) {
  check_cuda_2d(P, "P");
  check_cuda_2d(Q, "Q");
  check_same_device(P, "P", Q, "Q");
  TORCH_CHECK_TYPE(P.scalar_type() == at::kFloat, "P must be float32, got ", P.scalar_type());
  TORCH_CHECK_VALUE(P.size(0) == Q.size(0), "P (M, r) and Q (M, N) must share M, got ", P.sizes(), " and ",
                    Q.sizes());
  TORCH_CHECK_VALUE(total_rank >= 0, "total_rank must be >= 0, got ", total_rank);
  const int64_t n_pos = rows.has_value() ? rows->numel() : Q.size(0);
  const Segments segs = check_segments(seg_starts, rank_offsets, ranks, scales, dropout_ps, n_pos, total_rank);
  TORCH_CHECK_VALUE(P.size(1) >= segs.max_rank(), "P must have at least ", segs.max_rank(), " columns, got ",
                    P.size(1));
  TORCH_CHECK_TYPE(dtype == Q.scalar_type() || dtype == at::kFloat, "dtype must be Q's dtype ", Q.scalar_type(),
                   " or float32, got ", dtype);
  const c10::DeviceGuard guard(Q.device());
  if (Q.size(0) == 0 || Q.size(1) == 0 || total_rank == 0 || segs.max_rank() == 0) {
    return at::zeros({total_rank, Q.size(1)}, Q.options().dtype(dtype));
  }
  const int32_t* rp = rows_ptr(rows, Q.device(), Q.size(0));
  const uint8_t* kp = keep_ptr(keep, segs, Q.device(), Q.size(0), Q.size(1));
  const int64_t skb = keep_stride(keep);
  const cudaStream_t stream = current_stream(Q.device());
  at::Tensor out;
  dispatch_float(Q.scalar_type(), "Q", [&](auto tq) {
    using TQ = decltype(tq);
    out = dtype == at::kFloat ? launch<TQ, float>(P, Q, rp, kp, skb, segs, total_rank, stream)
                              : launch<TQ, TQ>(P, Q, rp, kp, skb, segs, total_rank, stream);
  });
  return out.to(dtype);
}

}  // namespace peft_fast
