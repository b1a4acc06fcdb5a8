// Plain C launchers of the CUDA kernels (no torch headers): csrc/cuda/binding.cpp calls them with
// raw pointers and the current stream; `make check-cuda` compiles the kernels with nvcc alone.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// docs/CONTRACTS.md "The fused update" over `batch` contiguous samples of `numel_per_sample`
// floats. All pointers are device memory; `coefs` [6] = (sa, s1, sp, d, sigma, clip_range) and
// `rng` [3] = (seed, step, sample_offset) are read by the kernel, so nothing syncs with the host.
// `guidance` and `noise` may be NULL (G = 0; z drawn in-kernel when draw_noise, else no noise).
// `use_clipped_model_output` != 0: eps_hat = (x - sa*x0_hat)/s1 (diffusers' DDIMScheduler option).
// Returns a cudaError_t (cudaSuccess = 0) from the launch.
int cpsample_guided_update_cuda(const float* x, const float* model_out, const float* guidance,
                                const float* noise, const float* coefs, const int64_t* rng,
                                float* out, int64_t batch, int64_t numel_per_sample,
                                int prediction_type, int clip_sample, int draw_noise,
                                int use_clipped_model_output, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
