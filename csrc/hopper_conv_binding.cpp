// Python entry point of csrc/hopper_conv.cu: checks what the kernel assumes of its operands and
// launches it on the current stream of the operands' device. Failures come back as a message (an
// empty string is success), as in mish2_binding.cpp: a failed TORCH_CHECK crashed the process on
// the H100 machine.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <string>

namespace hopper_conv {
std::string launch(int dtype, int mish_count, const void* xp, const void* wk, const void* bias, void* out,
                   long long rows, int out_h, int out_w, int cout, int hp, int wp, int kh, int kw, int dh, int dw,
                   int sh, int sw, int cp, int stages, int consumers, int rowbox, int channels_last, int epilogue,
                   int sms, int mode, cudaStream_t stream);
}

namespace {

int dtype_code(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return 0;
    case torch::kBFloat16: return 1;
    case torch::kFloat16: return 2;
    default: return -1;
  }
}

// xp: [N, Hp, Wp, Cp] padded NHWC input; wk: [Cout, KH * KW * Cp]; out: [N, Cout, OH, OW], contiguous
// (NCHW) or channels_last.
std::string conv_mish(const torch::Tensor& xp, const torch::Tensor& wk, const c10::optional<torch::Tensor>& bias,
                      const torch::Tensor& out, int64_t kh, int64_t kw, int64_t dh, int64_t dw, int64_t sh, int64_t sw,
                      int64_t mish_count, bool channels_last, int64_t stages, int64_t consumers, bool rowbox,
                      int64_t epilogue, int64_t mode) {
  if (!xp.is_cuda() || !wk.is_cuda() || !out.is_cuda()) return "hopper_conv: operands must be CUDA tensors";
  if (xp.device() != wk.device() || xp.device() != out.device()) return "hopper_conv: operands on different devices";
  const int dtype = dtype_code(xp);
  if (dtype < 0 || wk.scalar_type() != xp.scalar_type() || out.scalar_type() != xp.scalar_type())
    return "hopper_conv: operands must share one dtype of float32, bfloat16, float16";
  if (xp.dim() != 4 || !xp.is_contiguous()) return "hopper_conv: padded input must be contiguous [N, Hp, Wp, Cp]";
  const int64_t n = xp.size(0), hp = xp.size(1), wp = xp.size(2), cp = xp.size(3);
  if (wk.dim() != 2 || !wk.is_contiguous() || wk.size(1) != kh * kw * cp)
    return "hopper_conv: packed weight must be contiguous [Cout, KH * KW * Cp]";
  const int64_t cout = wk.size(0);
  // the padded width may carry zero columns past the conv's own padding (a multiple of sw)
  if (sh < 1 || sw < 1) return "hopper_conv: strides must be positive";
  if (hp - dh * (kh - 1) < 1 || wp - dw * (kw - 1) < 1) return "hopper_conv: the kernel is larger than the padded input";
  const int64_t out_h = (hp - dh * (kh - 1) - 1) / sh + 1;
  if (out.dim() != 4 || out.size(0) != n || out.size(1) != cout || out.size(2) != out_h || out.size(3) < 1 ||
      (out.size(3) - 1) * sw + dw * (kw - 1) >= wp)
    return "hopper_conv: output has the wrong shape";
  const int64_t out_w = out.size(3);
  if (!out.is_contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous))
    return "hopper_conv: output is not in the asked layout";
  if (channels_last && cout % 2 != 0) return "hopper_conv: channels_last output needs an even Cout";
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    const auto& b = *bias;
    if (!b.is_cuda() || b.device() != xp.device() || b.scalar_type() != xp.scalar_type() || !b.is_contiguous() ||
        b.numel() != cout)
      return "hopper_conv: bias must be a contiguous [Cout] tensor of the operands' dtype and device";
    bias_ptr = b.data_ptr();
  }
  if (mish_count != 1 && mish_count != 2) return "hopper_conv: mish_count must be 1 or 2";
  if (out.numel() == 0) return "";
  const c10::cuda::CUDAGuard guard(xp.device());
  const int index = xp.device().index();
  const int sms = at::cuda::getDeviceProperties(index)->multiProcessorCount;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(index).stream();
  return hopper_conv::launch(dtype, static_cast<int>(mish_count), xp.data_ptr(), wk.data_ptr(), bias_ptr,
                             out.data_ptr(), n * hp * wp, static_cast<int>(out_h), static_cast<int>(out_w),
                             static_cast<int>(cout), static_cast<int>(hp), static_cast<int>(wp), static_cast<int>(kh),
                             static_cast<int>(kw), static_cast<int>(dh), static_cast<int>(dw),
                             static_cast<int>(sh), static_cast<int>(sw), static_cast<int>(cp),
                             static_cast<int>(stages), static_cast<int>(consumers), rowbox ? 1 : 0,
                             channels_last ? 1 : 0, static_cast<int>(epilogue), sms, static_cast<int>(mode), stream);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv_mish", &conv_mish, "implicit-GEMM conv + bias + Mish (x mish_count) on sm_90a", py::arg("xp"),
        py::arg("wk"), py::arg("bias"), py::arg("out"), py::arg("kh"), py::arg("kw"), py::arg("dh"), py::arg("dw"),
        py::arg("sh"), py::arg("sw"), py::arg("mish_count"), py::arg("channels_last"), py::arg("stages"),
        py::arg("consumers"), py::arg("rowbox"), py::arg("epilogue"), py::arg("mode") = 0);
}
