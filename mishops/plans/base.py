"""What a plan is: the block's spec, the interface every plan implements, and what they share."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from mishops import registry
from mishops.ops import mish2
from mishops.plans.memory_format import expected_memory_format, format_name
from mishops.registry import FLOAT_DTYPES, Availability


@dataclass(frozen=True)
class ConvSpec:
    """The conv's hyper-parameters, as ``nn.Conv2d`` keeps them (padding may be a string)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    #: ``F.pad`` amounts for a non-zeros ``padding_mode`` (``nn.Conv2d._reversed_padding_repeated_twice``).
    reversed_padding: tuple[int, ...]
    #: how many Mish follow the conv: 2 is the reference block, 1 the Conv -> Mish of CSPDarknet-style models.
    mish_count: int = 2

    @classmethod
    def of(cls, conv: torch.nn.Conv2d, mish_count: int = 2) -> ConvSpec:
        """The spec of ``conv``'s block; one object per distinct spec, so building it per call is a
        dictionary lookup (the reversed padding follows from the padding)."""
        try:
            return _SPECS[(conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode, mish_count)]
        except (KeyError, TypeError):  # new, or lists where nn.Conv2d keeps tuples
            pass
        if mish_count not in (1, 2):
            raise ValueError(f"mishops: mish_count must be 1 or 2, not {mish_count!r}")
        spec = cls(tuple(conv.stride), conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                   tuple(conv.dilation), conv.groups, conv.padding_mode,
                   tuple(getattr(conv, "_reversed_padding_repeated_twice", ())), mish_count)
        with contextlib.suppress(TypeError):
            _SPECS[(conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode, mish_count)] = spec
        return spec

    def kernel_reasons(self, strided: bool = False) -> list[str]:
        """Why our own conv kernels (``triton_conv``, ``hopper_conv``) cannot take this spec: they do
        zero padding of known size, and stride 1 unless ``strided``."""
        reasons = []
        if not strided and tuple(self.stride) != (1, 1):
            reasons.append(f"stride {tuple(self.stride)} (this kernel does stride 1)")
        if self.numeric_padding() is None:
            reasons.append(f"padding {self.padding!r} with mode {self.padding_mode!r} (needs numbers or 'valid', "
                           "zeros mode)")
        return reasons

    def numeric_padding(self) -> tuple[int, int] | None:
        """The zero padding as numbers (``"valid"`` is none), or None where it is not zeros of known
        size (``"same"``, a non-zeros ``padding_mode``): what a kernel of ours can take."""
        if self.padding_mode != "zeros" or (isinstance(self.padding, str) and self.padding != "valid"):
            return None
        return (0, 0) if self.padding == "valid" else tuple(self.padding)


_SPECS: dict[tuple, ConvSpec] = {}


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> torch.Tensor:
    """What ``nn.Conv2d`` computes, from its parameters."""
    if spec.padding_mode != "zeros":
        x = F.pad(x, spec.reversed_padding, mode=spec.padding_mode)
        return F.conv2d(x, weight, bias, spec.stride, 0, spec.dilation, spec.groups)
    return F.conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups)


def activation(z: torch.Tensor, spec: ConvSpec, backend: str = "auto") -> torch.Tensor:
    """The block's activation of the conv output ``z``: ``mish2`` (by ``backend``) or one ``F.mish``."""
    return mish2(z, backend) if spec.mish_count == 2 else F.mish(z)


class Plan:
    """One way to compute the whole block.

    Subclasses set the class attributes and implement ``forward``; inputs reach ``forward`` on a
    supported device and dtype, with ``not_supported_reasons`` empty, and with the dtypes
    autocast would give the conv (``run_block`` casts first, unless ``casts_input``
    or ``autocasts``).
    """

    name: ClassVar[str]
    #: preference when autotuning is off or timings tie: lower wins.
    priority: ClassVar[int] = 100
    #: device types it runs on (``torch.device.type``); ``None`` means any.
    devices: ClassVar[frozenset[str] | None] = None
    dtypes: ClassVar[frozenset[torch.dtype]] = FLOAT_DTYPES
    #: memory formats its output can have; it is a candidate only where PyTorch's is among them.
    output_formats: ClassVar[frozenset[torch.memory_format]] = frozenset(
        {torch.contiguous_format, torch.channels_last})
    #: False: its forward is not tracked by autograd; ``mishops.plans.training`` supplies the backward.
    differentiable: ClassVar[bool] = False
    #: True: in training it runs ``forward_storing`` and saves the pre-activation it returns for
    #: ``mishops.plans.training``'s fused backward, which then recomputes no conv (one more tensor
    #: of the output's size kept until the backward).
    stores_preactivation: ClassVar[bool] = False
    #: True: under autocast its forward takes the input as the caller gave it (e.g. fp32 with bf16
    #: weights) and casts it while reading it, which saves autocast's own pass over the input.
    casts_input: ClassVar[bool] = False
    #: True: its forward is PyTorch's own ops (and ops autocast leaves alone, such as ``mish2``), so
    #: under autocast a call that runs ``forward`` itself gets the caller's tensors uncast, with
    #: autocast on: autocast casts them as for the reference, keeping the weight's cast for the rest
    #: of its region, where ``run_block`` would cast the weight again at every call. (A training call
    #: through the fused backward's Function still gets the casts: that backward computes in the
    #: dtypes it is given.)
    autocasts: ClassVar[bool] = False
    #: kernel sources hashed into the tuning-cache key beside the class's module (as for backends).
    source_files: ClassVar[tuple[Path, ...]] = ()

    def is_available(self) -> Availability:
        """Whether it can run in this process at all (its package, toolchain, a GPU); asked once."""
        return Availability.yes()

    def device_reasons(self, device: torch.device) -> list[str]:
        """Why it cannot run on this device (its compute capability, say); asked once per device."""
        return []

    def not_supported_reasons(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              spec: ConvSpec) -> list[str]:
        """Why this plan cannot take the input (empty when it can), availability aside."""
        reasons = registry.device_and_dtype_reasons(self, x)
        wanted = expected_memory_format(x, weight)
        if wanted not in self.output_formats:
            reasons.append(f"PyTorch's conv output would be {format_name(wanted)}; this plan writes "
                           + " or ".join(sorted(format_name(f) for f in self.output_formats)) + " only")
        return reasons

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                spec: ConvSpec) -> torch.Tensor:
        raise NotImplementedError

    def forward_storing(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        spec: ConvSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(the block's output, its pre-activation ``conv(x) + bias`` in the output's memory format),
        for a training forward of a plan that ``stores_preactivation``; not tracked by autograd.
        This one is PyTorch's conv, then the activation; a plan overrides it to get both from its own
        kernels (an epilogue that writes the pre-activation too)."""
        z = conv2d(x, weight, bias, spec)
        return activation(z, spec), z

    def configs(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> list:
        """The configs worth trying for this input (tile shapes, engine configs...), each with a
        ``name``, best guess first; empty for a plan without any. A plan that has them takes
        ``config=None`` in ``forward`` and runs ``config_for``'s."""
        return []

    def config_for(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> Any:
        """The fastest correct of ``configs`` for this input, tuned once per key by the project's
        tuner like any other choice (checked against the reference on inputs of its own, then timed)."""
        from mishops.plans import block

        return block.tuned_config(self, x, weight, bias, spec)

    def source_hash(self) -> str:
        """Changes whenever the code that computes this plan's result changes."""
        return registry.source_hash_of(type(self))

    def __repr__(self) -> str:
        return f"<mishops plan {self.name!r}>"


def block_output(x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int], dilation: tuple[int, int],
                 memory_format: torch.memory_format, out: torch.Tensor | None = None,
                 stride: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """The tensor a conv kernel of ours writes the block into: a new one in the weight's dtype and
    ``memory_format``, or ``out`` once checked to be exactly that."""
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    (ph, pw), (dh, dw), (sh, sw) = padding, dilation, stride
    shape = (n, cout, (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
    dtype = weight.dtype
    if out is None:
        return torch.empty(shape, dtype=dtype, device=x.device, memory_format=memory_format)
    if (out.shape != shape or out.dtype != dtype or out.device != x.device
            or not out.is_contiguous(memory_format=memory_format)):
        raise ValueError(f"out must be a {memory_format} {dtype} tensor of shape {shape} "
                         f"on {x.device}; got {out.dtype} {tuple(out.shape)} strides {out.stride()} on {out.device}")
    return out


def operand_reasons(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> list[str]:
    """Why a fused kernel cannot take these operands, whatever it computes: what every plan of
    ours with its own kernel (cuDNN's graphs, ``triton_conv``) needs of them."""
    if x.dim() != 4:
        return ["input is not a batch of images (4-D)"]
    reasons = []
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        reasons.append("input, weight and bias dtypes differ")
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        reasons.append("input, weight and bias are on different devices")
    if spec.groups != 1:
        reasons.append(f"grouped conv (groups={spec.groups})")
    return reasons
