"""The default (NCHW) layout of the block: cuDNN's conv alone, then the epilogue and the transpose in one pass.

``cudnn_fused_nchw`` runs the fused graph (2.9 ms from an NCHW input at the reference shape) and
then a pure transpose of its 2 GB NHWC output: about 4.7 ms in all on an H100. The conv without
bias and Mish also has cuDNN engines for an NHWC output and takes 2.58 ms; adding the bias and
both Mish to the transpose costs it little, since that pass is bound by memory (2.11 GB read
and written once, about 1.4 ms at 3 TB/s). So these plans run ``CudnnFusedPlan.conv_nhwc`` and then one
pass that reads the NHWC conv output, adds the bias, applies Mish twice in fp32 and writes NCHW, in
two implementations that compete in the autotuner. Measured at the reference problem (fp32, TF32):
4.13 ms (CUDA) and 4.23 ms (Triton) against 4.65 for ``cudnn_fused_nchw``; ``triton_conv`` beat all
three with 3.73 (``benchmarks/results/plans-h100/``):

- ``cudnn_conv_epilogue_triton``: the tiled kernel of ``cudnn_nchw`` with its bias and Mish on;
- ``cudnn_conv_epilogue_cuda``: ``csrc/epilogue_nchw.cu`` in the CUDA backend's extension, with
  the Mish of ``csrc/mish.cuh`` that the ``cuda`` backend uses.

They take what the cuDNN fusion takes (same ``fusion_reasons``: TF32 on, no groups, zeros
padding...) and write only NCHW; channels_last outputs are ``cudnn_fused``'s.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from mishops import registry
from mishops.backends import cuda
from mishops.plans import ConvSpec, cudnn_nchw, get_plan, register_plan
from mishops.plans.cudnn_fused import OnCudnnGraphs
from mishops.registry import Availability


def bias_mish2_nhwc_to_nchw(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``mish(mish(y + bias))`` as a contiguous (NCHW) tensor, for a channels_last ``y`` on a CUDA
    device, by the CUDA extension's kernel; ``bias`` holds one value per channel, or is None."""
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    tensors = (y, out) if bias is None else (y, bias, out)
    cuda.checked(cuda.extension_for(y.device).bias_mish2_nhwc_to_nchw(y, bias, out), *tensors)
    return out


class _ConvEpiloguePlan(OnCudnnGraphs):
    """cuDNN's conv alone to NHWC, then ``epilogue`` (bias, double Mish, NHWC -> NCHW)."""

    def forward(self, x, weight, bias, spec: ConvSpec) -> torch.Tensor:
        y = get_plan("cudnn_fused").conv_nhwc(x, weight, spec)
        with torch.cuda.device(y.device):
            return self.epilogue(y, bias)

    def epilogue(self, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


@register_plan
class CudnnConvEpilogueCudaPlan(_ConvEpiloguePlan):
    name = "cudnn_conv_epilogue_cuda"
    priority = 15
    source_files = cuda.SOURCES + cuda.HEADERS

    def is_available(self) -> Availability:
        conv = super().is_available()
        if not conv:
            return conv
        kernel = registry.availability("cuda")
        return Availability.yes() if kernel else Availability.no(f"needs the CUDA extension of the cuda backend: "
                                                                 f"{kernel.reason}")

    def epilogue(self, y, bias):
        return bias_mish2_nhwc_to_nchw(y, bias)


@register_plan
class CudnnConvEpilogueTritonPlan(_ConvEpiloguePlan):
    name = "cudnn_conv_epilogue_triton"
    priority = 16
    source_files = (Path(cudnn_nchw.__file__),)

    def is_available(self) -> Availability:
        conv = super().is_available()
        if not conv:
            return conv
        if importlib.util.find_spec("triton") is None:
            return Availability.no("triton is not installed: pip install mishops[triton]")
        return Availability.yes()

    def epilogue(self, y, bias):
        return cudnn_nchw.nhwc_to_nchw(y, bias, mish2=True)
