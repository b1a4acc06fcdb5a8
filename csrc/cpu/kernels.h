// C++ CPU kernels on raw float32 buffers (torch-free; the torch binding is csrc/bindings.cpp).
#pragma once

#include <stdint.h>

namespace cpsample {
namespace cpu {

// Arguments of one fused update over `batch` contiguous samples of `numel_per_sample` floats.
struct GuidedUpdateArgs {
  const float* x;          // [B, n] x_t
  const float* model_out;  // [B, n] raw eps-model output
  const float* guidance;   // [B, n] guidance term G, or nullptr (= 0)
  const float* noise;      // [B, n] explicit z, or nullptr
  float* out;              // [B, n] x_{t'}
  const float* coefs;      // [6] sa, s1, sp, d, sigma, clip_range
  const int64_t* rng;      // [3] seed, step, sample_offset
  int64_t batch;
  int64_t numel_per_sample;
  int prediction_type;  // 0 epsilon, 1 v_prediction, 2 sample
  bool clip_sample;
  bool draw_noise;  // draw z in-kernel (Philox, stream 0) when `noise` is nullptr
  bool use_clipped_model_output;  // eps_hat = (x - sa*x0_hat)/s1 (diffusers' option)
  int num_threads;  // OpenMP threads to use (<= 0: the OpenMP default)
};

// docs/CONTRACTS.md "The fused update", element-parallel with OpenMP. Results do not depend on
// the thread count: the noise is counter-based and every element is computed independently.
void guided_update(const GuidedUpdateArgs& args);

// Standard normals [B, n] for counter (element j, sample_index[b], step, stream) and `seed`.
void philox_normal(uint64_t seed, const int64_t* sample_index, int64_t batch, uint32_t step,
                   uint32_t stream, int64_t numel_per_sample, float* out, int num_threads);

// Whether this translation unit was compiled with OpenMP.
bool openmp_enabled();

}  // namespace cpu
}  // namespace cpsample
