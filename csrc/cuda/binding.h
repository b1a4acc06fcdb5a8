// Torch side of the CUDA launcher (compiled only in the CUDA build, by the host compiler).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace cpsample {
namespace cuda {

// Launches the fused update on the current stream of x's device. The caller (csrc/bindings.cpp)
// has validated dtypes, shapes, devices and contiguity; `out` is allocated like x.
void guided_update(const at::Tensor& x, const at::Tensor& model_out,
                   const std::optional<at::Tensor>& guidance,
                   const std::optional<at::Tensor>& noise, const at::Tensor& coefs,
                   const at::Tensor& rng, const at::Tensor& out, int prediction_type,
                   bool clip_sample, bool draw_noise, bool use_clipped_model_output);

// CUDA runtime version the extension was compiled against (e.g. 13000).
int runtime_version();

}  // namespace cuda
}  // namespace cpsample
