// peft_fast._C: the CUDA kernels as torch.library ops in the `peft_fast` namespace, named
// `<kernel>_cuda` (`torch.ops.peft_fast.sgmv_shrink_cuda`, ...). Shapes for torch.compile (fake
// kernels) and autograd live in Python: peft_fast/ops/cuda/ (library.py, lora.py, mixed.py, ia3.py).
// Loaded with torch.ops.load_library (no Python module init), whether built by setup.py or
// JIT-compiled by peft_fast/ops/cuda/build.py.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

namespace peft_fast {

at::Tensor sgmv_shrink(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& rows,
                       c10::IntArrayRef seg_starts, c10::IntArrayRef rank_offsets, c10::IntArrayRef ranks,
                       c10::ArrayRef<double> scales, c10::ArrayRef<double> dropout_ps,
                       const c10::optional<at::Tensor>& keep, int64_t max_rank);
void sgmv_expand_(at::Tensor& out, const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& rows,
                  c10::IntArrayRef seg_starts, c10::IntArrayRef rank_offsets, c10::IntArrayRef ranks,
                  c10::ArrayRef<double> alphas, c10::ArrayRef<double> dropout_ps,
                  const c10::optional<at::Tensor>& keep);
at::Tensor sgmv_adapter_grad(const at::Tensor& P, const at::Tensor& Q, const c10::optional<at::Tensor>& rows,
                             c10::IntArrayRef seg_starts, c10::IntArrayRef rank_offsets, c10::IntArrayRef ranks,
                             c10::ArrayRef<double> scales, c10::ArrayRef<double> dropout_ps,
                             const c10::optional<at::Tensor>& keep, int64_t total_rank, at::ScalarType dtype);
at::Tensor keep_bytes(const at::Tensor& seed, int64_t M, int64_t K, const c10::optional<at::Tensor>& rows,
                      c10::IntArrayRef seg_starts, c10::ArrayRef<double> dropout_ps);
at::Tensor ia3_scale(const at::Tensor& t, const at::Tensor& scale);
std::tuple<at::Tensor, at::Tensor> ia3_scale_grad(const at::Tensor& g, const at::Tensor& r, const at::Tensor& scale);

}  // namespace peft_fast

// Segment arguments (see common.cuh, SegmentTable): segment s covers positions
// [seg_starts[s], seg_starts[s+1]) of `rows` (x's rows when rows is None) and ranks
// [rank_offsets[s], rank_offsets[s] + ranks[s]) of the stacked adapter weights. `keep`: the
// dropout mask's (M, ceil(K/8)) keep bytes from keep_bytes_cuda (read where dropout_ps > 0).
TORCH_LIBRARY_FRAGMENT(peft_fast, m) {
  m.def(
      "sgmv_shrink_cuda(Tensor x, Tensor w, Tensor? rows, int[] seg_starts, int[] rank_offsets, int[] ranks, "
      "float[] scales, float[] dropout_ps, Tensor? keep, int max_rank) -> Tensor");
  m.def(
      "sgmv_expand_cuda_(Tensor(a!) out, Tensor h, Tensor w, Tensor? rows, int[] seg_starts, int[] rank_offsets, "
      "int[] ranks, float[] alphas, float[] dropout_ps, Tensor? keep) -> ()");
  m.def(
      "sgmv_adapter_grad_cuda(Tensor p, Tensor q, Tensor? rows, int[] seg_starts, int[] rank_offsets, int[] ranks, "
      "float[] scales, float[] dropout_ps, Tensor? keep, int total_rank, ScalarType dtype) -> Tensor");
  m.def("keep_bytes_cuda(Tensor seed, int M, int K, Tensor? rows, int[] seg_starts, float[] dropout_ps) -> Tensor");
  m.def("ia3_scale_cuda(Tensor t, Tensor scale) -> Tensor");
  m.def("ia3_scale_grad_cuda(Tensor g, Tensor r, Tensor scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peft_fast, CUDA, m) {
  m.impl("sgmv_shrink_cuda", &peft_fast::sgmv_shrink);
  m.impl("sgmv_expand_cuda_", &peft_fast::sgmv_expand_);
  m.impl("sgmv_adapter_grad_cuda", &peft_fast::sgmv_adapter_grad);
  m.impl("keep_bytes_cuda", &peft_fast::keep_bytes);
  m.impl("ia3_scale_cuda", &peft_fast::ia3_scale);
  m.impl("ia3_scale_grad_cuda", &peft_fast::ia3_scale_grad);
}
