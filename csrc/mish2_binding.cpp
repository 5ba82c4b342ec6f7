// Python entry points of csrc/mish2.cu, for torch.utils.cpp_extension.load.
//
// torch/csrc/utils/pybind.h brings pybind11 with torch's Tensor conversions and nothing else:
// this file compiles in about 10 s, where torch/extension.h (all of libtorch's C++ API) takes 80.
// Bad arguments and launch failures come back as a message that mishops.backends.cuda raises as
// RuntimeError: on the H100 machine any C++ exception leaving this extension (TORCH_CHECK thrown
// from either file, with torch/extension.h too) killed the process with SIGSEGV.

#include <torch/csrc/utils/pybind.h>

#include <string>

std::string mish2_forward_unchecked(const at::Tensor& x, const at::Tensor& out);
std::string mish2_backward_unchecked(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& grad_in);

namespace {

std::string check_flat(const at::Tensor& t, const char* name) {
  if (!t.is_cuda()) return c10::str("mish2: ", name, " must be a CUDA tensor, got one on ", t.device());
  const auto dtype = t.scalar_type();
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) {
    return c10::str("mish2: ", name, " must be float32, float16 or bfloat16, got ", dtype);
  }
  if (t.dim() != 1 || !t.is_contiguous()) {
    return c10::str("mish2: ", name, " must be a flat 1-D contiguous view of dense storage (mishops.layout.flat), ",
                    "got sizes ", t.sizes(), " and strides ", t.strides());
  }
  return {};
}

std::string check_like(const at::Tensor& t, const char* name, const at::Tensor& x) {
  auto message = check_flat(t, name);
  if (message.empty() && (t.device() != x.device() || t.scalar_type() != x.scalar_type() || t.numel() != x.numel())) {
    message = c10::str("mish2: ", name, " must match x in device, dtype and numel: got ", t.device(), " ",
                       t.scalar_type(), " with ", t.numel(), " elements for x's ", x.device(), " ", x.scalar_type(),
                       " with ", x.numel());
  }
  return message;
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mish2_forward", &mish2_forward, "out = mish(mish(x)); flat 1-D CUDA views of dense storage; returns an error message or ''",
        py::arg("x"), py::arg("out"));
  m.def("mish2_backward", &mish2_backward,
        "grad_in = d/dx mish(mish(x)) * grad_out; returns an error message or ''", py::arg("x"),
        py::arg("grad_out"), py::arg("grad_in"));
}
