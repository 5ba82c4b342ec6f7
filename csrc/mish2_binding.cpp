// Python entry points of csrc/mish2.cu, for torch.utils.cpp_extension.load.
//
// torch/csrc/utils/pybind.h brings pybind11 with torch's Tensor conversions and nothing else:
// this file compiles in about 10 s, where torch/extension.h (all of libtorch's C++ API) takes 80.
// The argument checks live here, not in mish2.cu: a failed TORCH_CHECK thrown from the
// nvcc-compiled file crashed the process on the H100 (with either include) instead of raising.

#include <torch/csrc/utils/pybind.h>

void mish2_forward_unchecked(const at::Tensor& x, const at::Tensor& out);
void mish2_backward_unchecked(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& grad_in);

namespace {

void check_flat(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "mish2: ", name, " must be a CUDA tensor, got one on ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "mish2: ", name,
              " must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "mish2: ", name,
              " must be a flat 1-D contiguous view of dense storage (mishops.layout.flat), got sizes ",
              t.sizes(), " and strides ", t.strides());
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_flat(t, name);
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type() && t.numel() == x.numel(),
              "mish2: ", name, " must match x in device, dtype and numel: got ", t.device(), " ",
              t.scalar_type(), " with ", t.numel(), " elements for x's ", x.device(), " ", x.scalar_type(),
              " with ", x.numel());
}

}  // namespace

// The caller allocates `out` (torch.empty_like of the original tensor, whose flat view this is),
// so the result is a plain tensor with the input's strides rather than a view of a flat one.
void mish2_forward(const at::Tensor& x, const at::Tensor& out) {
  check_flat(x, "x");
  check_like(out, "out", x);
  mish2_forward_unchecked(x, out);
}

void mish2_backward(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& grad_in) {
  check_flat(x, "x");
  check_like(grad_out, "grad_out", x);
  check_like(grad_in, "grad_in", x);
  mish2_backward_unchecked(x, grad_out, grad_in);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mish2_forward", &mish2_forward, "out = mish(mish(x)); flat 1-D CUDA views of dense storage",
        py::arg("x"), py::arg("out"));
  m.def("mish2_backward", &mish2_backward,
        "grad_in = d/dx mish(mish(x)) * grad_out; flat 1-D CUDA views of dense storage", py::arg("x"),
        py::arg("grad_out"), py::arg("grad_in"));
}
