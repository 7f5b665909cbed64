// PyTorch glue of the CUDA kernel of mlp_task_derivatives
// (mlp_task_derivatives.cu). Cross-entropy labels out of range are a
// device-side assertion in the kernel, so no check waits for the GPU.
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../operands/mlp.h"
#include "glue.h"

namespace fastmeta {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_task_derivatives(
    const at::Tensor& params, const at::Tensor& x, const at::Tensor& target,
    const std::optional<at::Tensor>& direction, at::IntArrayRef widths,
    c10::ArrayRef<c10::string_view> activations, c10::string_view loss, bool input_grad) {
  const MlpOperands o = mlp_operands(params, x, target, direction, widths, activations, loss, input_grad);
  const MlpShape& s = o.shape;
  c10::cuda::CUDAGuard guard(o.params.device());
  const bool mse = s.loss == MlpLoss::MSE;
  cuda::MlpArgs args{dtype_of(o.params),
                     s,
                     o.params.size(0),
                     o.params.const_data_ptr(),
                     o.params_stride,
                     o.x.const_data_ptr(),
                     mse ? o.target.const_data_ptr() : nullptr,
                     mse ? nullptr : o.target.const_data_ptr<int64_t>(),
                     o.direction.defined() ? o.direction.const_data_ptr() : nullptr,
                     o.loss.mutable_data_ptr(),
                     o.grad.mutable_data_ptr(),
                     data_or_null(o.grad_input),
                     data_or_null(o.hvp),
                     data_or_null(o.hvp_input)};
  const int64_t scratch_bytes = cuda::mlp_global_workspace_bytes(args);
  at::Tensor scratch = at::empty({scratch_bytes}, o.params.options().dtype(at::kByte));
  cuda::mlp_task_derivatives(args, data_or_null(scratch), current_stream());
  return o.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) { m.impl("mlp_task_derivatives", &mlp_task_derivatives); }

}  // namespace fastmeta
