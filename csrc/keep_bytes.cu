// keep_bytes: the dropout mask of a training step, drawn once, as keep bytes (philox.h),
//
//   keep[row, g] = keep_byte(seed, row, g, K, p_s)    bit j: element (row, 8g + j) of x kept
//
// for the rows of each segment s (positions [start[s], start[s+1]) of `rows`, or x's rows
// when there is no `rows` array), with the segment's own p. keep: M × ceil(K/8) uint8, the
// same bytes as kernels/dropout.py's `draw_keep_bytes` for the same seed. One Philox
// evaluation per byte of a segment with p > 0, none for p = 0 (0xff) or outside the tensor;
// rows of no segment hold 0xff (Triton's p = 0 rows), filled only when segments leave some.
// The forward shrink (sgmv_shrink), backward dx (sgmv_expand) and dA (sgmv_adapter_grad)
// read these bytes and draw nothing, so a step costs ceil(K/8)/K <= 1/4 evaluation per
// element of x (K >= 4; 1/8 when 8 divides K). The Python side reports the count to
// kernels/dropout.py's `record_draws` (peft_fast/ops/cuda/dropout.py).
//
// Block: 4 rows of one segment × 64 bytes, one byte per thread (coalesced 64-byte row runs).
#include <ATen/ops/full.h>

#include "common.cuh"

namespace peft_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 4;
constexpr int kGroups = kThreads / kRows;  // bytes per row per block: 64

__global__ void __launch_bounds__(kThreads)
    keep_bytes_kernel(uint8_t* __restrict__ out, int64_t G, int K, const int32_t* __restrict__ rows,
                      const int64_t* __restrict__ seed_ptr, SegmentTable segs) {
  const int s = blockIdx.z;
  if (s >= segs.count) return;
  const int pos = segs.start[s] + static_cast<int>(blockIdx.x) * kRows + static_cast<int>(threadIdx.x) / kGroups;
  const int64_t g = static_cast<int64_t>(blockIdx.y) * kGroups + threadIdx.x % kGroups;
  if (pos >= segs.start[s + 1] || g >= G) return;
  const int64_t row = rows ? rows[pos] : pos;
  const float p = segs.p[s];
  const uint64_t seed = p > 0.f ? static_cast<uint64_t>(*seed_ptr) : 0;
  out[row * G + g] = keep_byte(seed, row, g, K, p);
}

}  // namespace

at::Tensor keep_bytes(const at::Tensor& seed, int64_t M, int64_t K, const c10::optional<at::Tensor>& rows,
                      c10::IntArrayRef seg_starts, c10::ArrayRef<double> dropout_ps) {
  TORCH_CHECK_VALUE(seed.is_cuda(), "seed must be a CUDA tensor, got device ", seed.device());
  TORCH_CHECK_VALUE(M >= 0 && K >= 0, "M and K must be >= 0, got ", M, " and ", K);
  TORCH_CHECK_VALUE(M * K < (int64_t{1} << 31), "dropout needs M * K < 2**31 for its int32 numbering, got M=", M,
                    ", K=", K);
  const int64_t S = static_cast<int64_t>(dropout_ps.size());
  const std::vector<int64_t> zeros(S, 0);
  const std::vector<double> ones(S, 1.0);
  const int64_t n_pos = rows.has_value() ? rows->numel() : M;
  const Segments segs = check_segments(seg_starts, zeros, zeros, ones, dropout_ps, n_pos, 0);
  const c10::Device device = seed.device();
  const int64_t* sp = seed_ptr(seed, segs, device);
  const int32_t* rp = rows_ptr(rows, device, M);
  const int64_t G = ceil_div(K, 8);
  TORCH_CHECK_VALUE(ceil_div(G, kGroups) <= 65535, "K = ", K, " exceeds the keep-bytes grid (K <= ",
                    int64_t{65535} * kGroups * 8, ")");
  const c10::DeviceGuard guard(device);
  const auto options = at::TensorOptions().dtype(at::kByte).device(device);
  // Every row is some segment's when the segments span M positions; otherwise the rest keep all.
  const int64_t covered = S ? segs.starts.back() - segs.starts.front() : 0;
  at::Tensor out = covered == M ? at::empty({M, G}, options) : at::full({M, G}, 0xff, options);
  if (M == 0 || G == 0) return out;
  const cudaStream_t stream = current_stream(device);
  for (const SegmentTable& t : segs.tables()) {
    int max_len = 0;
    for (int s = 0; s < t.count; ++s) max_len = std::max(max_len, t.start[s + 1] - t.start[s]);
    if (max_len == 0) continue;
    const dim3 grid(ceil_div(max_len, kRows), ceil_div(G, kGroups), t.count);
    keep_bytes_kernel<<<grid, kThreads, 0, stream>>>(out.data_ptr<uint8_t>(), G, static_cast<int>(K), rp, sp, t);
    PF_CHECK_LAUNCH();
  }
  return out;
}

}  // namespace peft_fast
