// Python entry points of csrc/mish2.cu, csrc/grad_bias.cu and csrc/epilogue_nchw.cu, for torch.utils.cpp_extension.load.
//
// torch/csrc/utils/pybind.h brings pybind11 with torch's Tensor conversions and nothing else:
// this file compiles in about 10 s, where torch/extension.h (all of libtorch's C++ API) takes 80.
// Bad arguments and launch failures come back as a message that mishops.backends.cuda raises as
// RuntimeError, instead of TORCH_CHECK: on the H100 machine a failed TORCH_CHECK in this extension
// (from either file, with torch/extension.h too) killed the process with SIGSEGV.

#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>

std::string mish2_forward_unchecked(const at::Tensor& x, const at::Tensor& out);
std::string mish2_backward_unchecked(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& grad_in);
std::string bias_mish2_nhwc_to_nchw_unchecked(const at::Tensor& y, const at::Tensor* bias, const at::Tensor& out);
std::string grad_bias_unchecked(const at::Tensor& z, const at::Tensor& g, const at::Tensor& dz,
                                const at::Tensor& partial, int64_t channels, int64_t inner, int64_t blocks,
                                int64_t mish_count);

namespace {

// Plain std::string concatenation only: on the H100 machine, formatting torch types into a message
// (c10::str of sizes, devices, dtypes) crashed the process with SIGSEGV even with no exception
// thrown. mishops.backends.cuda.checked adds the tensors' details in Python.
std::string check_flat(const at::Tensor& t, const char* name) {
  const std::string what = std::string("mish2: ") + name;
  if (!t.is_cuda()) return what + " must be a CUDA tensor";
  const auto dtype = t.scalar_type();
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) {
    return what + " must be float32, float16 or bfloat16";
  }
  if (t.dim() != 1 || !t.is_contiguous()) {
    return what + " must be a flat 1-D contiguous view of dense storage (mishops.layout.flat)";
  }
  return {};
}

std::string check_like(const at::Tensor& t, const char* name, const at::Tensor& x) {
  auto message = check_flat(t, name);
  if (message.empty() && (t.device() != x.device() || t.scalar_type() != x.scalar_type() || t.numel() != x.numel())) {
    message = std::string("mish2: ") + name + " must match x in device, dtype and numel";
  }
  return message;
}

std::string check_epilogue(const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  const std::string what = "bias_mish2_nhwc_to_nchw: ";
  if (!y.is_cuda()) return what + "y must be a CUDA tensor";
  const auto dtype = y.scalar_type();
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) {
    return what + "y must be float32, float16 or bfloat16";
  }
  if (y.dim() != 4 || !y.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return what + "y must be a 4-D channels_last (NHWC) tensor";
  }
  if (out.device() != y.device() || out.scalar_type() != dtype || out.sizes() != y.sizes() || !out.is_contiguous()) {
    return what + "out must be a contiguous (NCHW) tensor with y's shape, dtype and device";
  }
  if (bias && (bias->device() != y.device() || bias->scalar_type() != dtype || bias->dim() != 1 ||
               bias->size(0) != y.size(1) || !bias->is_contiguous())) {
    return what + "bias must be 1-D and contiguous, one element per channel, with y's dtype and device";
  }
  return {};
}

}  // namespace

// The caller allocates `out` (torch.empty_like of the original tensor, whose flat view this is),
// so the result is a plain tensor with the input's strides rather than a view of a flat one.
// Each returns "" on success, else what went wrong.
std::string mish2_forward(const at::Tensor& x, const at::Tensor& out) {
  for (const auto& message : {check_flat(x, "x"), check_like(out, "out", x)}) {
    if (!message.empty()) return message;
  }
  return mish2_forward_unchecked(x, out);
}

std::string mish2_backward(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& grad_in) {
  for (const auto& message : {check_flat(x, "x"), check_like(grad_out, "grad_out", x),
                              check_like(grad_in, "grad_in", x)}) {
    if (!message.empty()) return message;
  }
  return mish2_backward_unchecked(x, grad_out, grad_in);
}

// The block's epilogue after a conv without bias that wrote NHWC: out (NCHW) = mish(mish(y + bias)).
std::string bias_mish2_nhwc_to_nchw(const at::Tensor& y, const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  const auto message = check_epilogue(y, bias, out);
  if (!message.empty()) return message;
  return bias_mish2_nhwc_to_nchw_unchecked(y, bias ? &*bias : nullptr, out);
}

// dz = g * d/dz act(z) and per-block partial sums of dz per channel (csrc/grad_bias.cu). The
// layout arithmetic (how many blocks, how large partial is) is the caller's, mirrored here only
// as far as needed to keep every access in bounds.
std::string grad_bias(const at::Tensor& z, const at::Tensor& g, const at::Tensor& dz, const at::Tensor& partial,
                      int64_t channels, int64_t inner, int64_t blocks, int64_t mish_count) {
  for (const auto& message : {check_flat(z, "z"), check_like(g, "g", z), check_like(dz, "dz", z)}) {
    if (!message.empty()) return message;
  }
  const std::string what = "grad_bias: ";
  if (mish_count != 1 && mish_count != 2) return what + "mish_count must be 1 or 2";
  if (channels < 1 || inner < 1 || blocks < 1 || z.numel() % (channels * inner) != 0) {
    return what + "z must hold whole [channels][inner] slabs, and blocks must be positive";
  }
  if (!partial.is_cuda() || partial.device() != z.device() || partial.scalar_type() != at::kFloat ||
      partial.dim() != 1 || !partial.is_contiguous()) {
    return what + "partial must be a contiguous 1-D float32 tensor on z's device";
  }
  const int64_t wanted = inner > 1 ? z.numel() / inner * blocks : blocks * channels;
  if (partial.numel() != wanted) return what + "partial must have one element per (block, channel)";
  if (inner == 1 && channels > 256 && (channels % (16 / int64_t(z.element_size())) != 0 ||
                                       channels / (16 / int64_t(z.element_size())) > 256)) {
    return what + "channels_last with more than 256 channels needs whole 16-byte packs of at most 256 per row";
  }
  return grad_bias_unchecked(z, g, dz, partial, channels, inner, blocks, mish_count);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mish2_forward", &mish2_forward, "out = mish(mish(x)); flat 1-D CUDA views of dense storage; returns an error message or ''",
        py::arg("x"), py::arg("out"));
  m.def("mish2_backward", &mish2_backward,
        "grad_in = d/dx mish(mish(x)) * grad_out; returns an error message or ''", py::arg("x"),
        py::arg("grad_out"), py::arg("grad_in"));
  m.def("bias_mish2_nhwc_to_nchw", &bias_mish2_nhwc_to_nchw,
        "out (NCHW) = mish(mish(y + bias)) for a channels_last y; bias may be None; returns an error message or ''",
        py::arg("y"), py::arg("bias"), py::arg("out"));
  m.def("grad_bias", &grad_bias,
        "dz = g * d/dz act(z) and fp32 partial sums of dz per (block, channel); returns an error message or ''",
        py::arg("z"), py::arg("g"), py::arg("dz"), py::arg("partial"), py::arg("channels"), py::arg("inner"),
        py::arg("blocks"), py::arg("mish_count"));
}
