// CUDA kernel of the fused update (docs/CONTRACTS.md), torch-free; see launcher.h.
//
// Memory-bound: three reads and one write per element. Grid: x covers the elements of a sample
// (grid-stride), y covers the batch (grid-stride beyond 65535 samples), so the sample index and
// the Philox counter come without a 64-bit division per element.
#include "cpsample/step_math.h"
#include "cuda/launcher.h"

using cpsample::kDrawnNoise;
using cpsample::kExplicitNoise;
using cpsample::kNoNoise;

namespace {

using cpsample::StepCoefs;

constexpr int kThreads = 256;
// Enough blocks per sample row to fill an H100/H200 (132 SMs x 8 blocks) with a 1-sample batch.
constexpr int64_t kMaxBlocksX = 1024;
constexpr int64_t kMaxBlocksY = 65535;

template <int P, bool CLIP, bool HAS_G, bool CLIPPED_EPS, int NOISE>
__global__ void __launch_bounds__(kThreads)
    _guided_update_kernel(const float* __restrict__ x, const float* __restrict__ model_out,
                          const float* __restrict__ guidance, const float* __restrict__ noise,
                          const float* __restrict__ coefs, const int64_t* __restrict__ rng,
                          float* __restrict__ out, int64_t batch, int64_t n) {
  // Coefficients and RNG state come from device memory: the host never reads them.
  const StepCoefs c{coefs[0], coefs[1], coefs[2], coefs[3], coefs[4], coefs[5]};
  const uint64_t seed = static_cast<uint64_t>(rng[0]);
  const uint32_t step = static_cast<uint32_t>(rng[1]);
  const int64_t sample_offset = rng[2];
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t base = b * n;
    const uint32_t sample = static_cast<uint32_t>(sample_offset + b);
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t i = base + j;
      const float g = HAS_G ? guidance[i] : 0.0f;
      float z = 0.0f;
      if (NOISE == kExplicitNoise) {
        z = noise[i];
      } else if (NOISE == kDrawnNoise) {
        z = cpsample::philox_normal(seed, sample, step, cpsample::kStreamStep,
                                    static_cast<uint32_t>(j));
      }
      out[i] = cpsample::guided_update_element<P, CLIP, HAS_G, CLIPPED_EPS>(x[i], model_out[i], g,
                                                                            z, c);
    }
  }
}

struct LaunchArgs {
  const float* x;
  const float* model_out;
  const float* guidance;
  const float* noise;
  const float* coefs;
  const int64_t* rng;
  float* out;
  int64_t batch;
  int64_t n;
  dim3 grid;
  cudaStream_t stream;
};

template <int P, bool CLIP, bool HAS_G, bool CLIPPED_EPS, int NOISE>
cudaError_t launch(const LaunchArgs& a) {
  _guided_update_kernel<P, CLIP, HAS_G, CLIPPED_EPS, NOISE><<<a.grid, kThreads, 0, a.stream>>>(
      a.x, a.model_out, a.guidance, a.noise, a.coefs, a.rng, a.out, a.batch, a.n);
  return cudaGetLastError();
}

template <int P, bool CLIP, bool HAS_G, bool CLIPPED_EPS>
cudaError_t launch_noise(const LaunchArgs& a, int noise) {
  switch (noise) {
    case kExplicitNoise:
      return launch<P, CLIP, HAS_G, CLIPPED_EPS, kExplicitNoise>(a);
    case kDrawnNoise:
      return launch<P, CLIP, HAS_G, CLIPPED_EPS, kDrawnNoise>(a);
    default:
      return launch<P, CLIP, HAS_G, CLIPPED_EPS, kNoNoise>(a);
  }
}

template <int P, bool CLIP, bool HAS_G>
cudaError_t launch_clipped_eps(const LaunchArgs& a, bool clipped_eps, int noise) {
  return clipped_eps ? launch_noise<P, CLIP, HAS_G, true>(a, noise)
                     : launch_noise<P, CLIP, HAS_G, false>(a, noise);
}

template <int P>
cudaError_t launch_flags(const LaunchArgs& a, bool clip, bool has_g, bool clipped_eps,
                         int noise) {
  if (clip) {
    return has_g ? launch_clipped_eps<P, true, true>(a, clipped_eps, noise)
                 : launch_clipped_eps<P, true, false>(a, clipped_eps, noise);
  }
  return has_g ? launch_clipped_eps<P, false, true>(a, clipped_eps, noise)
               : launch_clipped_eps<P, false, false>(a, clipped_eps, noise);
}

}  // namespace

extern "C" int cpsample_guided_update_cuda(const float* x, const float* model_out,
                                           const float* guidance, const float* noise,
                                           const float* coefs, const int64_t* rng, float* out,
                                           int64_t batch, int64_t numel_per_sample,
                                           int prediction_type, int clip_sample, int draw_noise,
                                           int use_clipped_model_output, cudaStream_t stream) {
  if (batch <= 0 || numel_per_sample <= 0) return static_cast<int>(cudaSuccess);
  if (prediction_type < 0 || prediction_type > 2) return static_cast<int>(cudaErrorInvalidValue);
  int64_t blocks_x = (numel_per_sample + kThreads - 1) / kThreads;
  blocks_x = blocks_x < kMaxBlocksX ? blocks_x : kMaxBlocksX;
  const int64_t blocks_y = batch < kMaxBlocksY ? batch : kMaxBlocksY;
  const LaunchArgs a{x,     model_out, guidance,         noise,
                     coefs, rng,       out,              batch,
                     numel_per_sample, dim3(static_cast<unsigned>(blocks_x),
                                            static_cast<unsigned>(blocks_y)),
                     stream};
  const int mode = noise != nullptr ? kExplicitNoise : (draw_noise ? kDrawnNoise : kNoNoise);
  const bool clip = clip_sample != 0;
  const bool has_g = guidance != nullptr;
  const bool clipped_eps = use_clipped_model_output != 0;
  cudaError_t err;
  switch (prediction_type) {
    case cpsample::kVPrediction:
      err = launch_flags<cpsample::kVPrediction>(a, clip, has_g, clipped_eps, mode);
      break;
    case cpsample::kSample:
      err = launch_flags<cpsample::kSample>(a, clip, has_g, clipped_eps, mode);
      break;
    default:
      err = launch_flags<cpsample::kEpsilon>(a, clip, has_g, clipped_eps, mode);
      break;
  }
  return static_cast<int>(err);
}

// ---------------------------------------------------------------------------------------------
// DPM-Solver++ multistep update: four reads and two writes per element, no RNG.
namespace {

using cpsample::DpmCoefs;

template <int P, bool CLIP, bool HAS_G>
__global__ void __launch_bounds__(kThreads)
    _dpm_update_kernel(const float* __restrict__ x, const float* __restrict__ model_out,
                       const float* __restrict__ guidance, const float* __restrict__ x0_prev,
                       const float* __restrict__ coefs, float* __restrict__ out,
                       float* __restrict__ x0_out, int64_t numel) {
  const DpmCoefs c{coefs[0], coefs[1], coefs[2], coefs[3], coefs[4], coefs[5], coefs[6]};
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = HAS_G ? guidance[i] : 0.0f;
    float x0;
    out[i] = cpsample::dpm_update_element<P, CLIP, HAS_G>(x[i], model_out[i], g, x0_prev[i], c,
                                                          &x0);
    x0_out[i] = x0;
  }
}

struct DpmLaunchArgs {
  const float* x;
  const float* model_out;
  const float* guidance;
  const float* x0_prev;
  const float* coefs;
  float* out;
  float* x0_out;
  int64_t numel;
  unsigned blocks;
  cudaStream_t stream;
};

template <int P, bool CLIP, bool HAS_G>
cudaError_t launch_dpm(const DpmLaunchArgs& a) {
  _dpm_update_kernel<P, CLIP, HAS_G><<<a.blocks, kThreads, 0, a.stream>>>(
      a.x, a.model_out, a.guidance, a.x0_prev, a.coefs, a.out, a.x0_out, a.numel);
  return cudaGetLastError();
}

template <int P>
cudaError_t launch_dpm_flags(const DpmLaunchArgs& a, bool clip, bool has_g) {
  if (clip) return has_g ? launch_dpm<P, true, true>(a) : launch_dpm<P, true, false>(a);
  return has_g ? launch_dpm<P, false, true>(a) : launch_dpm<P, false, false>(a);
}

// Grid-stride: at most this many blocks (enough to fill an H200 several times over).
constexpr int64_t kMaxDpmBlocks = 8192;

}  // namespace

extern "C" int cpsample_dpm_update_cuda(const float* x, const float* model_out,
                                        const float* guidance, const float* x0_prev,
                                        const float* coefs, float* out, float* x0_out,
                                        int64_t numel, int prediction_type, int clip_sample,
                                        cudaStream_t stream) {
  if (numel <= 0) return static_cast<int>(cudaSuccess);
  if (prediction_type < 0 || prediction_type > 2) return static_cast<int>(cudaErrorInvalidValue);
  int64_t blocks = (numel + kThreads - 1) / kThreads;
  blocks = blocks < kMaxDpmBlocks ? blocks : kMaxDpmBlocks;
  const DpmLaunchArgs a{x,   model_out, guidance, x0_prev, coefs, out, x0_out, numel,
                        static_cast<unsigned>(blocks), stream};
  const bool clip = clip_sample != 0;
  const bool has_g = guidance != nullptr;
  cudaError_t err;
  switch (prediction_type) {
    case cpsample::kVPrediction:
      err = launch_dpm_flags<cpsample::kVPrediction>(a, clip, has_g);
      break;
    case cpsample::kSample:
      err = launch_dpm_flags<cpsample::kSample>(a, clip, has_g);
      break;
    default:
      err = launch_dpm_flags<cpsample::kEpsilon>(a, clip, has_g);
      break;
  }
  return static_cast<int>(err);
}
