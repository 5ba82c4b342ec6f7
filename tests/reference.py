"""The reference problem (KernelBench "Conv2d_Mish_Mish"), carried by the project's own tests."""

import torch
import torch.nn as nn
import torch.nn.functional as F

batch_size = 64
in_channels = 64
out_channels = 128
height = width = 256
kernel_size = 3


class Model(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size)

    def forward(self, x):
        x = self.conv(x)
        x = F.mish(x)
        x = F.mish(x)
        return x


def get_inputs():
    return [torch.rand(batch_size, in_channels, height, width).cuda()]


def get_init_inputs():
    return [in_channels, out_channels, kernel_size]


SPECIAL_VALUES = [float("nan"), float("inf"), -float("inf"), 1e4, -1e4, 100.0, -100.0, 44.0, 20.0, 19.99,
                  -88.0, -20.0, 0.0, -0.0, 1e-30, -1e-30]


def special_input(shape, dtype=torch.float32, device="cpu", scale=4.0, seed=None):
    """Fresh random values (normal * scale) with every special value planted at random positions."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(shape, generator=gen) * scale
    flat = x.view(-1)
    if flat.numel() >= len(SPECIAL_VALUES):
        idx = torch.randperm(flat.numel(), generator=gen)[: len(SPECIAL_VALUES)]
        flat[idx] = torch.tensor(SPECIAL_VALUES)
    return x.to(device=device, dtype=dtype)


def mish2_f64(x):
    """The float64 reference of mish(mish(x)), as F.mish defines it."""
    return F.mish(F.mish(x.double()))


def mish2_grad_f64(x, grad):
    xd = x.detach().double().requires_grad_(True)
    (g,) = torch.autograd.grad(F.mish(F.mish(xd)), xd, grad.double())
    return g
