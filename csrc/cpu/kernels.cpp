// C++ CPU kernels: OpenMP over chunks of elements, a vectorisable inner loop per chunk.
//
// Compiled with -ffp-contract=off (CMakeLists.txt) so that no multiply-add is fused: each float32
// operation rounds as in the torch eager evaluation of the same formula, whatever -march is used.
#include "cpu/kernels.h"

#include <algorithm>

#include "cpsample/step_math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace cpsample {
namespace cpu {
namespace {

// Elements per OpenMP work item; 4096 floats x 4 arrays stay in L1/L2 and the z buffers below
// (2 x 16 KiB) fit on the stack.
constexpr int64_t kChunk = 4096;
// Below this many elements one thread is faster than waking a team (~5-10 us per region).
constexpr int64_t kMinParallelElements = int64_t{1} << 15;

// One chunk [j0, j1) of sample b. Templated so that the inner loop has no branches left.
template <int P, bool CLIP, bool HAS_G, bool CLIPPED_EPS, int NOISE>
void update_chunk(const GuidedUpdateArgs& a, const StepCoefs& c, uint64_t seed, uint32_t step,
                  uint32_t sample, int64_t b, int64_t j0, int64_t j1) {
  const int64_t base = b * a.numel_per_sample;
  const float* __restrict__ x = a.x + base;
  const float* __restrict__ o = a.model_out + base;
  const float* __restrict__ g = HAS_G ? a.guidance + base : nullptr;
  float* __restrict__ out = a.out + base;
  // z[j - z_first] is the noise of element j: the explicit tensor is indexed from the sample's
  // start, the drawn buffer from the chunk's (no pointer is formed outside either array).
  const float* __restrict__ z = nullptr;
  int64_t z_first = 0;
  float z_buf[kChunk];
  if (NOISE == kExplicitNoise) {
    z = a.noise + base;
  } else if (NOISE == kDrawnNoise) {
    // Philox words to uniforms first (integer loop, vectorisable), then Box-Muller (scalar
    // logf/cosf: libm has no vector variants without -ffast-math, which we must not use).
    float u2_buf[kChunk];
    const uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffu);
    const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
    for (int64_t j = j0; j < j1; ++j) {
      const PhiloxOut w = philox4x32_10(static_cast<uint32_t>(j), sample, step, kStreamStep, k0, k1);
      z_buf[j - j0] = uint_to_uniform_float(w.w0);
      u2_buf[j - j0] = uint_to_uniform_float(w.w1);
    }
    for (int64_t j = 0; j < j1 - j0; ++j) {
      z_buf[j] = box_muller(z_buf[j], u2_buf[j]);
    }
    z = z_buf;
    z_first = j0;
  }
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    const float gj = HAS_G ? g[j] : 0.0f;
    const float zj = NOISE == kNoNoise ? 0.0f : z[j - z_first];
    out[j] = guided_update_element<P, CLIP, HAS_G, CLIPPED_EPS>(x[j], o[j], gj, zj, c);
  }
}

using ChunkFn = void (*)(const GuidedUpdateArgs&, const StepCoefs&, uint64_t, uint32_t, uint32_t,
                         int64_t, int64_t, int64_t);

template <int P, bool CLIP, bool HAS_G, bool CLIPPED_EPS>
ChunkFn select_noise(int noise) {
  switch (noise) {
    case kExplicitNoise:
      return &update_chunk<P, CLIP, HAS_G, CLIPPED_EPS, kExplicitNoise>;
    case kDrawnNoise:
      return &update_chunk<P, CLIP, HAS_G, CLIPPED_EPS, kDrawnNoise>;
    default:
      return &update_chunk<P, CLIP, HAS_G, CLIPPED_EPS, kNoNoise>;
  }
}

template <int P, bool CLIP, bool HAS_G>
ChunkFn select_clipped_eps(bool clipped_eps, int noise) {
  return clipped_eps ? select_noise<P, CLIP, HAS_G, true>(noise)
                     : select_noise<P, CLIP, HAS_G, false>(noise);
}

template <int P>
ChunkFn select_flags(bool clip, bool has_g, bool clipped_eps, int noise) {
  if (clip) {
    return has_g ? select_clipped_eps<P, true, true>(clipped_eps, noise)
                 : select_clipped_eps<P, true, false>(clipped_eps, noise);
  }
  return has_g ? select_clipped_eps<P, false, true>(clipped_eps, noise)
               : select_clipped_eps<P, false, false>(clipped_eps, noise);
}

ChunkFn select_chunk_fn(int prediction_type, bool clip, bool has_g, bool clipped_eps, int noise) {
  switch (prediction_type) {
    case kVPrediction:
      return select_flags<kVPrediction>(clip, has_g, clipped_eps, noise);
    case kSample:
      return select_flags<kSample>(clip, has_g, clipped_eps, noise);
    default:
      return select_flags<kEpsilon>(clip, has_g, clipped_eps, noise);
  }
}

int thread_count(int64_t total_elements, int requested) {
  if (total_elements < kMinParallelElements) return 1;
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

}  // namespace

void guided_update(const GuidedUpdateArgs& a) {
  const int64_t n = a.numel_per_sample;
  if (a.batch <= 0 || n <= 0) return;
  const StepCoefs c{a.coefs[0], a.coefs[1], a.coefs[2], a.coefs[3], a.coefs[4], a.coefs[5]};
  const uint64_t seed = static_cast<uint64_t>(a.rng[0]);
  const uint32_t step = static_cast<uint32_t>(a.rng[1]);
  const int64_t sample_offset = a.rng[2];
  const int noise = a.noise != nullptr ? kExplicitNoise : (a.draw_noise ? kDrawnNoise : kNoNoise);
  const ChunkFn fn = select_chunk_fn(a.prediction_type, a.clip_sample, a.guidance != nullptr,
                                     a.use_clipped_model_output, noise);

  const int64_t chunks_per_sample = (n + kChunk - 1) / kChunk;
  const int64_t total_chunks = a.batch * chunks_per_sample;
  const int threads = thread_count(a.batch * n, a.num_threads);
  (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t t = 0; t < total_chunks; ++t) {
    const int64_t b = t / chunks_per_sample;
    const int64_t j0 = (t % chunks_per_sample) * kChunk;
    const int64_t j1 = std::min(n, j0 + kChunk);
    // Counter word c1 is the low 32 bits of the global sample index, as in Triton's int64 offset.
    const uint32_t sample = static_cast<uint32_t>(sample_offset + b);
    fn(a, c, seed, step, sample, b, j0, j1);
  }
}

void philox_normal(uint64_t seed, const int64_t* sample_index, int64_t batch, uint32_t step,
                   uint32_t stream, int64_t numel_per_sample, float* out, int num_threads) {
  const int64_t n = numel_per_sample;
  if (batch <= 0 || n <= 0) return;
  const int64_t chunks_per_sample = (n + kChunk - 1) / kChunk;
  const int64_t total_chunks = batch * chunks_per_sample;
  const int threads = thread_count(batch * n, num_threads);
  (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t t = 0; t < total_chunks; ++t) {
    const int64_t b = t / chunks_per_sample;
    const int64_t j0 = (t % chunks_per_sample) * kChunk;
    const int64_t j1 = std::min(n, j0 + kChunk);
    const uint32_t sample = static_cast<uint32_t>(sample_index[b]);
    float* row = out + b * n;
    for (int64_t j = j0; j < j1; ++j) {
      row[j] = cpsample::philox_normal(seed, sample, step, stream, static_cast<uint32_t>(j));
    }
  }
}

namespace {

template <int P, bool CLIP, bool HAS_G>
void dpm_range(const DpmUpdateArgs& a, const DpmCoefs& c, int64_t i0, int64_t i1) {
  const float* __restrict__ x = a.x;
  const float* __restrict__ o = a.model_out;
  const float* __restrict__ g = a.guidance;
  const float* __restrict__ prev = a.x0_prev;
  float* __restrict__ out = a.out;
  float* __restrict__ x0_out = a.x0_out;
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const float gi = HAS_G ? g[i] : 0.0f;
    float x0;
    out[i] = dpm_update_element<P, CLIP, HAS_G>(x[i], o[i], gi, prev[i], c, &x0);
    x0_out[i] = x0;
  }
}

using DpmRangeFn = void (*)(const DpmUpdateArgs&, const DpmCoefs&, int64_t, int64_t);

template <int P>
DpmRangeFn select_dpm_flags(bool clip, bool has_g) {
  if (clip) return has_g ? &dpm_range<P, true, true> : &dpm_range<P, true, false>;
  return has_g ? &dpm_range<P, false, true> : &dpm_range<P, false, false>;
}

}  // namespace

void dpm_update(const DpmUpdateArgs& a) {
  const int64_t total = a.batch * a.numel_per_sample;
  if (a.batch <= 0 || a.numel_per_sample <= 0) return;
  const DpmCoefs c{a.coefs[0], a.coefs[1], a.coefs[2], a.coefs[3],
                   a.coefs[4], a.coefs[5], a.coefs[6]};
  DpmRangeFn fn;
  switch (a.prediction_type) {
    case kVPrediction:
      fn = select_dpm_flags<kVPrediction>(a.clip_sample, a.guidance != nullptr);
      break;
    case kSample:
      fn = select_dpm_flags<kSample>(a.clip_sample, a.guidance != nullptr);
      break;
    default:
      fn = select_dpm_flags<kEpsilon>(a.clip_sample, a.guidance != nullptr);
      break;
  }
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  const int threads = thread_count(total, a.num_threads);
  (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t t = 0; t < chunks; ++t) {
    fn(a, c, t * kChunk, std::min(total, (t + 1) * kChunk));
  }
}

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace cpsample
