// Host-side helpers of common.cuh: segment tables and argument checks shared by the ops.
#include "common.cuh"

#include <algorithm>

namespace peft_fast {

int64_t Segments::max_len() const {
  int64_t m = 0;
  for (size_t s = 0; s + 1 < starts.size(); ++s) m = std::max(m, starts[s + 1] - starts[s]);
  return m;
}

int64_t Segments::max_rank() const {
  int64_t m = 0;
  for (auto r : ranks) m = std::max(m, r);
  return m;
}

bool Segments::any_dropout() const {
  return std::any_of(ps.begin(), ps.end(), [](double p) { return p > 0.0; });
}

std::vector<SegmentTable> Segments::tables() const {
  std::vector<SegmentTable> out;
  for (int64_t first = 0; first < count(); first += kMaxSegments) {
    SegmentTable t{};
    t.count = static_cast<int>(std::min<int64_t>(kMaxSegments, count() - first));
    for (int i = 0; i < t.count; ++i) {
      const int64_t s = first + i;
      t.start[i] = static_cast<int>(starts[s]);
      t.rank_offset[i] = static_cast<int>(rank_offsets[s]);
      t.rank[i] = static_cast<int>(ranks[s]);
      t.scale[i] = static_cast<float>(scales[s]);
      t.p[i] = static_cast<float>(ps[s]);
    }
    t.start[t.count] = static_cast<int>(starts[first + t.count]);
    out.push_back(t);
  }
  return out;
}

Segments check_segments(c10::IntArrayRef starts, c10::IntArrayRef rank_offsets, c10::IntArrayRef ranks,
                        c10::ArrayRef<double> scales, c10::ArrayRef<double> ps, int64_t n_positions,
                        int64_t total_rank) {
  const size_t S = ranks.size();
  TORCH_CHECK_VALUE(starts.size() == S + 1, "seg_starts must have len(ranks) + 1 = ", S + 1, " entries, got ",
                    starts.size());
  TORCH_CHECK_VALUE(rank_offsets.size() == S && scales.size() == S && ps.size() == S,
                    "rank_offsets, scales and dropout_ps must have one entry per segment (", S, "), got ",
                    rank_offsets.size(), ", ", scales.size(), ", ", ps.size());
  TORCH_CHECK_VALUE(n_positions < (int64_t{1} << 31), "more than 2**31 - 1 rows: ", n_positions);
  TORCH_CHECK_VALUE(starts.empty() || (starts.front() >= 0 && starts.back() <= n_positions),
                    "seg_starts must lie in [0, ", n_positions, "], got ", starts);
  for (size_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(starts[s] <= starts[s + 1], "seg_starts must be non-decreasing, got ", starts);
    TORCH_CHECK_VALUE(ranks[s] >= 0 && rank_offsets[s] >= 0 && rank_offsets[s] + ranks[s] <= total_rank,
                      "segment ", s, ": ranks [", rank_offsets[s], ", ", rank_offsets[s] + ranks[s],
                      ") do not fit the stacked weights' ", total_rank, " ranks");
    TORCH_CHECK_VALUE(ps[s] >= 0.0 && ps[s] < 1.0, "dropout_ps must be in [0, 1), got ", ps[s], " for segment ", s);
  }
  Segments out;
  out.starts.assign(starts.begin(), starts.end());
  out.rank_offsets.assign(rank_offsets.begin(), rank_offsets.end());
  out.ranks.assign(ranks.begin(), ranks.end());
  out.scales.assign(scales.begin(), scales.end());
  out.ps.assign(ps.begin(), ps.end());
  return out;
}

void check_cuda_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.stride(1) == 1 || t.size(1) <= 1, name, " must have inner stride 1, got strides ",
                    t.strides());
  TORCH_CHECK_VALUE(t.numel() < (int64_t{1} << 31), name, " has ", t.numel(),
                    " elements; the kernels take fewer than 2**31");
}

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), a_name, " and ", b_name, " must share a device, got ", a.device(),
                    " and ", b.device());
}

const int64_t* seed_ptr(const c10::optional<at::Tensor>& seed, const Segments& segs, const c10::Device& device) {
  if (!segs.any_dropout()) return nullptr;
  TORCH_CHECK_VALUE(seed.has_value(), "seed is required when a dropout probability is > 0");
  const at::Tensor& t = *seed;
  TORCH_CHECK_VALUE(t.numel() == 1 && t.scalar_type() == at::kLong && t.device() == device,
                    "seed must be a one-element int64 tensor on ", device, ", got ", t.scalar_type(), " ",
                    t.sizes(), " on ", t.device());
  return t.data_ptr<int64_t>();
}

const uint8_t* keep_ptr(const c10::optional<at::Tensor>& keep, const Segments& segs, const c10::Device& device,
                        int64_t M, int64_t K) {
  if (!segs.any_dropout()) return nullptr;
  TORCH_CHECK_VALUE(keep.has_value(), "keep (the dropout mask's keep bytes) is required when a dropout probability is > 0");
  const at::Tensor& t = *keep;
  const int64_t G = ceil_div(K, 8);
  TORCH_CHECK_VALUE(t.scalar_type() == at::kByte && t.dim() == 2 && t.size(0) == M && t.size(1) == G &&
                        (t.stride(1) == 1 || G <= 1) && t.device() == device,
                    "keep must be (", M, ", ", G, ") uint8 keep bytes with unit column stride on ", device, ", got ",
                    t.scalar_type(), " ", t.sizes(), " strides ", t.strides(), " on ", t.device());
  return t.data_ptr<uint8_t>();
}

const int32_t* rows_ptr(const c10::optional<at::Tensor>& rows, const c10::Device& device, int64_t n_rows) {
  if (!rows.has_value()) return nullptr;
  const at::Tensor& t = *rows;
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt && t.dim() == 1 && t.is_contiguous() && t.device() == device,
                    "rows must be a contiguous 1-D int32 tensor on ", device, ", got ", t.scalar_type(), " ",
                    t.sizes(), " on ", t.device());
  TORCH_CHECK_VALUE(t.numel() <= n_rows, "rows has ", t.numel(), " entries for ", n_rows, " rows");
  return t.data_ptr<int32_t>();
}

int sm_count(const c10::Device& device) {
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index()) != cudaSuccess) {
    (void)cudaGetLastError();
    count = 100;
  }
  return count;
}

}  // namespace peft_fast
