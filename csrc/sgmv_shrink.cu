// sgmv_shrink: h = scale · dropout(x) · Aᵀ per segment of rows, fp32 accumulation.
//
//   h[row, j] = scale_s · Σ_k keep(row, k) · x[row, k] · A[rank_offset_s + j, k],  j < rank_s
//
// x: M × K (inner stride 1, any row stride); A: the stacked adapters' (R_total, K), contiguous;
// h: M × max_rank fp32, zero in rows of no segment and columns past a segment's rank.
// One LoRA is one segment covering every row. Forward: h = dropout(x)Aᵀ/(1-p);
// backward: dh = s · dy · B, with Bᵀ (contiguous copy, r × N) as A and p = 0.
//
// Block: 64 rows of one segment × RT ranks, 256 threads; K walked in steps of 32. x's tile
// is read with 16-byte vectors (when rows allow it) into registers one step ahead (the next
// tile's loads are in flight while the current one is multiplied), masked by the dropout
// keep bits read from the step's keep bytes (csrc/keep_bytes.cu draws them first; no Philox
// here: a vector's V <= 8 elements share one byte), rounded to A's dtype (the reference
// casts x to the adapter dtype) and stored transposed in shared memory; each thread
// accumulates 4 rows × RT/16 ranks.
#include "common.cuh"

namespace peft_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kBM = 64;
constexpr int kBK = 32;
constexpr int kXPerThread = kBM * kBK / kThreads;  // 8

template <typename TX, typename TW, int RT>
__global__ void __launch_bounds__(kThreads)
    sgmv_shrink_kernel(const dev_t<TX>* __restrict__ x, int64_t stride_xm, int K, const dev_t<TW>* __restrict__ w,
                       float* __restrict__ h, int64_t stride_hm, const int32_t* __restrict__ rows,
                       const uint8_t* __restrict__ keep, int64_t stride_kb, SegmentTable segs, bool vec) {
  constexpr int V = vec_width<TX>();
  constexpr int kLoads = kXPerThread / V;  // vectors per thread per step
  constexpr int kVecPerRow = kBK / V;
  constexpr int kWPerThread = RT * kBK / kThreads;
  constexpr int kRanksPerThread = RT / 16;

  const int s = blockIdx.z;
  if (s >= segs.count) return;
  const int pos0 = segs.start[s] + blockIdx.x * kBM;
  const int pos_end = segs.start[s + 1];
  const int r0 = blockIdx.y * RT;
  const int rank = segs.rank[s];
  if (pos0 >= pos_end || r0 >= rank) return;
  const int w_row0 = segs.rank_offset[s] + r0;
  const float p = segs.p[s];

  __shared__ __align__(16) float xs[kBK][kBM + 4];  // transposed tile: xs[k][m]
  __shared__ float ws[kBK][RT];                     // ws[k][r]

  const int tid = threadIdx.x;
  // Staging: this thread's x vectors (row, first k) and A elements of each K step.
  int st_row[kLoads], st_k[kLoads];
  int64_t st_grow[kLoads];
  bool st_valid[kLoads];
#pragma unroll
  for (int l = 0; l < kLoads; ++l) {
    const int vi = tid + l * kThreads;
    st_row[l] = vi / kVecPerRow;
    st_k[l] = (vi % kVecPerRow) * V;
    const int pos = pos0 + st_row[l];
    st_valid[l] = pos < pos_end;
    st_grow[l] = st_valid[l] ? (rows ? rows[pos] : pos) : 0;
  }
  float xr[kLoads][V];
  uint32_t kr[kLoads];  // keep bits of each vector's V elements (bit i: element k + i)
  float wr[kWPerThread];
  static_assert(8 % V == 0, "a vector's elements must lie in one keep byte");

  auto load_step = [&](int k0) {
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      const int k = k0 + st_k[l];
      const dev_t<TX>* src = x + st_grow[l] * stride_xm + k;
      kr[l] = (p > 0.f && st_valid[l] && k < K) ? keep_bits(keep, stride_kb, st_grow[l], k) : 0xffu;
      if (vec) {
        if (st_valid[l] && k < K) {
          load_vec<TX>(src, xr[l]);
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) xr[l][i] = 0.f;
        }
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) xr[l][i] = (st_valid[l] && k + i < K) ? Elem<TX>::to_float(src[i]) : 0.f;
      }
    }
#pragma unroll
    for (int i = 0; i < kWPerThread; ++i) {
      const int idx = tid + i * kThreads;
      const int rr = idx / kBK, kk = idx % kBK;
      const bool ok = r0 + rr < rank && k0 + kk < K;
      wr[i] = ok ? Elem<TW>::to_float(w[static_cast<int64_t>(w_row0 + rr) * K + k0 + kk]) : 0.f;
    }
  };

  auto store_step = [&](int k0) {
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        float v = round_to<TW>(xr[l][i]);
        if (!((kr[l] >> i) & 1u)) v = 0.f;
        xs[st_k[l] + i][st_row[l]] = v;
      }
    }
#pragma unroll
    for (int i = 0; i < kWPerThread; ++i) {
      const int idx = tid + i * kThreads;
      ws[idx % kBK][idx / kBK] = wr[i];
    }
  };

  const int tm = tid / 16;  // rows tm*4 .. tm*4+3
  const int tr = tid % 16;  // ranks tr + 16 j
  float acc[4][kRanksPerThread];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < kRanksPerThread; ++j) acc[i][j] = 0.f;

  load_step(0);
  for (int k0 = 0; k0 < K; k0 += kBK) {
    store_step(k0);
    __syncthreads();
    if (k0 + kBK < K) load_step(k0 + kBK);  // next step's loads fly during this step's math
#pragma unroll 8
    for (int kk = 0; kk < kBK; ++kk) {
      const float4 xv = *reinterpret_cast<const float4*>(&xs[kk][tm * 4]);
      float wv[kRanksPerThread];
#pragma unroll
      for (int j = 0; j < kRanksPerThread; ++j) wv[j] = ws[kk][tr + 16 * j];
#pragma unroll
      for (int j = 0; j < kRanksPerThread; ++j) {
        acc[0][j] = fmaf(xv.x, wv[j], acc[0][j]);
        acc[1][j] = fmaf(xv.y, wv[j], acc[1][j]);
        acc[2][j] = fmaf(xv.z, wv[j], acc[2][j]);
        acc[3][j] = fmaf(xv.w, wv[j], acc[3][j]);
      }
    }
    __syncthreads();
  }

  const float scale = segs.scale[s];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int pos = pos0 + tm * 4 + i;
    if (pos >= pos_end) continue;
    const int64_t grow = rows ? rows[pos] : pos;
#pragma unroll
    for (int j = 0; j < kRanksPerThread; ++j) {
      const int r = r0 + tr + 16 * j;
      if (r < rank) h[grow * stride_hm + r] = acc[i][j] * scale;
    }
  }
}

template <typename TX, typename TW, int RT>
void launch(const at::Tensor& x, const at::Tensor& w, at::Tensor& h, const int32_t* rows, const uint8_t* keep,
            int64_t stride_kb, const Segments& segs, cudaStream_t stream) {
  const bool vec = vector_ok(x);
  const int64_t K = x.size(1);
  for (const SegmentTable& t : segs.tables()) {
    int max_len = 0, max_rank = 0;
    for (int s = 0; s < t.count; ++s) {
      max_len = std::max(max_len, t.start[s + 1] - t.start[s]);
      max_rank = std::max(max_rank, t.rank[s]);
    }
    if (max_len == 0 || max_rank == 0) continue;
    const dim3 grid(ceil_div(max_len, kBM), ceil_div(max_rank, RT), t.count);
    sgmv_shrink_kernel<TX, TW, RT><<<grid, kThreads, 0, stream>>>(
        reinterpret_cast<const dev_t<TX>*>(x.data_ptr()), x.stride(0), static_cast<int>(K),
        reinterpret_cast<const dev_t<TW>*>(w.data_ptr()), h.data_ptr<float>(), h.stride(0), rows, keep, stride_kb, t,
        vec);
    PF_CHECK_LAUNCH();
  }
}

}  // namespace

at::Tensor sgmv_shrink(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& rows,
                       c10::IntArrayRef seg_starts, c10::IntArrayRef rank_offsets, c10::IntArrayRef ranks,
                       c10::ArrayRef<double> scales, c10::ArrayRef<double> dropout_ps,
                       const c10::optional<at::Tensor>& keep, int64_t max_rank) {
  check_cuda_2d(x, "x");
  check_cuda_2d(w, "w");
  check_same_device(x, "x", w, "w");
  TORCH_CHECK_VALUE(w.is_contiguous(), "w must be contiguous (R_total, K), got strides ", w.strides());
  TORCH_CHECK_VALUE(w.size(1) == x.size(1), "w must be (R_total, ", x.size(1), "), got ", w.sizes());
  const int64_t n_pos = rows.has_value() ? rows->numel() : x.size(0);
  const Segments segs = check_segments(seg_starts, rank_offsets, ranks, scales, dropout_ps, n_pos, w.size(0));
  TORCH_CHECK_VALUE(max_rank >= segs.max_rank(), "max_rank must be at least the largest rank ", segs.max_rank(),
                    ", got ", max_rank);
  const c10::DeviceGuard guard(x.device());
  at::Tensor h = at::zeros({x.size(0), max_rank}, x.options().dtype(at::kFloat));
  if (x.size(0) == 0 || x.size(1) == 0 || max_rank == 0) return h;
  const int32_t* rp = rows_ptr(rows, x.device(), x.size(0));
  const uint8_t* kp = keep_ptr(keep, segs, x.device(), x.size(0), x.size(1));
  const int64_t skb = keep_stride(keep);
  const cudaStream_t stream = current_stream(x.device());
  dispatch_float(x.scalar_type(), "x", [&](auto tx) {
    using TX = decltype(tx);
    TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type() || w.scalar_type() == at::kFloat,
                     "w must have x's dtype or float32, got ", w.scalar_type());
    if (w.scalar_type() == at::kFloat) {
      if (segs.max_rank() <= 16) launch<TX, float, 16>(x, w, h, rp, kp, skb, segs, stream);
      else launch<TX, float, 64>(x, w, h, rp, kp, skb, segs, stream);
    } else {
      if (segs.max_rank() <= 16) launch<TX, TX, 16>(x, w, h, rp, kp, skb, segs, stream);
      else launch<TX, TX, 64>(x, w, h, rp, kp, skb, segs, stream);
    }
  });
  return h;
}

}  // namespace peft_fast
