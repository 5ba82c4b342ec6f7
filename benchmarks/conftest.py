"""Shared machinery of the mishops benchmarks: what is swept, how time is measured, what is recorded.

Run everything on a GPU and turn the JSON into a report::

    pytest benchmarks/ --benchmark-only --benchmark-json=out.json
    python -m mishops report out.json --out DIR

Without a GPU, or with ``MISHOPS_BENCH_QUICK=1``, the suite runs in *quick mode*: CPU tensors, two
small sizes, a small model, no ``torch.compile``; it proves the pipeline works (CI), not speed.

How GPU time is measured, and why
---------------------------------
Every GPU row is measured two ways in the same test, after warm-up calls that are never timed
(the first call is where a JIT build, Triton autotuning, the dispatcher's profiling or
``torch.compile`` happen):

1. **CUDA events, ``triton.testing.do_bench`` style: the number the report uses** (``median_ms``
   in ``extra_info``, and from it GB/s, % of copy and speed-ups), by the project's one timer,
   ``mishops.tuning.call_times_ms``, without its idle start: 20 to 50 repetitions (about 150 ms
   of work) are queued back to back, each between its own pair of events; the host never waits
   between them, so an event pair measures the GPU's time for the call, not Python's.
   When a call touches less than 8x the L2 size, each repetition is preceded by a write of twice
   the L2 size to a scratch buffer, so the input comes from HBM as it would in a network, not
   from the previous repetition's cache lines. The median is robust to the odd disturbed
   repetition; the 20th and 80th percentiles are kept beside it.
2. **pytest-benchmark's own table** (``stats`` in the JSON): ``benchmark.pedantic`` rounds in
   which the timed function is the call followed by ``torch.cuda.synchronize()`` and the setup
   (untimed) is the same L2 flush and a synchronize. That is the wall-clock latency of one
   isolated call, launch and synchronization included: at 1e5 elements it shows the launch
   overhead that (1) hides; at large sizes the two agree within the synchronize's latency.

Why not (2) alone: a synchronize per round adds tens of microseconds of host latency to
kernels that take a few, and pytest-benchmark's timer has no notion of GPU time. Why not (1)
alone: pytest-benchmark's table would have nothing in it. On CPU there are no events: (1) is a
``time.perf_counter`` per call, with no cache flush.

Each yardstick (a ``clone`` of the same bytes for the forward, ``x + g`` -- two reads, one
write -- for the backward, the reference eager model for model rows) is measured in the same
session the same way; a row whose yardstick did not run (``-k`` filters) measures it itself.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest
import torch
import torch.nn.functional as F

import mishops
from mishops import registry, tuning
from tests.reference import Model

QUICK = os.environ.get("MISHOPS_BENCH_QUICK", "0") == "1" or not torch.cuda.is_available()
DEVICE = "cpu" if QUICK else "cuda"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the reference block's conv output: batch 64, 128 channels, 254 x 254.
REFERENCE_SHAPE = (64, 128, 254, 254)
REFERENCE_NUMEL = 64 * 128 * 254 * 254
#: from launch-bound to the reference conv output.
SIZES = (100_000, 1_000_000) if QUICK else (100_000, 1_000_000, 10_000_000, 100_000_000, REFERENCE_NUMEL)
#: ``MISHOPS_BENCH_SIZES=ref`` (or a comma-separated list of element counts) cuts the sweep down.
if os.environ.get("MISHOPS_BENCH_SIZES"):
    SIZES = tuple(REFERENCE_NUMEL if item == "ref" else int(item)
                  for item in os.environ["MISHOPS_BENCH_SIZES"].split(","))
#: elements of each output checked against float64 (the first ones in row-major order).
ERROR_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ModelShape:
    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel_size: int


MODEL_SHAPE = ModelShape(2, 8, 16, 32, 32, 3) if QUICK else ModelShape(64, 64, 128, 256, 256, 3)
MODEL_MODES = ("fp32", "bf16-autocast")
#: images of the model's batch checked against float64.
MODEL_ERROR_IMAGES = 2

GPU_REPS = (20, 50)
CPU_REPS = (5, 20)
#: aim for about this much timed work per row (events and wall-clock rounds each).
TARGET_MS = 150.0


# --- what is swept -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ElementwiseCase:
    dtype: str
    numel: int
    impl: str  # "copy" (the yardstick), "auto" (mishops.mish2) or a backend name

    def __str__(self) -> str:
        return f"{self.dtype}-{size_label(self.numel)}-{self.impl}"


@dataclass(frozen=True)
class ModelCase:
    mode: str  # "fp32" or "bf16-autocast"
    impl: str  # "reference" (eager Model), "reference-compiled" (torch.compile(Model)), "auto" or a backend

    def __str__(self) -> str:
        return f"{self.mode}-{self.impl}"


def size_label(numel: int) -> str:
    if numel == REFERENCE_NUMEL:
        return "ref"
    exponent = len(str(numel)) - 1
    return f"1e{exponent}" if numel == 10**exponent else str(numel)


def _backends_for_device() -> list[str]:
    """Backends that could run here; an unavailable one is still listed and skips with its reason."""
    return [name for name, b in registry.backends().items() if b.devices is None or DEVICE in b.devices]


def pytest_generate_tests(metafunc):
    backends = _backends_for_device()
    if "forward_case" in metafunc.fixturenames:
        cases = [ElementwiseCase(d, n, impl) for d in DTYPES for n in SIZES for impl in ["copy", "auto", *backends]]
        metafunc.parametrize("forward_case", cases, ids=str)
    if "backward_case" in metafunc.fixturenames:
        cases = [ElementwiseCase(d, n, impl) for d in DTYPES for n in SIZES for impl in ["copy", *backends]]
        metafunc.parametrize("backward_case", cases, ids=str)
    if "model_case" in metafunc.fixturenames:
        cases = [ModelCase(mode, impl) for mode in MODEL_MODES for impl in ["reference", "auto", *backends]]
        cases.append(ModelCase("fp32", "reference-compiled"))  # last: a slow compile must not starve the rest
        metafunc.parametrize("model_case", cases, ids=str)


# --- timing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    reps: int
    method: str
    l2_flush: bool

    def as_info(self) -> dict:
        return {"median_ms": self.median_ms, "q20_ms": self.q20_ms, "q80_ms": self.q80_ms, "reps": self.reps,
                "timing": self.method, "l2_flush": self.l2_flush}


def _clamp(value: float, bounds: tuple[int, int]) -> int:
    return int(min(bounds[1], max(bounds[0], value)))


def _quantile(times: list[float], q: int) -> float:
    return statistics.quantiles(times, n=10)[q - 1] if len(times) > 1 else times[0]


class Bench:
    """One per session: times calls, remembers yardsticks, and keeps the current inputs alive."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.yardstick_ms: dict[tuple, float] = {}
        self._inputs: tuple[tuple, tuple] | None = None
        self._flush = None
        self._reference64: dict[str, torch.Tensor] = {}
        #: implementations whose first call raised: their later rows skip instead of failing (and
        #: perhaps rebuilding) once per row.
        self.broken: dict[str, str] = {}

    # inputs: one set at a time, so a 2 GB tensor lives only while its rows run
    def inputs(self, dtype: str, numel: int, count: int) -> tuple[torch.Tensor, ...]:
        """``count`` standard-normal tensors of ``numel`` elements (the reference shape at its size)."""
        key = (dtype, numel, count)
        if self._inputs is None or self._inputs[0] != key:
            self._inputs = None
            shape = REFERENCE_SHAPE if numel == REFERENCE_NUMEL else (numel,)
            gen = torch.Generator(self.device).manual_seed(numel)
            made = tuple(torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32).to(DTYPES[dtype])
                         for _ in range(count))
            self._inputs = (key, made)
        return self._inputs[1]

    def model_input(self) -> torch.Tensor:
        s = MODEL_SHAPE
        key = ("model", s)
        if self._inputs is None or self._inputs[0] != key:
            self._inputs = None
            gen = torch.Generator(self.device).manual_seed(0)
            x = torch.rand(s.batch, s.in_channels, s.height, s.width, generator=gen, device=self.device)
            self._inputs = (key, (x,))
        return self._inputs[1][0]

    def reference_model(self) -> Model:
        torch.manual_seed(0)
        s = MODEL_SHAPE
        return Model(s.in_channels, s.out_channels, s.kernel_size).to(self.device).eval()

    def model_reference64(self) -> torch.Tensor:
        """The block in float64 on the first images of the batch: what every model row is compared to."""
        if "model" not in self._reference64:
            model64 = self.reference_model().double()
            with torch.no_grad():
                self._reference64["model"] = model64(self.model_input()[:MODEL_ERROR_IMAGES].double())
        return self._reference64["model"]

    def backend(self, name: str, probe: torch.Tensor) -> mishops.Backend:
        """The named backend, or a skip that says why it cannot run ``probe``."""
        if name in self.broken:
            pytest.skip(f"backend {name!r} raised on an earlier row: {self.broken[name]}")
        if QUICK and name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("Triton's CPU interpreter takes minutes per row and its times say nothing about speed")
        available = registry.availability(name)
        if not available:
            pytest.skip(f"backend {name!r} unavailable: {available.reason}")
        backend = registry.get(name)
        reasons = backend.not_supported_reasons(probe)
        if reasons:
            pytest.skip(f"backend {name!r}: {'; '.join(reasons)}")
        return backend

    def first_call(self, impl: str, fn):
        """``fn()``, untimed (where builds, autotuning and tuning happen); a failure is remembered."""
        try:
            return fn()
        except Exception as exc:
            self.broken[impl] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            raise

    def _l2_flush_buffer(self) -> torch.Tensor:
        if self._flush is None:
            self._flush = tuning.l2_flush_buffer(self.device)
        return self._flush

    def time(self, benchmark, fn, touched_bytes: int, warmup: int = 2) -> Timing:
        """Time ``fn()`` as the module docstring says; ``benchmark=None`` skips the pytest-benchmark rounds."""
        for _ in range(warmup):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # a call touching over 8x the L2 size evicts its own leftovers: a flush would only cost time
            flush = touched_bytes < 4 * self._l2_flush_buffer().numel()
            first = tuning.call_times_ms(fn, self.device, 1, idle_start=False, flush=flush)[0]
            times = tuning.call_times_ms(fn, self.device, _clamp(TARGET_MS / max(first, 1e-3), GPU_REPS),
                                         idle_start=False, flush=flush)
            method = "cuda-events"

            def synchronized():
                fn()
                torch.cuda.synchronize(self.device)

            def setup():
                if flush:
                    self._flush.zero_()
                torch.cuda.synchronize(self.device)

            if benchmark is not None:
                benchmark.pedantic(synchronized, setup=setup, rounds=_clamp(TARGET_MS / max(first, 1e-3), (5, 30)))
        else:
            flush = False
            first = tuning.call_times_ms(fn, self.device, 1)[0]
            times = tuning.call_times_ms(fn, self.device, _clamp(TARGET_MS / max(first, 1e-3), CPU_REPS))
            method = "perf_counter"
            if benchmark is not None:
                benchmark.pedantic(fn, rounds=_clamp(TARGET_MS / max(first, 1e-3), CPU_REPS))
        return Timing(statistics.median(times), _quantile(times, 2), _quantile(times, 8), len(times), method, flush)

    def yardstick(self, key: tuple, fn, touched_bytes: int) -> float:
        """The yardstick's median ms for ``key``: the one its own row recorded, else measured now."""
        if key not in self.yardstick_ms:
            self.yardstick_ms[key] = self.time(None, fn, touched_bytes).median_ms
        return self.yardstick_ms[key]

    @staticmethod
    def bandwidth_info(timing: Timing, touched_bytes: int, yardstick_ms: float) -> dict:
        """GB/s of the bytes read and written, and the yardstick's time as a percentage of this one."""
        return {"bytes": touched_bytes, "gbps": touched_bytes / (timing.median_ms * 1e-3) / 1e9,
                "yardstick_ms": yardstick_ms, "pct_of_copy": 100.0 * yardstick_ms / timing.median_ms}

    # accuracy: every output checked on its first elements against float64
    def forward_error(self, y: torch.Tensor, x: torch.Tensor) -> float:
        xs = x.reshape(-1)[:ERROR_ELEMENTS].double()
        return max_abs_error(y, F.mish(F.mish(xs)))

    def backward_error(self, grad_in: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor) -> float:
        xs, gs = (t.reshape(-1)[:ERROR_ELEMENTS].double() for t in (x, grad_out))
        return max_abs_error(grad_in, registry.get("eager").backward(xs, gs))

    def model_error(self, y: torch.Tensor) -> float:
        return max_abs_error(y, self.model_reference64())

    @contextlib.contextmanager
    def model_precision(self, mode: str):
        """``bf16-autocast``: the conv in bf16 under autocast, so the double Mish sees bf16 too."""
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                             enabled=mode == "bf16-autocast"):
            yield


def max_abs_error(result: torch.Tensor, reference64: torch.Tensor) -> float:
    """max |result - reference| over the first ``reference64.numel()`` elements of ``result`` in
    row-major order; a NaN where the reference has none (or the reverse) counts as infinitely wrong."""
    got = result.reshape(-1)[: reference64.numel()].double()
    want = reference64.reshape(-1)
    diff = (got - want).abs()
    both_nan = got.isnan() & want.isnan()
    diff = torch.where(both_nan, torch.zeros_like(diff), diff.nan_to_num(nan=float("inf")))
    return float(diff.max()) if diff.numel() else 0.0


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def benchmark_environment(tmp_path_factory):
    """Named rows must run the backend they name, and each run tunes from scratch.

    ``MISHOPS_BACKEND`` would silently turn every ``backend=...`` into the forced one, and
    ``MISHOPS_AUTOTUNE=0`` would make "auto" the preference order; an explicit
    ``MISHOPS_CACHE_DIR`` is kept (reuse a tuned cache on purpose), else a fresh one is used.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MISHOPS_BACKEND", raising=False)
        mp.delenv("MISHOPS_AUTOTUNE", raising=False)
        if not os.environ.get("MISHOPS_CACHE_DIR"):
            mp.setenv("MISHOPS_CACHE_DIR", str(tmp_path_factory.mktemp("mishops-tuning-cache")))
        yield


@pytest.fixture(scope="session")
def bench() -> Bench:
    return Bench(DEVICE)


# --- what every JSON carries -------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def _nvidia_smi() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    name, driver, memory = (field.strip() for field in out.splitlines()[0].split(","))
    return {"name": name, "driver": driver, "memory": memory}


def environment_info() -> dict:
    """Device, software versions, settings and backend availability, for the report's header."""
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick_mode": QUICK,
        "bench_device": DEVICE,
        "timing": "cuda-events" if DEVICE == "cuda" else "perf_counter",
        "reps": list(GPU_REPS if DEVICE == "cuda" else CPU_REPS),
        "error_elements": ERROR_ELEMENTS,
        "model_error_images": MODEL_ERROR_IMAGES,
        "python": platform.python_version(),
        "mishops": mishops.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "cupy": _version("cupy"),
        "numpy": _version("numpy"),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        smi = _nvidia_smi()
        info.update({"gpu": props.name, "gpu_count": torch.cuda.device_count(),
                     "compute_capability": f"{props.major}.{props.minor}",
                     "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                     "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
                     "driver": smi.get("driver")})
    info["backends"] = {}
    for name in registry.backends():
        available = registry.availability(name)
        info["backends"][name] = {"available": available.ok, "reason": available.reason}
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["mishops"] = environment_info()
