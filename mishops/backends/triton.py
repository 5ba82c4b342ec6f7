"""Triton kernels for ``mish(mish(x))`` and its gradient: one elementwise pass over flat memory.

Kernels -> launchers -> backend class. The kernels are plain functions that ``triton.jit`` wraps
on first use, not at import, for two reasons: ``import mishops`` must not import Triton, and
``triton.jit`` decides when it wraps whether a kernel is compiled for the GPU or run by Triton's
CPU interpreter (``TRITON_INTERPRET=1``). One wrapped set per mode, picked by the variable's value
at each call, lets tests and users switch modes in a running process. They live at module level
(``tl`` bound there when Triton is imported) because the interpreter resolves names only through
the kernel's module globals, not through closures.

Math (fp32 whatever the storage dtype) as in ``csrc/mish_math.cuh``, which says why: with
``e = exp(v)`` clamped at ``v = 10.5``, ``tanh(softplus(v)) = n / (n + 2)`` where ``n = e (e + 2)``,
and ``mish'(v) = t + 4 v (n - e) / (n + 2)^2`` (``1 - t^2`` expanded: no cancellation near
``t = 1``). On the GPU four elements share one ``rcp.approx`` (inline PTX, ``pack=4``), and for fp32
storage the outer Mish's exp runs on the FMA pipe (a polynomial), so the double Mish costs 1.5
special-function instructions per element in fp32 and 2.5 in fp16/bf16 instead of 4.
"""

from __future__ import annotations

import contextlib
import functools
import os
from types import SimpleNamespace

import torch

from mishops.layout import flat
from mishops.registry import KERNEL_DTYPES, Availability, Backend, register
from mishops.tuning import CannotTake


def _interpreting() -> bool:
    """Whether Triton would run kernels through its interpreter now (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


tl = None  # triton.language, bound by _kernels() on first use; the kernels look it up at launch


def _reciprocal(d, USE_ASM: tl.constexpr):
    """1 / d for d in [2, 1.3e9]: a quarter of an rcp per element on the GPU; a division under the
    interpreter, which cannot run PTX."""
    if USE_ASM:
        # csrc/mish_math.cuh's reciprocals<4> (Montgomery's trick): the product's reciprocal times
        # the other three. $0-$3 out, $4-$7 in. (A literal: jitted code reads no plain globals.)
        return tl.inline_asm_elementwise(
            "{ .reg .f32 p01, p23, r, r01, r23; mul.f32 p01, $4, $5; mul.f32 p23, $6, $7; "
            "mul.f32 r, p01, p23; rcp.approx.ftz.f32 r, r; mul.f32 r01, r, p23; mul.f32 r23, r, p01; "
            "mul.f32 $0, r01, $5; mul.f32 $1, r01, $4; mul.f32 $2, r23, $7; mul.f32 $3, r23, $6; }",
            "=f,=f,=f,=f,f,f,f,f", [d], dtype=tl.float32, is_pure=True, pack=4)
    else:
        return 1.0 / d


def _exp_fma(v):
    """e^v on the FMA pipe for -80 <= v <= 88 (csrc/mish_math.cuh's exp_fma): 2^k from the
    shifter's bits, 2^f by a degree-6 polynomial, no special-function instruction."""
    j = tl.fma(v, 1.44269502162933349609375, 12582912.0)
    k = j - 12582912.0
    f = tl.fma(v, 1.44269502162933349609375, -k)
    f = tl.fma(v, 1.925963033500011079e-8, f)
    p = tl.fma(f, 1.5345795e-4, 1.3399932e-3)
    p = tl.fma(p, f, 9.6184891e-3)
    p = tl.fma(p, f, 5.5503286e-2)
    p = tl.fma(p, f, 2.4022646e-1)
    p = tl.fma(p, f, 6.9314718e-1)
    p = tl.fma(p, f, 1.0)
    bits = p.to(tl.int32, bitcast=True) + (j.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


def _mish_parts(v, OUTER: tl.constexpr, FULL: tl.constexpr, USE_ASM: tl.constexpr):
    """(e, n, r, t) of mish(v) = v t: e = exp(min(v, clamp)), n = e (e + 2), r = 1 / (n + 2),
    t = tanh(softplus(v)) = n r, formed as 1 - 2 r where n >= 2 for fp32 storage (FULL). The outer
    Mish (OUTER: v >= -0.31) of fp32 storage takes its exp on the FMA pipe."""
    # csrc/mish_math.cuh's kMishClamp. On the GPU tl.minimum(NaN, c) is c (minnum), so no NaN
    # reaches a shared reciprocal; the NaN flows on through v.
    c = tl.minimum(v, 10.5)
    if OUTER and FULL:
        e = _exp_fma(tl.maximum(c, -80.0))
    else:
        e = tl.exp2(c * 1.4426950408889634)
    n = e * (e + 2.0)
    r = _reciprocal(n + 2.0, USE_ASM)
    if FULL:
        t = tl.where(n >= 2.0, 1.0 - 2.0 * r, n * r)
    else:
        t = n * r
    return e, n, r, t


def _mish2_values(v, FULL: tl.constexpr, USE_ASM: tl.constexpr):
    _, _, _, t = _mish_parts(v, False, FULL, USE_ASM)
    v = v * t
    _, _, _, t = _mish_parts(v, True, FULL, USE_ASM)
    return v * t


def _forward_kernel(x_ptr, y_ptr, n_elements, BLOCK: tl.constexpr, FULL: tl.constexpr, USE_ASM: tl.constexpr):
    # Every program but the last is whole and runs unmasked: per-element 64-bit bounds checks cost
    # the 16-bit passes about a fifth of their instructions.
    start = tl.program_id(0).to(tl.int64) * BLOCK  # 64-bit: > 2^31 elements
    offsets = tl.arange(0, BLOCK)
    x_ptr += start
    y_ptr += start
    if start + BLOCK <= n_elements:
        v = _mish2_values(tl.load(x_ptr + offsets).to(tl.float32), FULL, USE_ASM)
        tl.store(y_ptr + offsets, v.to(y_ptr.dtype.element_ty))
    else:
        mask = offsets < n_elements - start
        v = _mish2_values(tl.load(x_ptr + offsets, mask=mask).to(tl.float32), FULL, USE_ASM)
        tl.store(y_ptr + offsets, v.to(y_ptr.dtype.element_ty), mask=mask)


def _mish_slope(v, OUTER: tl.constexpr, FULL: tl.constexpr, USE_ASM: tl.constexpr):
    """(mish(v), mish'(v)). mish'(v) = t + v sigmoid(v) (1 - t^2) = t + 4 v (n - e) r^2 (the same
    identity with 1 - t^2 expanded: no cancellation near t = 1, no second reciprocal). From the
    clamp on the tail is below half an ulp of 1 and taken as v * 0, which keeps autograd's NaN at
    v = +inf (and at -inf, where e = 0)."""
    e, n, r, t = _mish_parts(v, OUTER, FULL, USE_ASM)
    tail = tl.where(v < 10.5, 4.0 * r * (n - e) * r, 0.0)
    return v * t, t + v * tail


def _mish2_grad_values(v, grad, FULL: tl.constexpr, USE_ASM: tl.constexpr):
    v, inner = _mish_slope(v, False, FULL, USE_ASM)  # the chain rule: mish'(x), then mish'(mish(x))
    _, outer = _mish_slope(v, True, FULL, USE_ASM)
    return grad * outer * inner


def _backward_kernel(x_ptr, grad_out_ptr, grad_in_ptr, n_elements, BLOCK: tl.constexpr, FULL: tl.constexpr,
                     USE_ASM: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = tl.arange(0, BLOCK)
    x_ptr += start
    grad_out_ptr += start
    grad_in_ptr += start
    if start + BLOCK <= n_elements:
        v = tl.load(x_ptr + offsets).to(tl.float32)
        grad = tl.load(grad_out_ptr + offsets).to(tl.float32)
        tl.store(grad_in_ptr + offsets, _mish2_grad_values(v, grad, FULL, USE_ASM).to(grad_in_ptr.dtype.element_ty))
    else:
        mask = offsets < n_elements - start
        v = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
        grad = tl.load(grad_out_ptr + offsets, mask=mask).to(tl.float32)
        grad = _mish2_grad_values(v, grad, FULL, USE_ASM)
        tl.store(grad_in_ptr + offsets, grad.to(grad_in_ptr.dtype.element_ty), mask=mask)


def _add(a, b):
    return a + b


def _total(v, axis: tl.constexpr):
    """tl.sum without tl.sum: the standard library's jitted helpers follow the mode Triton was
    first imported in, so an interpreted kernel could not call them once a compiled one had run."""
    return tl.reduce(v, axis, _add)


def _act_grad(v, grad, MISH: tl.constexpr, FULL: tl.constexpr, USE_ASM: tl.constexpr):
    """grad * d/dv act(v), act = Mish twice (MISH = 2) or once."""
    if MISH == 2:
        return _mish2_grad_values(v, grad, FULL, USE_ASM)
    else:
        _, slope = _mish_slope(v, False, FULL, USE_ASM)
        return grad * slope


def _grad_bias_planes_kernel(z_ptr, g_ptr, dz_ptr, partial_ptr, plane_len, chunks, BLOCK: tl.constexpr,
                             MISH: tl.constexpr, FULL: tl.constexpr, USE_ASM: tl.constexpr):
    # program (chunk, plane): BLOCK elements of one NCHW plane (one channel); its sum of dz goes to
    # partial[plane * chunks + chunk]. csrc/grad_bias.cu's planes walk.
    chunk = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < plane_len
    base = plane * plane_len
    v = tl.load(z_ptr + base + offsets, mask=mask).to(tl.float32)
    grad = tl.load(g_ptr + base + offsets, mask=mask).to(tl.float32)
    dz = _act_grad(v, grad, MISH, FULL, USE_ASM).to(dz_ptr.dtype.element_ty)
    tl.store(dz_ptr + base + offsets, dz, mask=mask)
    tl.store(partial_ptr + plane * chunks + chunk, _total(tl.where(mask, dz.to(tl.float32), 0.0), 0))


def _grad_bias_rows_kernel(z_ptr, g_ptr, dz_ptr, partial_ptr, rows, channels, rows_per_program,
                           ROWS: tl.constexpr, CHANNELS: tl.constexpr, MISH: tl.constexpr, FULL: tl.constexpr,
                           USE_ASM: tl.constexpr):
    # program p: rows [p * rows_per_program, ...) of a channels_last [rows][channels] tensor, ROWS at
    # a time; its per-channel sums of dz go to partial[p, :]. csrc/grad_bias.cu's rows walk.
    program = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, CHANNELS)
    col_mask = cols < channels
    begin = program * rows_per_program
    end = tl.minimum(begin + rows_per_program, rows)
    acc = tl.full([ROWS, CHANNELS], 0.0, tl.float32)  # not tl.zeros: see _total
    for first in range(0, rows_per_program, ROWS):
        r = begin + first + tl.arange(0, ROWS)
        mask = (r < end)[:, None] & col_mask[None, :]
        at = r[:, None] * channels + cols[None, :]
        v = tl.load(z_ptr + at, mask=mask).to(tl.float32)
        grad = tl.load(g_ptr + at, mask=mask).to(tl.float32)
        dz = _act_grad(v, grad, MISH, FULL, USE_ASM).to(dz_ptr.dtype.element_ty)
        tl.store(dz_ptr + at, dz, mask=mask)
        acc += tl.where(mask, dz.to(tl.float32), 0.0)
    tl.store(partial_ptr + program * channels + cols, _total(acc, 0), mask=col_mask)


def _conv_wgrad_kernel(x_ptr, dz_ptr, partial_ptr, segments, cin, cout, h, w, ho, wo,
                       sxn, sxc, sxh, sxw, szn, szc, szh, szw,
                       stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, kw, segments_per_program,
                       BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr, FP32: tl.constexpr):
    # program (tap, chunk): dW[:, :, r, s] over output row segments [chunk * segments_per_program,
    # ...) -- a segment is BLOCK_P consecutive pixels of one output row, so loads run along rows --
    # as one GEMM, dz^T (cout x pixels) @ x shifted by the tap (pixels x cin), accumulated in fp32
    # on tensor cores; its sum goes to partial[chunk, tap]. The taps of one chunk run side by side,
    # so dz and x come from DRAM about once and from L2 for the other taps.
    tap = tl.program_id(0)
    chunk = tl.program_id(1)
    r = tap // kw
    s = tap % kw
    co = tl.arange(0, BLOCK_CO)
    ci = tl.arange(0, BLOCK_CI)
    lane = tl.arange(0, BLOCK_P)
    acc = tl.full([BLOCK_CO, BLOCK_CI], 0.0, tl.float32)
    per_row = (wo + BLOCK_P - 1) // BLOCK_P
    first = chunk * segments_per_program
    last = tl.minimum(first + segments_per_program, segments)
    for segment in range(first, last):
        row = segment // per_row
        n = row // ho
        oh = row % ho
        ow = (segment % per_row) * BLOCK_P + lane
        ih = oh * stride_h - pad_h + r * dil_h + lane * 0  # a vector, so the masks below are too
        iw = ow * stride_w - pad_w + s * dil_w
        ow_ok = ow < wo
        x_ok = ow_ok & (ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)
        a = tl.load(dz_ptr + n.to(tl.int64) * szn + oh * szh + ow[None, :] * szw + co[:, None] * szc,
                    mask=ow_ok[None, :] & (co[:, None] < cout), other=0.0)
        b = tl.load(x_ptr + n.to(tl.int64) * sxn + ih[:, None] * sxh + iw[:, None] * sxw + ci[None, :] * sxc,
                    mask=x_ok[:, None] & (ci[None, :] < cin), other=0.0)
        if FP32:
            # TF32 operands rounded to nearest, as cuDNN's (the MMA alone would truncate them, a bias
            # of 2^-11 in every product, which a 4M-long sum turns into a relative error of 1e-3)
            a = ((a.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
            b = ((b.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
            acc = tl.dot(a, b, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc)
    out = partial_ptr + (chunk.to(tl.int64) * tl.num_programs(0) + tap) * (BLOCK_CO * BLOCK_CI)
    tl.store(out + co[:, None] * BLOCK_CI + ci[None, :], acc)


#: the device functions the kernels call, by name through this module's globals: ``_launch`` binds
#: them to the current mode's wrapping (a compiled kernel may call only jitted functions, an
#: interpreted one only interpreted ones).
_HELPERS = (_reciprocal, _exp_fma, _mish_parts, _mish_slope, _mish2_values, _mish2_grad_values, _add, _total,
            _act_grad)


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """The kernels jitted for one mode. ``interpret`` is only the cache key: ``triton.jit`` reads
    ``TRITON_INTERPRET`` itself, so callers pass ``_interpreting()``, the value in force now."""
    global tl
    import triton
    import triton.language as tl

    helpers = {f.__name__: triton.jit(f) for f in _HELPERS}
    return SimpleNamespace(forward=triton.jit(_forward_kernel), backward=triton.jit(_backward_kernel),
                           grad_bias_planes=triton.jit(_grad_bias_planes_kernel),
                           grad_bias_rows=triton.jit(_grad_bias_rows_kernel),
                           conv_wgrad=triton.jit(_conv_wgrad_kernel), helpers=helpers)


def _launch_config(n_elements: int) -> tuple[int, int]:
    """(BLOCK, num_warps). Big tensors: 4096 elements per 8-warp program, 16 per thread, so each
    thread keeps several 16-byte loads in flight. Below ~2M elements that would leave SMs idle, so
    smaller programs. A fixed rule rather than ``triton.autotune``: the dispatcher already times
    whole backends, and autotune would re-tune inside the first call for every new size."""
    return (4096, 8) if n_elements >= 1 << 21 else (1024, 4)


def _on_device_of(x: torch.Tensor):
    """Triton launches on the current device's current stream: make x's device current."""
    if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _launch(kernel_name: str, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """One kernel over the flat memory of ``inputs`` and ``out`` (dense, all with the same strides)."""
    n = out.numel()
    if n:
        block, num_warps = _launch_config(n)
        kernels = _kernels(_interpreting())
        globals().update(kernels.helpers)
        kernel = getattr(kernels, kernel_name)
        grid = ((n + block - 1) // block,)
        with _on_device_of(out):
            # FMA contraction named, not defaulted: Triton 3.9 warns that 3.10 changes the default.
            kernel[grid](*map(flat, inputs), flat(out), n, BLOCK=block, FULL=out.dtype == torch.float32,
                         USE_ASM=not _interpreting(), num_warps=num_warps,
                         enable_fp_fusion=True)
    return out


def mish2_forward(x: torch.Tensor) -> torch.Tensor:
    """``mish(mish(x))`` for a dense ``x`` (any permutation of strides); the output has x's strides."""
    return _launch("forward", torch.empty_like(x), x)


def mish2_backward(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``grad_out * d/dx mish(mish(x))``, recomputed from ``x``; ``grad_out`` has x's strides."""
    return _launch("backward", torch.empty_like(x), x, grad_out)


def grad_bias(z: torch.Tensor, grad: torch.Tensor, mish_count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(dz, dbias): ``grad * d/dz act(z)`` with z's strides and its per-channel sum in float32, in
    one pass (the Triton twin of ``mishops.backends.cuda.grad_bias``); None where z is neither NCHW
    nor channels_last, or has more channels than one program holds."""
    if z.dim() != 4:
        return None
    n, c, h, w = z.shape
    planes = z.is_contiguous() and h * w > 1
    if not planes and not z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous():
        return None
    if not planes and c > 512:
        return None
    if grad.stride() != z.stride():
        grad = grad.contiguous(memory_format=torch.contiguous_format if planes else torch.channels_last)
    dz = torch.empty_like(z)
    if z.numel() == 0:
        return dz, torch.zeros(c, dtype=torch.float32, device=z.device)
    kernels = _kernels(_interpreting())
    globals().update(kernels.helpers)
    use_asm = not _interpreting()
    with _on_device_of(z):
        if planes:
            block = 4096 if h * w >= 4096 else 1024
            chunks = -(-(h * w) // block)
            partial = torch.empty(n * c * chunks, dtype=torch.float32, device=z.device)
            kernels.grad_bias_planes[(chunks, n * c)](z, grad, dz, partial, h * w, chunks, BLOCK=block, MISH=mish_count,
                                                      FULL=z.dtype == torch.float32,
                                                      USE_ASM=use_asm, num_warps=8 if block == 4096 else 4,
                                                      enable_fp_fusion=True)
            return dz, partial.view(n, c, chunks).sum(dim=(0, 2))
        channels = triton_next_power_of_2(c)
        rows_at_once = max(1, 4096 // channels)
        rows = n * h * w
        sms = torch.cuda.get_device_properties(z.device).multi_processor_count if z.is_cuda else 2
        programs = max(1, min(-(-rows // rows_at_once), 4 * sms))
        rows_per_program = -(-rows // programs)
        rows_per_program = -(-rows_per_program // rows_at_once) * rows_at_once
        programs = -(-rows // rows_per_program)
        partial = torch.empty(programs * c, dtype=torch.float32, device=z.device)
        kernels.grad_bias_rows[(programs,)](z, grad, dz, partial, rows, c, rows_per_program, ROWS=rows_at_once,
                                            CHANNELS=channels, MISH=mish_count, FULL=z.dtype == torch.float32,
                                            USE_ASM=use_asm, num_warps=8,
                                            enable_fp_fusion=True)
        return dz, partial.view(programs, c).sum(dim=0)


def conv_weight_grad(x: torch.Tensor, dz: torch.Tensor, weight_shape, stride, padding, dilation) -> torch.Tensor | None:
    """The conv's weight gradient (groups 1) from its input ``x`` and output gradient ``dz``, in
    float32: one tensor-core GEMM per kernel tap over chunks of output rows, any strides and zero
    padding, fp32 tensors; None otherwise or where the channels do not fit one tile (16-128 out,
    16-64 in). A skinny GEMM with
    a reduction over every output pixel (4M at the reference shape) is what cuDNN's weight-gradient
    kernels handle worst. fp32 operands are rounded to TF32, as cuDNN's TF32 convs round them.
    ``MISHOPS_TRITON_WGRAD_STAGES`` (read at call time, default 3) sets the software pipeline's depth:
    3 stages of 48 KB hold one program an SM, 2 fit two."""
    cout, cin, kh, kw = weight_shape
    if x.dim() != 4 or not 16 <= cout <= 128 or not 16 <= cin <= 64 or x.dtype != torch.float32 \
            or dz.dtype != torch.float32:
        return None  # 16-bit operands: not checked yet (the interpreter cannot run a bf16 dot)
    n, _, h, w = x.shape
    ho, wo = dz.shape[2], dz.shape[3]
    block_co, block_ci = triton_next_power_of_2(cout), triton_next_power_of_2(cin)
    block_p = 32 if _interpreting() else 64
    segments = n * ho * -(-wo // block_p)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    chunks = max(1, min(segments, 2 * sms))
    per_program = -(-segments // chunks)
    chunks = -(-segments // per_program)
    partial = torch.empty(chunks, kh * kw, block_co, block_ci, dtype=torch.float32, device=x.device)
    kernels = _kernels(_interpreting())
    globals().update(kernels.helpers)
    with _on_device_of(x):
        kernels.conv_wgrad[(kh * kw, chunks)](
            x, dz, partial, segments, cin, cout, h, w, ho, wo, *x.stride(), *dz.stride(), *stride, *padding,
            *dilation, kw, per_program, BLOCK_CO=block_co, BLOCK_CI=block_ci, BLOCK_P=block_p,
            FP32=x.dtype == torch.float32, num_warps=4 if _interpreting() else 8,
            num_stages=int(os.environ.get("MISHOPS_TRITON_WGRAD_STAGES", "3")))
    total = partial.sum(dim=0)[:, :cout, :cin]  # (taps, cout, cin)
    return total.permute(1, 2, 0).reshape(cout, cin, kh, kw)


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@register
class TritonBackend(Backend):
    name = "triton"
    ops = frozenset({"forward", "backward", "grad_bias"})
    dtypes = KERNEL_DTYPES
    priority = 20

    @property
    def devices(self) -> frozenset[str]:
        """CUDA; also CPU tensors while ``TRITON_INTERPRET=1`` (so CI runs the kernels' code)."""
        return frozenset({"cuda", "cpu"}) if _interpreting() else frozenset({"cuda"})

    def is_available(self) -> Availability:
        try:
            import triton  # noqa: F401
        except ModuleNotFoundError as exc:
            if exc.name != "triton":
                return Availability.no(f"triton failed to import: {exc}")
            return Availability.no("triton is not installed: pip install mishops[triton]")
        except Exception as exc:
            return Availability.no(f"triton failed to import: {type(exc).__name__}: {exc}")
        if not _interpreting() and not torch.cuda.is_available():
            return Availability.no("no CUDA GPU (set TRITON_INTERPRET=1 to run Triton's interpreter on CPU tensors)")
        return Availability.yes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish2_forward(x)

    def backward(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        return mish2_backward(x, grad_out)

    def grad_bias(self, z: torch.Tensor, grad_out: torch.Tensor, mish_count: int) -> tuple[torch.Tensor, torch.Tensor]:
        found = grad_bias(z, grad_out, mish_count)
        if found is None:
            raise CannotTake("z is neither NCHW nor channels_last, or has more channels than one program holds")
        return found
