// Python entry points of csrc/mish2.cu, for torch.utils.cpp_extension.load.
//
// torch/csrc/utils/pybind.h brings pybind11 with torch's Tensor conversions and nothing else:
// this file compiles in about 10 s, where torch/extension.h (all of libtorch's C++ API) takes 80.

#include <torch/csrc/utils/pybind.h>

void mish2_forward(const at::Tensor& x, const at::Tensor& out);
void mish2_backward(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& grad_in);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mish2_forward", &mish2_forward, "out = mish(mish(x)); flat 1-D CUDA views of dense storage",
        py::arg("x"), py::arg("out"));
  m.def("mish2_backward", &mish2_backward,
        "grad_in = d/dx mish(mish(x)) * grad_out; flat 1-D CUDA views of dense storage", py::arg("x"),
        py::arg("grad_out"), py::arg("grad_in"));
}
