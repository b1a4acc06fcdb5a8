// The pybind11 module cpsample_fast._C: argument checks, device dispatch, build information.
//
// The kernels themselves are torch-free (csrc/cpu/kernels.cpp, csrc/cuda/guided_update.cu); this
// is the only translation unit of the CPU build that includes torch headers.
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <string>

#include "cpsample/step_math.h"
#include "cpu/kernels.h"
#ifdef CPSAMPLE_WITH_CUDA
#include "cuda/binding.h"
#endif

namespace py = pybind11;

namespace {

constexpr int64_t kMaxNumelPerSample = int64_t{1} << 32;  // counter word c0 is 32 bits

// c10 errors carry a C++ backtrace in what(); users get the message alone, as the Python type
// the message promises (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError).
template <typename Fn>
auto translate_errors(Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const c10::ValueError& e) {
    throw py::value_error(e.msg());
  } catch (const c10::TypeError& e) {
    throw py::type_error(e.msg());
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.msg());
  }
}

void check_float_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "guided_update: ", name,
                   " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "guided_update: ", name, " must be on ", x.device(),
                    " like x, got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), "guided_update: ", name, " must have x's shape ",
                    x.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "guided_update: ", name,
                    " must be contiguous (call .contiguous())");
}

void check_small(const at::Tensor& t, const char* name, at::ScalarType dtype,
                 const char* dtype_name, int64_t numel, const at::Tensor& x, const char* what) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "guided_update: ", name, " must be ", dtype_name, " ",
                   what, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == numel && t.dim() == 1, "guided_update: ", name, " must have shape [",
                    numel, "] ", what, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), "guided_update: ", name, " must be on ", x.device(),
                    " like x (the kernel reads it there, without a host sync), got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), "guided_update: ", name, " must be contiguous");
}

at::Tensor guided_update(const at::Tensor& x, const at::Tensor& model_out,
                         const std::optional<at::Tensor>& guidance,
                         const std::optional<at::Tensor>& noise, const at::Tensor& coefs,
                         const at::Tensor& rng, int64_t prediction_type, bool clip_sample,
                         bool draw_noise, bool use_clipped_model_output) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "guided_update: x must be float32, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "guided_update: x must have a batch dimension [B, ...], got a ",
                    x.dim(), "-d tensor");
  TORCH_CHECK_VALUE(x.is_contiguous(), "guided_update: x must be contiguous (call .contiguous())");
  check_float_like_x(model_out, "model_out", x);
  if (guidance.has_value()) check_float_like_x(*guidance, "guidance", x);
  if (noise.has_value()) check_float_like_x(*noise, "noise", x);
  check_small(coefs, "coefs", at::kFloat, "float32", 6, x, "(sa, s1, sp, d, sigma, clip_range)");
  check_small(rng, "rng", at::kLong, "int64", 3, x, "(seed, step, sample_offset)");
  TORCH_CHECK_VALUE(prediction_type >= 0 && prediction_type <= 2,
                    "guided_update: prediction_type must be 0 (epsilon), 1 (v_prediction) or 2 "
                    "(sample), got ",
                    prediction_type);
  const int64_t batch = x.size(0);
  const int64_t n = batch > 0 ? x.numel() / batch : 0;
  TORCH_CHECK_VALUE(n < kMaxNumelPerSample, "guided_update: a sample of x has ", n,
                    " elements; the Philox element counter allows fewer than 2**32");

  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  if (x.is_cuda()) {
#ifdef CPSAMPLE_WITH_CUDA
    cpsample::cuda::guided_update(x, model_out, guidance, noise, coefs, rng, out,
                                  static_cast<int>(prediction_type), clip_sample, draw_noise,
                                  use_clipped_model_output);
    return out;
#else
    TORCH_CHECK(false,
                "guided_update: x is a CUDA tensor but cpsample_fast._C was built without its CUDA "
                "part (CPU-only torch or CPSAMPLE_BUILD_CUDA=0); rebuild with a CUDA toolkit and "
                "a CUDA-enabled torch, or use backend='triton' / 'torch'");
#endif
  }
  TORCH_CHECK_VALUE(x.is_cpu(), "guided_update: x must be a CPU or CUDA tensor, got ", x.device());
  cpsample::cpu::GuidedUpdateArgs args{};
  args.x = x.data_ptr<float>();
  args.model_out = model_out.data_ptr<float>();
  args.guidance = guidance.has_value() ? guidance->data_ptr<float>() : nullptr;
  args.noise = noise.has_value() ? noise->data_ptr<float>() : nullptr;
  args.out = out.data_ptr<float>();
  args.coefs = coefs.data_ptr<float>();
  args.rng = rng.data_ptr<int64_t>();
  args.batch = batch;
  args.numel_per_sample = n;
  args.prediction_type = static_cast<int>(prediction_type);
  args.clip_sample = clip_sample;
  args.draw_noise = draw_noise;
  args.use_clipped_model_output = use_clipped_model_output;
  args.num_threads = at::get_num_threads();  // follows torch.set_num_threads
  {
    // The kernel only reads raw buffers: let other Python threads run meanwhile.
    py::gil_scoped_release no_gil;
    cpsample::cpu::guided_update(args);
  }
  return out;
}

at::Tensor philox_normal(uint64_t seed, const at::Tensor& sample_index, int64_t step,
                         int64_t stream, int64_t numel_per_sample) {
  TORCH_CHECK_TYPE(sample_index.scalar_type() == at::kLong,
                   "philox_normal: sample_index must be int64, got ", sample_index.scalar_type());
  TORCH_CHECK_VALUE(sample_index.dim() == 1, "philox_normal: sample_index must have shape [B], got ",
                    sample_index.sizes());
  TORCH_CHECK_VALUE(sample_index.is_cpu(), "philox_normal: sample_index must be a CPU tensor, got ",
                    sample_index.device());
  TORCH_CHECK_VALUE(numel_per_sample >= 0 && numel_per_sample < kMaxNumelPerSample,
                    "philox_normal: numel_per_sample must be in [0, 2**32), got ",
                    numel_per_sample);
  TORCH_CHECK_VALUE(step >= 0 && step <= UINT32_MAX, "philox_normal: step must be in [0, 2**32), got ",
                    step);
  TORCH_CHECK_VALUE(stream >= 0 && stream <= UINT32_MAX,
                    "philox_normal: stream must be in [0, 2**32), got ", stream);
  const at::Tensor index = sample_index.contiguous();
  at::Tensor out = at::empty({index.size(0), numel_per_sample}, at::kFloat);
  const int64_t* idx = index.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  const int threads = at::get_num_threads();
  {
    py::gil_scoped_release no_gil;
    cpsample::cpu::philox_normal(seed, idx, index.size(0),
                                 static_cast<uint32_t>(step), static_cast<uint32_t>(stream),
                                 numel_per_sample, dst, threads);
  }
  return out;
}

// A Python int seed in [-2**63, 2**64) as its 64 bits (two's complement), as noise.py takes it.
uint64_t seed_bits(const py::int_& seed) {
  int overflow = 0;
  const long long value = PyLong_AsLongLongAndOverflow(seed.ptr(), &overflow);
  if (overflow == 0) {
    if (value == -1 && PyErr_Occurred()) throw py::error_already_set();
    return static_cast<uint64_t>(value);
  }
  if (overflow > 0) {
    const unsigned long long u = PyLong_AsUnsignedLongLong(seed.ptr());
    if (!(u == static_cast<unsigned long long>(-1) && PyErr_Occurred())) return u;
    PyErr_Clear();
  }
  throw py::value_error("seed must lie in [-2**63, 2**64), got " +
                        py::str(seed).cast<std::string>());
}

// The raw Philox4x32-10 words, for known-answer tests of the arithmetic the kernels share.
at::Tensor philox4x32_10(const at::Tensor& counters, uint64_t seed) {
  TORCH_CHECK_TYPE(counters.scalar_type() == at::kLong,
                   "philox4x32_10: counters must be int64, got ", counters.scalar_type());
  TORCH_CHECK_VALUE(counters.dim() == 2 && counters.size(1) == 4 && counters.is_cpu(),
                    "philox4x32_10: counters must be a CPU tensor [N, 4], got ", counters.sizes(),
                    " on ", counters.device());
  const at::Tensor c = counters.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t* src = c.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  const auto k0 = static_cast<uint32_t>(seed & 0xffffffffu);
  const auto k1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t r = 0; r < c.size(0); ++r) {
    const int64_t* w = src + 4 * r;
    const cpsample::PhiloxOut o = cpsample::philox4x32_10(
        static_cast<uint32_t>(w[0]), static_cast<uint32_t>(w[1]), static_cast<uint32_t>(w[2]),
        static_cast<uint32_t>(w[3]), k0, k1);
    dst[4 * r + 0] = o.w0;
    dst[4 * r + 1] = o.w1;
    dst[4 * r + 2] = o.w2;
    dst[4 * r + 3] = o.w3;
  }
  return out;
}

std::string compiler_name() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict info;
#ifdef CPSAMPLE_WITH_CUDA
  info["cuda"] = true;
  info["cuda_runtime_version"] = cpsample::cuda::runtime_version();
#else
  info["cuda"] = false;
  info["cuda_runtime_version"] = py::none();
#endif
  info["openmp"] = cpsample::cpu::openmp_enabled();
  info["compiler"] = compiler_name();
#ifdef CPSAMPLE_CPU_ARCH
  info["cpu_arch"] = CPSAMPLE_CPU_ARCH;
#else
  info["cpu_arch"] = "default";
#endif
#ifdef CPSAMPLE_TORCH_VERSION
  info["torch_version"] = CPSAMPLE_TORCH_VERSION;  // the torch it was compiled against
#else
  info["torch_version"] = py::none();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cpsample_fast C++ CPU / CUDA kernels (see csrc/ and docs/CONTRACTS.md).";
  m.def(
      "guided_update",
      [](const at::Tensor& x, const at::Tensor& model_out,
         const std::optional<at::Tensor>& guidance, const std::optional<at::Tensor>& noise,
         const at::Tensor& coefs, const at::Tensor& rng, int64_t prediction_type,
         bool clip_sample, bool draw_noise, bool use_clipped_model_output) {
        return translate_errors([&] {
          return guided_update(x, model_out, guidance, noise, coefs, rng, prediction_type,
                               clip_sample, draw_noise, use_clipped_model_output);
        });
      },
      py::arg("x"), py::arg("model_out"), py::arg("guidance"), py::arg("noise"), py::arg("coefs"),
      py::arg("rng"), py::arg("prediction_type"), py::arg("clip_sample"), py::arg("draw_noise"),
      py::arg("use_clipped_model_output") = false,
      R"doc(Fused CPSample update x_t -> x_{t'} (docs/CONTRACTS.md "The fused update").

Args:
    x: float32 [B, ...] contiguous, x_t.
    model_out: float32 like x, raw eps-model output.
    guidance: float32 like x (guidance term G), or None for G = 0.
    noise: float32 like x (explicit z), or None. Takes precedence over draw_noise.
    coefs: float32 [6] on x's device: (sa, s1, sp, d, sigma, clip_range).
    rng: int64 [3] on x's device: (seed, step, sample_offset).
    prediction_type: 0 epsilon, 1 v_prediction, 2 sample.
    clip_sample: clamp x0_hat to +-clip_range (clip-consistent: eps_hat carries only the
        guidance's shift of x0_hat that survived the clip).
    draw_noise: without `noise`, draw z from Philox (counter j, sample_offset + b, step, 0).
    use_clipped_model_output: eps_hat = (x - sa*x0_hat)/s1, as diffusers' DDIMScheduler.step.

Returns:
    float32 tensor like x: x_{t'}.
)doc");
  m.def(
      "philox_normal",
      [](const py::int_& seed, const at::Tensor& sample_index, int64_t step, int64_t stream,
         int64_t numel_per_sample) {
        const uint64_t key = seed_bits(seed);
        return translate_errors(
            [&] { return philox_normal(key, sample_index, step, stream, numel_per_sample); });
      },
      py::arg("seed"), py::arg("sample_index"), py::arg("step"), py::arg("stream"),
      py::arg("numel_per_sample"),
      R"doc(Counter-based standard normals on the CPU (docs/CONTRACTS.md noise contract).

Args:
    seed: Python int in [-2**63, 2**64); its 64 bits are the Philox key
        (key = (seed & 0xffffffff, seed >> 32)).
    sample_index: int64 [B] global sample indices (counter word c1).
    step: loop step k (counter word c2).
    stream: 0 step noise, 1 initial noise (counter word c3).
    numel_per_sample: elements per sample (counter word c0 runs over 0..n-1).

Returns:
    float32 [B, numel_per_sample].
)doc");
  m.def(
      "philox4x32_10",
      [](const at::Tensor& counters, const py::int_& seed) {
        const uint64_t key = seed_bits(seed);
        return translate_errors([&] { return philox4x32_10(counters, key); });
      },
      py::arg("counters"), py::arg("seed"),
      R"doc(Philox4x32-10 words of step_math.h (for known-answer tests).

Args:
    counters: int64 [N, 4] counter words (low 32 bits used).
    seed: Python int in [-2**63, 2**64); key = (seed & 0xffffffff, seed >> 32).

Returns:
    int64 [N, 4], the output words in [0, 2**32).
)doc");
  m.def("build_info", &build_info,
        "Dict: cuda (bool), cuda_runtime_version, openmp (bool), compiler, cpu_arch, "
        "torch_version.");
}
