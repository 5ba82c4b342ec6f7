"""Inline CUDA C++ (``csrc/mish2.cu``): one hand-written kernel per direction, built at first use.

The extension is compiled by ``torch.utils.cpp_extension.load`` for the present GPU's architecture
only (one ``-gencode``; 20-60 s, where torch's default list of architectures takes minutes), into
``<mishops cache dir>/build/<tag>``. The tag names everything that makes a binary unusable
elsewhere (torch and its CUDA version, nvcc, GPU architecture, C++ ABI, Python, machine, flags and
the sources' hash), so environments that share a home directory never load each other's library,
and a finished build carries a marker file that lets the next process import it without compiling
or even starting ninja.

Builds are serialized by our own lock, not torch's: cpp_extension guards a build directory with a
``lock`` file that a killed build leaves behind, and every later process then waits on it forever.
Ours is an OS file lock (flock), released by the kernel when its owner dies, so a dead builder never
blocks anyone; and since every builder takes it, whoever holds it knows that a torch ``lock`` file
still in the build directory is stale and deletes it.

A failed build raises :class:`CudaBuildError` whose first line is the compiler's first error, the
line the dispatcher records as the reason this backend is out.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

from mishops import cache, layout
from mishops.registry import KERNEL_DTYPES, Availability, Backend, csrc_path, register
from mishops.tuning import CannotTake

log = logging.getLogger("mishops")

#: what tests read: ``builds`` counts compilations of the extension in this process.
stats = {"builds": 0}

MODULE_NAME = "mishops_mish2_cuda"
#: compiled into the one extension: the double-Mish passes, the block's NCHW epilogue
#: (``mishops.plans.cudnn_epilogue``) and their Python entry points.
SOURCES = (csrc_path("mish2.cu"), csrc_path("grad_bias.cu"), csrc_path("epilogue_nchw.cu"),
           csrc_path("mish2_binding.cpp"))
#: included by the sources: hashed with them, never compiled on their own.
HEADERS = (csrc_path("mish.cuh"), csrc_path("mish_math.cuh"))
#: beside torch's own flags. No --use_fast_math: the kernel picks its fast intrinsics one by one.
EXTRA_CUDA_CFLAGS = ("-O3",)
EXTRA_CFLAGS = ("-O3",)
DEFAULT_LOCK_TIMEOUT_S = 600.0
#: written into the build directory once its library is complete: the build's facts and the
#: library's file name (``load`` appends ``_v1``... when one process builds the extension twice).
DONE_MARKER = "mishops-build.json"


class CudaBuildError(RuntimeError):
    """The extension did not build or load; the message's first line says why."""


@register
class CudaBackend(Backend):
    name = "cuda"
    ops = frozenset({"forward", "backward", "grad_bias"})
    devices = frozenset({"cuda"})
    dtypes = KERNEL_DTYPES
    priority = 10
    source_files = SOURCES + HEADERS

    def is_available(self) -> Availability:
        if torch.version.cuda is None:
            return Availability.no(f"PyTorch {torch.__version__} is built without CUDA (torch.version.cuda is None)")
        if not torch.cuda.is_available():
            return Availability.no("no CUDA GPU visible to torch")
        problem = toolchain_problem()
        return Availability.no(problem) if problem else Availability.yes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        flat_x, flat_out = layout.flat(x), layout.flat(out)
        checked(extension_for(x.device).mish2_forward(flat_x, flat_out), flat_x, flat_out)
        return out

    def backward(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        grad_in = torch.empty_like(x)
        tensors = layout.flat(x), layout.flat(grad_out), layout.flat(grad_in)
        checked(extension_for(x.device).mish2_backward(*tensors), *tensors)
        return grad_in

    def grad_bias(self, z: torch.Tensor, grad_out: torch.Tensor, mish_count: int) -> tuple[torch.Tensor, torch.Tensor]:
        found = grad_bias(z, grad_out, mish_count)
        if found is None:
            raise CannotTake("z is neither NCHW nor channels_last in a form this kernel walks")
        return found


def checked(message: str, *tensors: torch.Tensor) -> None:
    """Raise what the extension reported, with the tensors' details. It returns messages instead of
    failing a TORCH_CHECK, which crashed the process on the H100 machine."""
    if message:
        details = "; ".join(f"{t.device} {str(t.dtype).removeprefix('torch.')} sizes {tuple(t.shape)} "
                            f"strides {t.stride()}" for t in tensors)
        raise RuntimeError(f"{message} (got {details})" if details else message)


# --- toolchain -----------------------------------------------------------------------------------


def nvcc_path() -> Path | None:
    """The nvcc cpp_extension will run: ``CUDA_HOME/bin/nvcc``, with CUDA_HOME as torch found it
    when imported (from $CUDA_HOME, $CUDA_PATH, nvcc on PATH, then /usr/local/cuda)."""
    from torch.utils import cpp_extension

    if not cpp_extension.CUDA_HOME:
        return None
    nvcc = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
    return nvcc if nvcc.is_file() else None


def ninja_on_path() -> bool:
    """cpp_extension runs plain ``ninja``; a pip-installed one sits beside this Python, which is
    not on PATH when the environment was never activated, so put it there."""
    if shutil.which("ninja"):
        return True
    beside_python = Path(sys.executable).parent
    if (beside_python / "ninja").is_file():
        os.environ["PATH"] = f"{beside_python}{os.pathsep}{os.environ.get('PATH', '')}"
        return True
    return False


def toolchain_problem() -> str | None:
    """Why this machine cannot build the extension, or None when nvcc and ninja are there."""
    if nvcc_path() is None:
        return ("nvcc not found: set CUDA_HOME to the CUDA toolkit (the directory holding bin/nvcc) "
                "before starting Python, or put nvcc on PATH")
    if not ninja_on_path():
        return "ninja not found: pip install ninja (torch.utils.cpp_extension builds with it)"
    return None


_nvcc_versions: dict[Path, str] = {}


def nvcc_version(nvcc: Path) -> str:
    """``13.0.88`` from ``nvcc --version``; a compiler that cannot say is a failed build."""
    if nvcc not in _nvcc_versions:
        done = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True)
        found = re.search(r"release [\d.]+, V([\w.]+)", done.stdout)
        if done.returncode != 0 or not found:
            output = done.stdout + done.stderr
            raise CudaBuildError(f"{first_error_line(output) or f'{nvcc} --version failed'}\n{output}")
        _nvcc_versions[nvcc] = found.group(1)
    return _nvcc_versions[nvcc]


# --- where a build lives -------------------------------------------------------------------------


def sources_digest() -> str:
    h = hashlib.sha256()
    for path in SOURCES + HEADERS:
        h.update(Path(path).name.encode())
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def build_facts(arch: str) -> dict[str, str]:
    """Everything a compiled library depends on, for GPU architecture ``arch`` ("90" = sm_90)."""
    nvcc = nvcc_path()
    return {
        "arch": f"sm_{arch}",
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
        "nvcc": nvcc_version(nvcc) if nvcc else "not found",
        "cxx11_abi": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
        "python": sys.implementation.cache_tag,
        "machine": platform.machine(),
        "flags": " ".join(EXTRA_CFLAGS + EXTRA_CUDA_CFLAGS),
        "sources": sources_digest(),
    }


def build_tag(facts: dict[str, str]) -> str:
    """A directory name: the facts a person looks for, then a hash of all of them."""
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    readable = "-".join((facts["arch"], f"torch{facts['torch']}", facts["python"]))
    return f"{re.sub(r'[^A-Za-z0-9._]+', '_', readable)}-{digest}"


def build_directory(facts: dict[str, str]) -> Path:
    return cache.build_root() / build_tag(facts)


# --- building ------------------------------------------------------------------------------------


@contextlib.contextmanager
def build_lock(build_dir: Path):
    """Hold the right to build in ``build_dir``, and clear the torch lock a killed build left there.

    The lock file sits beside the build directory. Waiting is bounded by
    ``MISHOPS_BUILD_LOCK_TIMEOUT_S`` (default 600 s), after which a clear error says who to wait for.
    """
    import filelock

    timeout = float(os.environ.get("MISHOPS_BUILD_LOCK_TIMEOUT_S", DEFAULT_LOCK_TIMEOUT_S))
    lock_path = build_dir.with_name(build_dir.name + ".lock")
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.info("mishops: waiting for another process building the CUDA backend (lock %s)", lock_path)
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise CudaBuildError(
                f"mishops: waited {timeout:.0f} s for the CUDA build lock {lock_path}, which a live process "
                "holds (another build, or a hung one). Let it finish or end it, or raise "
                "MISHOPS_BUILD_LOCK_TIMEOUT_S. The lock dies with its process, so a crash never leaves it "
                f"held; only where that fails (some network file systems) delete {lock_path} by hand, "
                "once no mishops process is running.") from None
    try:
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("mishops: removing %s, left by a CUDA build that was killed", stale)
            stale.unlink(missing_ok=True)
        yield
    finally:
        lock.release()


_NOT_COMPILER_OUTPUT = re.compile(r"^(\[\d+/\d+\]|ninja: |Error building extension)")
#: compilers say "error" or "fatal"; the linker's own first line ("cannot find -lc10_cuda",
#: "undefined reference to ...") comes before collect2's bare "error: ld returned 1".
_ERROR = re.compile(r"\b(error|fatal)\b|: cannot find -l|undefined reference to", re.IGNORECASE)


def first_error_line(output: str) -> str | None:
    """The first error in a build log (nvcc, cudafe, ptxas, gcc or the linker).

    Skips what ninja adds around it: progress lines, ``FAILED:`` and the command echoed after it.
    """
    after_failed = False
    for raw in output.splitlines():
        line = raw.strip()
        if line.startswith("FAILED:"):
            after_failed = True
            continue
        if after_failed:  # ninja echoes the failing command, whose flags may mention "error"
            after_failed = False
            continue
        if _NOT_COMPILER_OUTPUT.match(line):
            continue
        if _ERROR.search(line):
            return line
    return None


def build_extension(arch: str) -> ModuleType:
    """The extension for GPU architecture ``arch`` ("90" = sm_90): imported from a finished
    build, else compiled (once, under the build lock) and counted in ``stats["builds"]``.
    Needs no GPU, so tests can drive a real build on any machine."""
    facts = build_facts(arch)
    build_dir = build_directory(facts)
    done = build_dir / DONE_MARKER
    if done.exists():
        return import_built(build_dir)
    with build_lock(build_dir):
        if done.exists():  # another process finished it while we waited
            return import_built(build_dir)
        module = _compile(arch, build_dir)
        partial = done.with_suffix(".tmp")
        partial.write_text(json.dumps({**facts, "library": Path(module.__file__).name}, indent=1, sort_keys=True))
        os.replace(partial, done)
    return module


def _compile(arch: str, build_dir: Path) -> ModuleType:
    from torch.utils import cpp_extension

    ninja_on_path()
    stats["builds"] += 1
    log.info("mishops: compiling the CUDA backend for sm_%s in %s; this takes up to a minute, "
             "once per environment", arch, build_dir)
    started = time.perf_counter()
    # An explicit -gencode makes cpp_extension skip TORCH_CUDA_ARCH_LIST and its list of known
    # architectures: exactly this GPU's code, with no process-wide environment to set and restore.
    gencode = f"-gencode=arch=compute_{arch},code=sm_{arch}"
    try:
        module = cpp_extension.load(
            name=MODULE_NAME, sources=[str(s) for s in SOURCES], build_directory=str(build_dir),
            extra_cflags=list(EXTRA_CFLAGS), extra_cuda_cflags=[*EXTRA_CUDA_CFLAGS, gencode], verbose=False)
    except Exception as exc:
        output = str(exc).strip()
        first = first_error_line(output) or f"{type(exc).__name__}: {output.splitlines()[0] if output else ''}"
        raise CudaBuildError(f"{first}\nmishops: building the CUDA backend in {build_dir} failed:\n"
                             f"{output[-8000:]}") from exc
    log.info("mishops: CUDA backend built in %.0f s", time.perf_counter() - started)
    return module


def import_built(build_dir: Path) -> ModuleType:
    """The library a finished build's marker names, imported under its own module name."""
    try:
        library = build_dir / json.loads((build_dir / DONE_MARKER).read_text())["library"]
        spec = importlib.util.spec_from_file_location(library.name.split(".")[0], library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:
        raise CudaBuildError(f"cannot load the finished CUDA backend build in {build_dir}: "
                             f"{type(exc).__name__}: {exc} (delete that directory to rebuild it)") from exc
    return module


# --- one extension per GPU architecture, per process ---------------------------------------------

_load_lock = threading.Lock()
_by_device: dict[int, ModuleType] = {}
_by_arch: dict[str, ModuleType] = {}
_failed_arch: dict[str, CudaBuildError] = {}


def extension_for(device: torch.device) -> ModuleType:
    """The loaded extension for ``device``'s GPU; a failed build is not retried in this process."""
    module = _by_device.get(device.index)
    if module is not None:
        return module
    with _load_lock:
        major, minor = torch.cuda.get_device_capability(device)
        arch = f"{major}{minor}"
        if arch in _failed_arch:
            raise _failed_arch[arch]
        if arch not in _by_arch:
            try:
                _by_arch[arch] = build_extension(arch)
            except CudaBuildError as exc:
                _failed_arch[arch] = exc
                raise
        _by_device[device.index] = _by_arch[arch]
        return _by_device[device.index]


# --- the block's backward: activation gradient and bias gradient in one pass ----------------------

#: threads per block and 16-byte packs per thread of csrc/grad_bias.cu's planes walk (kThreads,
#: kPlanePacks): a block takes _GB_THREADS * _GB_PLANE_PACKS packs of one plane.
_GB_THREADS, _GB_PLANE_PACKS = 256, 4


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def grad_bias_layout(z: torch.Tensor) -> tuple[int, int] | None:
    """(channels, inner) of the walk csrc/grad_bias.cu takes over a 4-D ``z``: NCHW planes
    (inner = H W) or channels_last rows (inner = 1); None where neither fits."""
    if z.dim() != 4:
        return None
    n, c, h, w = z.shape
    if z.is_contiguous() and h * w > 1:
        return c, h * w
    if z.is_contiguous(memory_format=torch.channels_last) or z.is_contiguous():
        width = 16 // z.element_size()
        if c > _GB_THREADS and (c % width or c // width > _GB_THREADS):
            return None
        return c, 1
    return None


def grad_bias(z: torch.Tensor, grad: torch.Tensor, mish_count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(dz, dbias): ``grad * d/dz act(z)`` with z's strides, and its sum per channel (over N, H, W)
    in float32, from one pass over z and grad (csrc/grad_bias.cu). ``act`` is Mish twice
    (``mish_count=2``) or once. None where the layout has no kernel (the caller sums itself)."""
    found = grad_bias_layout(z)
    if found is None:
        return None
    channels, inner = found
    if grad.stride() != z.stride():
        grad = grad.contiguous(memory_format=torch.channels_last if inner == 1 else torch.contiguous_format)
    dz = torch.empty_like(z)
    width = 16 // z.element_size()
    aligned = all(t.data_ptr() % 16 == 0 for t in (z, grad, dz))
    if inner > 1:
        if not (aligned and inner % width == 0):
            width = 1
        blocks = max(1, -(-(inner // width) // (_GB_THREADS * _GB_PLANE_PACKS)))
        planes = z.numel() // inner
        partial = torch.empty(planes * blocks, dtype=torch.float32, device=z.device)
    else:
        if not (aligned and channels % width == 0 and channels // width <= _GB_THREADS):
            width = 1
        rows_at_once = _GB_THREADS // (channels // width)
        rows = z.numel() // channels
        blocks = max(1, min(-(-rows // rows_at_once), 8 * _multiprocessors(z.device)))
        partial = torch.empty(blocks * channels, dtype=torch.float32, device=z.device)
    if z.numel() == 0:
        return dz, torch.zeros(z.shape[1], dtype=torch.float32, device=z.device)
    tensors = layout.flat(z), layout.flat(grad), layout.flat(dz)
    checked(extension_for(z.device).grad_bias(*tensors, partial, channels, inner, blocks, mish_count), *tensors)
    if inner > 1:
        dbias = partial.view(z.shape[0], channels, blocks).sum(dim=(0, 2))
    else:
        dbias = partial.view(blocks, channels).sum(dim=0)
    return dz, dbias
