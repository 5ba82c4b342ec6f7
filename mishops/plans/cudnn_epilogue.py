"""The default (NCHW) layout of the block: cuDNN's conv alone, then the epilogue and the transpose in one pass.

``cudnn_fused_nchw`` runs the fused graph and then a pure transpose of its NHWC output. The conv
without bias and Mish also has cuDNN engines for an NHWC output, and adding the bias and the Mish
to the transpose costs it little, since that pass is bound by memory. So these plans run
``CudnnFusedPlan.conv_nhwc`` and then one pass that reads the NHWC conv output, adds the bias,
applies Mish (``ConvSpec.mish_count`` times) in fp32 and writes NCHW, in two implementations that
compete in the autotuner (timings: ``benchmarks/results/`` and the README):

- ``cudnn_conv_epilogue_triton``: the tiled kernel of ``cudnn_nchw`` with its bias and Mish on;
  in training the same pass also writes the pre-activation for the backward (``stores_preactivation``),
  which costs one more store where recomputing it would cost a conv;
- ``cudnn_conv_epilogue_cuda``: ``csrc/epilogue_nchw.cu`` in the CUDA backend's extension, with
  the Mish of ``csrc/mish.cuh`` that the ``cuda`` backend uses. The kernel is templated on the
  Mish count; it takes a single Mish once the extension's binding (``csrc/mish2_binding.cpp``)
  exports ``bias_mish_nhwc_to_nchw``, and declines ``mish_count=1`` until then.

They take what the cuDNN fusion takes (same ``fusion_reasons``: TF32 on, no groups, zeros
padding...) and write only NCHW; channels_last outputs are ``cudnn_fused``'s.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

from mishops import registry
from mishops.backends import cuda
from mishops.plans import ConvSpec, cudnn_nchw, get_plan, register_plan
from mishops.plans.cudnn_fused import OnCudnnGraphs
from mishops.registry import Availability


#: the binding's entry point that takes the Mish count (the kernel has it: csrc/epilogue_nchw.cu)
MISH_COUNT_ENTRY = "bias_mish_nhwc_to_nchw"


@functools.cache
def binding_takes_mish_count() -> bool:
    """Whether the extension's binding exports ``MISH_COUNT_ENTRY`` (read from its source, so
    nothing is built to find out)."""
    binding = next((p for p in cuda.SOURCES if p.name.endswith("binding.cpp")), None)
    try:
        return binding is not None and f'"{MISH_COUNT_ENTRY}"' in binding.read_text()
    except OSError:
        return False


def bias_mish2_nhwc_to_nchw(y: torch.Tensor, bias: torch.Tensor | None, mish_count: int = 2) -> torch.Tensor:
    """``mish(mish(y + bias))`` (one ``mish`` for ``mish_count=1``) as a contiguous (NCHW) tensor,
    for a channels_last ``y`` on a CUDA device, by the CUDA extension's kernel; ``bias`` holds one
    value per channel, or is None."""
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    tensors = (y, out) if bias is None else (y, bias, out)
    extension = cuda.extension_for(y.device)
    if mish_count == 2:
        message = extension.bias_mish2_nhwc_to_nchw(y, bias, out)
    else:
        entry = getattr(extension, MISH_COUNT_ENTRY, None)
        if entry is None:
            raise NotImplementedError(f"the CUDA extension has no {MISH_COUNT_ENTRY} (mish_count={mish_count})")
        message = entry(y, bias, out, mish_count)
    cuda.checked(message, *tensors)
    return out


class _ConvEpiloguePlan(OnCudnnGraphs):
    """cuDNN's conv alone to NHWC, then ``epilogue`` (bias, double Mish, NHWC -> NCHW)."""

    def forward(self, x, weight, bias, spec: ConvSpec) -> torch.Tensor:
        y = get_plan("cudnn_fused").conv_nhwc(x, weight, spec)
        with torch.cuda.device(y.device):
            return self.epilogue(y, bias, spec.mish_count)

    def epilogue(self, y: torch.Tensor, bias: torch.Tensor | None, mish_count: int) -> torch.Tensor:
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

    def not_supported_reasons(self, x, weight, bias, spec: ConvSpec) -> list[str]:
        reasons = super().not_supported_reasons(x, weight, bias, spec)
        if spec.mish_count != 2 and not binding_takes_mish_count():
            reasons.append(f"one Mish (mish_count={spec.mish_count}): the CUDA extension's binding exports "
                           "the double-Mish epilogue only")
        return reasons

    def epilogue(self, y, bias, mish_count):
        return bias_mish2_nhwc_to_nchw(y, bias, mish_count)


@register_plan
class CudnnConvEpilogueTritonPlan(_ConvEpiloguePlan):
    name = "cudnn_conv_epilogue_triton"
    priority = 16
    #: its epilogue writes the pre-activation beside the output (one more store, about a quarter of
    #: the pass's traffic) where recomputing it would cost the backward a conv
    stores_preactivation = True
    source_files = (Path(cudnn_nchw.__file__),)

    def is_available(self) -> Availability:
        conv = super().is_available()
        if not conv:
            return conv
        if importlib.util.find_spec("triton") is None:
            return Availability.no("triton is not installed: pip install mishops[triton]")
        return Availability.yes()

    def epilogue(self, y, bias, mish_count):
        return cudnn_nchw.nhwc_to_nchw(y, bias, mish_count=mish_count)

    def forward_storing(self, x, weight, bias, spec: ConvSpec) -> tuple[torch.Tensor, torch.Tensor]:
        y = get_plan("cudnn_fused").conv_nhwc(x, weight, spec)
        with torch.cuda.device(y.device):
            return cudnn_nchw.nhwc_to_nchw(y, bias, mish_count=spec.mish_count, preactivation=True)
