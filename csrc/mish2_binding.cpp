// Python entry points of csrc/mish2.cu, for torch.utils.cpp_extension.load.
//
// torch/extension.h is the slow include (about a minute of the build) but the one whose pybind11
// setup turns a failed TORCH_CHECK into a Python RuntimeError: with the lighter
// torch/csrc/utils/pybind.h alone, the first failed check crashed the process on the H100.

#include <torch/extension.h>

void mish2_forward(const at::Tensor& x, const at::Tensor& out);
void mish2_backward(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& grad_in);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mish2_forward", &mish2_forward, "out = mish(mish(x)); flat 1-D CUDA views of dense storage",
        py::arg("x"), py::arg("out"));
  m.def("mish2_backward", &mish2_backward,
        "grad_in = d/dx mish(mish(x)) * grad_out; flat 1-D CUDA views of dense storage", py::arg("x"),
        py::arg("grad_out"), py::arg("grad_in"));
}
