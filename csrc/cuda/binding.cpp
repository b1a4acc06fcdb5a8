// Thin torch binding of the CUDA launcher: raw pointers plus the current stream, no host sync.
#include "cuda/binding.h"

// c10's stream and guard headers need only the CUDA runtime headers (ATen/cuda/CUDAContext.h
// would also need cuBLAS / cuSPARSE headers, which a minimal toolkit lacks).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "cuda/launcher.h"

namespace cpsample {
namespace cuda {

void guided_update(const at::Tensor& x, const at::Tensor& model_out,
                   const std::optional<at::Tensor>& guidance,
                   const std::optional<at::Tensor>& noise, const at::Tensor& coefs,
                   const at::Tensor& rng, const at::Tensor& out, int prediction_type,
                   bool clip_sample, bool draw_noise, bool use_clipped_model_output) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t batch = x.size(0);
  const int64_t n = batch > 0 ? x.numel() / batch : 0;
  const int err = cpsample_guided_update_cuda(
      x.data_ptr<float>(), model_out.data_ptr<float>(),
      guidance.has_value() ? guidance->data_ptr<float>() : nullptr,
      noise.has_value() ? noise->data_ptr<float>() : nullptr, coefs.data_ptr<float>(),
      rng.data_ptr<int64_t>(), out.data_ptr<float>(), batch, n, prediction_type,
      clip_sample ? 1 : 0, draw_noise ? 1 : 0, use_clipped_model_output ? 1 : 0, stream);
  TORCH_CHECK(err == 0, "cpsample_fast._C.guided_update: CUDA launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

int runtime_version() { return CUDART_VERSION; }

}  // namespace cuda
}  // namespace cpsample
