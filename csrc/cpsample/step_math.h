// Per-element math of one CPSample step, shared by the C++ CPU and the CUDA builds.
//
// No torch headers here: nvcc compiles this alone (`make check-cuda`) and the CPU kernel includes
// it in a torch-free translation unit. Everything is float32 arithmetic in the operation order of
// docs/CONTRACTS.md "The fused update", so the CPU kernel (built with -ffp-contract=off) rounds
// exactly like the float32 torch evaluation of the same formula.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define CPSAMPLE_HD __host__ __device__ __forceinline__
#else
#define CPSAMPLE_HD inline
#endif

#if !defined(__CUDACC__)
#include <math.h>
#endif

namespace cpsample {

// Integer ids mirrored from cpsample_fast/constants.py (tests/test_constants.py checks they agree).
// Prediction types, as the integers passed through the bindings (docs/CONTRACTS.md).
enum PredictionType : int { kEpsilon = 0, kVPrediction = 1, kSample = 2 };
// Where the step noise z comes from: none, an explicit tensor, or drawn in the kernel.
enum NoiseMode : int { kNoNoise = 0, kExplicitNoise = 1, kDrawnNoise = 2 };

// Philox4x32-10 constants, identical to triton.language.random.philox (and Random123).
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// Counter word c3: which stream a normal belongs to.
constexpr uint32_t kStreamStep = 0;     // per-step noise z
constexpr uint32_t kStreamInitial = 1;  // initial noise x_T
constexpr uint32_t kStreamMembership = 2;  // forward-noising of the membership attack

struct PhiloxOut {
  uint32_t w0, w1, w2, w3;
};

CPSAMPLE_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten Philox rounds on counter (c0, c1, c2, c3) with key (k0, k1), in the order of Triton's
// philox_impl: the key is raised after every round.
CPSAMPLE_HD PhiloxOut philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                    uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint32_t a0 = c0;
    const uint32_t a2 = c2;
    c0 = mulhi32(kPhiloxRoundB, a2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, a0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * a2;
    c3 = kPhiloxRoundA * a0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return PhiloxOut{c0, c1, c2, c3};
}

// Triton's uint_to_uniform_float for 32-bit words: bitcast to int32, x < 0 -> ~x, times the
// largest scale with INT32_MAX * scale < 1 in float32. Result in [0, 1).
CPSAMPLE_HD float uint_to_uniform_float(uint32_t w) {
  int32_t x = static_cast<int32_t>(w);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Box-Muller, first output only, as Triton's pair_uniform_to_normal (float32 throughout).
CPSAMPLE_HD float box_muller(float u1, float u2) {
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float th = 6.283185307179586f * u2;
  const float r = sqrtf(-2.0f * logf(u1));
  return r * cosf(th);
}

// The standard normal for (seed, sample index i, step k, element j, stream). With step = 0 and
// stream = 0 it equals tl.randn(seed, (i << 32) | j) in Triton 3.8.
CPSAMPLE_HD float philox_normal(uint64_t seed, uint32_t sample_index, uint32_t step,
                                uint32_t stream, uint32_t element) {
  const PhiloxOut w =
      philox4x32_10(element, sample_index, step, stream, static_cast<uint32_t>(seed & 0xffffffffu),
                    static_cast<uint32_t>(seed >> 32));
  return box_muller(uint_to_uniform_float(w.w0), uint_to_uniform_float(w.w1));
}

// Step coefficients, in the order of the `coefs` tensor [6] of the bindings.
struct StepCoefs {
  float sa;     // sqrt(alpha_bar_t)
  float s1;     // sqrt(1 - alpha_bar_t)
  float sp;     // sqrt(alpha_bar_prev)
  float d;      // sqrt(1 - alpha_bar_prev - sigma^2)
  float sigma;  // eta * ... (docs/ALGORITHM.md §3 step 7)
  float clip;   // clip_sample_range
};

// clamp(v, -c, c) keeping NaN, as torch.clamp (fminf/fmaxf would turn NaN into the bound).
CPSAMPLE_HD float clamp_keep_nan(float v, float c) {
  v = v < -c ? -c : v;
  return v > c ? c : v;
}

// docs/CONTRACTS.md "The fused update" for one element: guidance after the clip. `g` is the
// guidance term (read only when HAS_G), `z` the noise (0 when absent). P, CLIP, HAS_G and
// CLIPPED_EPS (diffusers' use_clipped_model_output) are compile-time so the CPU loop vectorises.
template <int P, bool CLIP, bool HAS_G, bool CLIPPED_EPS>
CPSAMPLE_HD float guided_update_element(float x, float o, float g, float z, const StepCoefs& c) {
  float x0;
  float eps;
  // §3.1 x0 and eps from the model output
  if (P == kEpsilon) {
    eps = o;
    x0 = (x - c.s1 * o) / c.sa;
  } else if (P == kSample) {
    x0 = o;
    eps = (x - c.sa * o) / c.s1;
  } else {  // kVPrediction
    x0 = c.sa * x - c.s1 * o;
    eps = c.sa * o + c.s1 * x;
  }
  // §3.6a clip the model's own x0, as in diffusers' step
  if (CLIP) x0 = clamp_keep_nan(x0, c.clip);
  // §3.6b guidance after the clip: the (x0, eps) pair moves consistently whatever the clip did
  if (HAS_G) {
    x0 = x0 - (c.s1 / c.sa) * g;
    eps = eps + g;
  }
  // §3.6c use_clipped_model_output: eps from the final x0
  if (CLIPPED_EPS) eps = (x - c.sa * x0) / c.s1;
  // §3.7 DDIM update: sp*x0 + d*eps + sigma*z
  return c.sp * x0 + c.d * eps + c.sigma * z;
}

// Coefficients of one DPM-Solver++(2M) step, in the order of the `coefs` tensor [7] of the
// multistep update (cpsample_fast/solvers.py computes them exactly as diffusers does).
struct DpmCoefs {
  float alpha_s;  // alpha of the current sigma (model output -> x0)
  float sigma_s;  // sigma_t of the current sigma
  float A;        // sigma_next / sigma_s
  float B;        // alpha_next * (exp(-h) - 1)
  float C;        // B / 2 on second-order steps, 0 on first-order ones
  float R;        // 1 / r0 on second-order steps, 0 on first-order ones
  float clip;     // clip_sample_range
};

// docs/CONTRACTS.md "The multistep update" for one element: the data prediction x0 (clipped
// when CLIP, then guided as in DDIM) and x_next = A*x - B*x0 - C*(R*(x0 - x0_prev)), in diffusers'
// operation order (a first-order step has C = R = 0, which subtracts an exact zero). Writes x0
// to *x0_out (the next step's x0_prev) and returns x_next.
template <int P, bool CLIP, bool HAS_G>
CPSAMPLE_HD float dpm_update_element(float x, float o, float g, float x0_prev, const DpmCoefs& c,
                                     float* x0_out) {
  float x0;
  // §3.1 x0 from the model output
  if (P == kEpsilon) {
    x0 = (x - c.sigma_s * o) / c.alpha_s;
  } else if (P == kSample) {
    x0 = o;
  } else {  // kVPrediction
    x0 = c.alpha_s * x - c.sigma_s * o;
  }
  // §3.6a clip the model's own x0
  if (CLIP) x0 = clamp_keep_nan(x0, c.clip);
  // §3.6b guidance after the clip: x0 - (sigma_s/alpha_s)*g
  if (HAS_G) x0 = x0 - (c.sigma_s / c.alpha_s) * g;
  *x0_out = x0;
  // DPM multistep update, in diffusers' operation order
  const float d1 = c.R * (x0 - x0_prev);
  return (c.A * x - c.B * x0) - c.C * d1;
}

}  // namespace cpsample
