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

// Launches the DPM-Solver++ multistep update (x_next into `out`, x0 into `x0_out`) on the
// current stream of x's device; arguments validated by the caller.
void dpm_update(const at::Tensor& x, const at::Tensor& model_out,
                const std::optional<at::Tensor>& guidance, const at::Tensor& x0_prev,
                const at::Tensor& coefs, const at::Tensor& out, const at::Tensor& x0_out,
                int prediction_type, bool clip_sample);

// CUDA runtime version the extension was compiled against (e.g. 13000).
int runtime_version();

}  // namespace cuda
}  // namespace cpsample
