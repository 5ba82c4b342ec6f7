"""Time the whole Conv2d -> Mish -> Mish block: eager, torch.compile, each plan forced, and the automatic choice.

    python benchmarks/bench_plans.py --out plans.md                       # every case at ref, mid and small
    python benchmarks/bench_plans.py --shapes ref --cases 1,4,7 --train   # NCHW module in each precision, + training
    python benchmarks/bench_plans.py --device cpu --shapes 2x3x4x12x12 --no-compile --reps 3   # a CPU smoke run

Shapes (``--shapes``, comma-separated): ``ref`` (N64, 64->128, 256x256, the reference), ``mid`` (N16),
``small`` (N1), or ``NxCINxCOUTxHxW`` (kernel ``--kernel``). Cases (``--cases``, 1-based, see ``--help``):
each precision (fp32 with TF32, bf16 autocast, fp16 autocast) with each module layout (NCHW module and
input; channels_last module with an NCHW input; channels_last module and input).

Every row is whole calls (inputs prepared, outputs allocated by the call): the median of ``--reps`` CUDA-event
timings (``perf_counter`` on CPU) after the first call and two warm-ups. The first call's time is where one-time
work shows: a plan's search (building and checking cuDNN engine configs), the double-Mish backends' compile and
tuning, and for ``torch.compile`` its compile time. Speed-ups are over the eager Model and over
``torch.compile(Model)`` of the same case; the last row of each case times eager and auto again with their
calls alternating, the ratio to judge auto by where the host's speed decides and drifts between rows (batch 1).
The floor is reading x and writing the output once at the copy bandwidth measured in the same run (a
``torch.empty_like(out).copy_(out)`` of the output's size, reported per shape): no implementation of the block
can beat it, so "% of floor" says how much is left. The error is max |y - y64| on the first two images against
the float64 block.

``--train`` adds forward + backward rows (an upstream gradient given) in both training configurations
(``--train-configs``): ``w,b`` (the conv's weight and bias differentiated, x not: a first layer) and ``x,w,b``
(x too: a layer inside a network). Each has eager, ``torch.compile(Model)``, each plan forced (``--plans``) and
auto, so storing the pre-activation ("store": ``torch_conv``, also with cuDNN's weight and input gradients run on
channels_last copies and with the Triton weight gradient, ``--backward-variants``; the plans whose epilogue writes
it) and recomputing it (the other fused plans, "recompute") can be compared per shape, with the peak
memory above the inputs (CUDA) and the weight gradient's error relative to its float64 value. ``--train-only``
leaves out the inference rows. Standalone: not collected by pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a script: the checkout's mishops and tests
from mishops import plans, tuning  # noqa: E402
from tests.reference import Model  # noqa: E402

CL = torch.channels_last
NAMED_SHAPES = {"ref": (64, 64, 128, 256, 256), "mid": (16, 64, 128, 256, 256), "small": (1, 64, 128, 256, 256)}
PRECISIONS = [("fp32 TF32", None), ("bf16 autocast", torch.bfloat16), ("fp16 autocast", torch.float16)]
LAYOUTS = [("NCHW module, NCHW input", False, False), ("channels_last module, NCHW input", True, False),
           ("channels_last module, channels_last input", True, True)]
#: images of the batch whose output is compared with float64.
ERROR_IMAGES = 2


@dataclass(frozen=True)
class Case:
    label: str
    module_channels_last: bool
    input_channels_last: bool
    autocast: torch.dtype | None


@dataclass(frozen=True)
class Shape:
    batch: int
    cin: int
    cout: int
    height: int
    width: int
    kernel: int

    def __str__(self) -> str:
        return f"N{self.batch}, {self.cin}->{self.cout}, {self.height}x{self.width}, k{self.kernel}"


CASES = [Case(f"{precision}, {layout}", module_cl, input_cl, amp)
         for precision, amp in PRECISIONS for layout, module_cl, input_cl in LAYOUTS]


def parse_shapes(text: str, kernel: int) -> list[Shape]:
    shapes = []
    for item in text.split(","):
        dims = NAMED_SHAPES.get(item) or tuple(int(d) for d in item.split("x"))
        if len(dims) != 5:
            raise SystemExit(f"--shapes: {item!r} is neither {sorted(NAMED_SHAPES)} nor NxCINxCOUTxHxW")
        shapes.append(Shape(*dims, kernel))
    return shapes


class Clock:
    """Whole-call timings: the first call by the host clock, then the project's one timer
    (``mishops.tuning.time_ms``: CUDA events, L2 flushed before each call; ``perf_counter`` on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn, reps: int) -> tuple[float, float]:
        """(first call in ms, median of ``reps`` later calls in ms)."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        first = (time.perf_counter() - t0) * 1e3
        fn()
        return first, tuning.time_ms(fn, self.device, budget_s=math.inf, max_reps=reps, min_reps=reps).median_ms


def copy_bandwidth_gbps(clock: Clock, shape: Shape, reps: int) -> float:
    """Bytes read plus bytes written per second by a copy of the fp32 output's size: the floor's yardstick."""
    ho, wo = shape.height - shape.kernel + 1, shape.width - shape.kernel + 1
    out = torch.empty(shape.batch, shape.cout, ho, wo, device=clock.device).normal_()
    _, ms = clock.time(lambda: torch.empty_like(out).copy_(out), reps)
    return 2 * out.nbytes / (ms * 1e-3) / 1e9


def versions(device: torch.device) -> str:
    if device.type == "cuda":
        memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        lines = [f"- device: {torch.cuda.get_device_name(device)} ({memory_gib:.0f} GiB)",
                 f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                 f"Python {platform.python_version()}"]
    else:
        lines = [f"- device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                 f"- torch {torch.__version__}, Python {platform.python_version()}"]
    try:
        import cudnn

        lines.append(f"- nvidia-cudnn-frontend {cudnn.__version__} (cuDNN backend {cudnn.backend_version()})")
    except ImportError:
        lines.append("- nvidia-cudnn-frontend: not installed")
    return "\n".join(lines)


def output_format(y: torch.Tensor) -> str:
    layout = "channels_last" if y.is_contiguous(memory_format=CL) and not y.is_contiguous() else "contiguous"
    return f"{str(y.dtype).removeprefix('torch.')} {layout}"


@contextlib.contextmanager
def forced_plan(name: str):
    os.environ["MISHOPS_PLAN"] = name
    try:
        yield
    finally:
        del os.environ["MISHOPS_PLAN"]


def why_not(exc: Exception) -> str:
    """One short line for a row that could not run."""
    if isinstance(exc, plans.NoPlanError):
        return str(exc).split(": ", 2)[-1][:110]
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:110]


def last_block_choice() -> str:
    """The tuner's last block choice, with every candidate's median as the tuner measured it (same
    process, same timer): the best plan of the case even where ``--plans`` forces none."""
    chosen = [c for c in tuning.TUNER.last_choices() if c.op == "block"]
    if not chosen:
        return "no choice recorded"
    ranked = ", ".join(f"{name} {m.median_ms:.3f}" for name, m in chosen[-1].ranked() if m.ok)
    return f"{chosen[-1].winner} ({chosen[-1].how}; tuner ms: {ranked or 'none timed'})"


def label(name) -> str:
    """A row's name; the automatic choice's is a function, read after the call that made the choice."""
    return name() if callable(name) else name


def plan_kind(name: str) -> str:
    """How the plan's backward gets the pre-activation."""
    plan = plans.get_plan(name)
    return "store" if plan.differentiable or plan.stores_preactivation else "recompute"


class CaseRun:
    """One case at one shape: the models, the inputs, the float64 references, and the rows measured."""

    def __init__(self, case: Case, shape: Shape, clock: Clock, args, bandwidth_gbps: float):
        self.case, self.clock, self.args, self.bandwidth_gbps = case, clock, args, bandwidth_gbps
        device = clock.device
        torch.manual_seed(0)
        self.model = Model(shape.cin, shape.cout, shape.kernel).to(device)
        self.model64 = Model(shape.cin, shape.cout, shape.kernel).to(device).double()
        self.model64.load_state_dict(self.model.state_dict())
        self.x = torch.rand(shape.batch, shape.cin, shape.height, shape.width, device=device)
        if case.module_channels_last:
            self.model = self.model.to(memory_format=CL)
        if case.input_channels_last:
            self.x = self.x.contiguous(memory_format=CL)
        with torch.no_grad():
            self.ref64 = self.model64(self.x[:ERROR_IMAGES].double())

    def autocast(self):
        if self.case.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.clock.device.type, dtype=self.case.autocast)

    def row(self, *cells) -> str:
        line = "| " + " | ".join([self.case.label, *map(str, cells)]) + " |"
        print(line, flush=True)
        return line

    # --- inference -----------------------------------------------------------------------------

    def inference_rows(self) -> list[str]:
        rows, baseline = [], {}

        def measure(name, fn, baseline_of=None):
            try:
                with torch.no_grad(), self.autocast():
                    first, ms = self.clock.time(fn, self.args.reps)
                    y = fn()
            except Exception as exc:
                rows.append(self.row(label(name), "n/a", "", "", "", "", "", why_not(exc)))
                return
            if baseline_of:
                baseline[baseline_of] = ms
            floor_ms = (self.x.nbytes + y.nbytes) / (self.bandwidth_gbps * 1e9) * 1e3
            error = float((y[:ERROR_IMAGES].double() - self.ref64).abs().max())
            over = [f"{baseline[k] / ms:.2f}x" if k in baseline else "" for k in ("eager", "compile")]
            rows.append(self.row(label(name), f"{ms:.3f}", f"{first / 1e3:.2f}", *over,
                                 f"{100 * floor_ms / ms:.0f}%", f"{error:.2e}", output_format(y)))
            del y

        measure("eager Model", lambda: self.model(self.x), "eager")
        if not self.args.no_compile:
            torch._dynamo.reset()  # the first call's time is this case's compile, not a recompile
            # torch 2.11 on the H100 served the bf16-autocast graph to the fp16-autocast case from
            # its compile caches (bf16 outputs under fp16 autocast): compile each case afresh
            torch._inductor.config.fx_graph_cache = False
            torch._functorch.config.enable_autograd_cache = False
            compiled = torch.compile(self.model)
            measure("torch.compile(Model)", lambda: compiled(self.x), "compile")
        for name in self.forced_plans():
            with forced_plan(name):
                measure(f"plan {name}", lambda: plans.run_block(self.x, self.model.conv))
        tuning.TUNER.clear()
        measure(lambda: f"run_block auto: {last_block_choice()}", lambda: plans.run_block(self.x, self.model.conv))
        with torch.no_grad(), self.autocast():
            rows.append(self.alternating_row((), lambda: self.model(self.x),
                                             lambda: plans.run_block(self.x, self.model.conv), ("", "", "")))
        return rows

    def alternating_row(self, before: tuple, eager, auto, after: tuple) -> str:
        """Eager and auto again, their calls alternating (``tuning.time_interleaved``): where the host's
        work decides (batch 1), the host's speed drifts between rows timed apart, and only calls that
        take turns see the same drift -- this row's ratio is the one to judge auto by."""
        timed = tuning.time_interleaved({"eager": eager, "auto": auto}, self.clock.device, self.args.reps)
        e, a = timed["eager"].median_ms, timed["auto"].median_ms
        return self.row(*before, f"eager Model {e:.3f} ms and auto, calls alternating", f"{a:.3f}", "",
                        f"{e / a:.2f}x", "", *after)

    # --- training ------------------------------------------------------------------------------

    def training_rows(self) -> list[str]:
        rows = []
        for config in self.args.train_configs.split("|"):
            rows += self.training_rows_for(config)
        return rows

    def training_rows_for(self, config: str) -> list[str]:
        """One training configuration: ``w,b`` (x does not require grad: the first layer) or ``x,w,b``
        (a layer inside a network). Eager, torch.compile, each plan forced (torch_conv also with its
        backward in channels_last), and auto, all on the same upstream gradient."""
        x = self.x.detach().requires_grad_(config == "x,w,b")
        params = [x, self.model.conv.weight, self.model.conv.bias] if x.requires_grad else \
            [self.model.conv.weight, self.model.conv.bias]
        with torch.no_grad(), self.autocast():
            grad = torch.randn_like(self.model(self.x))
        try:  # the whole batch in float64: the weight gradient sums over all of it
            (dw64,) = torch.autograd.grad(self.model64(self.x.double()), [self.model64.conv.weight], grad.double())
        except torch.OutOfMemoryError:
            dw64 = None
        rows, baseline = [], {}

        def step(forward):
            with self.autocast():
                y = forward()
            return torch.autograd.grad(y, params, grad)

        def measure(name, forward, baseline_of=None):
            try:
                baseline_bytes = self.memory_allocated()
                self.reset_peak()
                first, ms = self.clock.time(lambda: step(forward), self.args.reps)
                peak = self.peak_memory() - baseline_bytes
                dw = step(forward)[-2]
            except Exception as exc:
                rows.append(self.row(config, label(name), "n/a", "", "", "", "", "", why_not(exc)))
                return
            if baseline_of:
                baseline[baseline_of] = ms
            error = "n/a" if dw64 is None else f"{float((dw.double() - dw64).abs().max() / dw64.abs().max()):.2e}"
            peak_cell = f"{peak / 2**20:.0f}" if self.clock.device.type == "cuda" else ""
            over = [f"{baseline[k] / ms:.2f}x" if k in baseline else "" for k in ("eager", "compile")]
            rows.append(self.row(config, label(name), f"{ms:.3f}", f"{first / 1e3:.2f}", *over, peak_cell, error, ""))

        measure("eager Model", lambda: self.model(x), "eager")
        if not self.args.no_compile:
            torch._dynamo.reset()
            torch._inductor.config.fx_graph_cache = False
            torch._functorch.config.enable_autograd_cache = False
            compiled = torch.compile(self.model)
            measure("torch.compile(Model)", lambda: compiled(x), "compile")
        for name in self.forced_plans():
            with forced_plan(name):
                measure(f"plan {name} ({plan_kind(name)})", lambda: plans.run_block(x, self.model.conv))
                if name != "torch_conv" or self.clock.device.type != "cuda":
                    continue
                for settings, what in self.backward_variants():
                    os.environ.update(settings)
                    try:
                        measure(f"plan torch_conv (store), {what}", lambda: plans.run_block(x, self.model.conv))
                    finally:
                        for variable in settings:
                            del os.environ[variable]
        if not self.args.no_auto:
            tuning.TUNER.clear()
            measure(lambda: f"run_block auto: {last_block_choice()}", lambda: plans.run_block(x, self.model.conv))
            rows.append(self.alternating_row((config,), lambda: step(lambda: self.model(x)),
                                             lambda: step(lambda: plans.run_block(x, self.model.conv)), ("", "", "")))
        return rows

    def forced_plans(self) -> list[str]:
        """The plans ``--plans`` names, each forced for a row of its own (inference and training)."""
        wanted = None if self.args.plans == "all" else set(self.args.plans.split(","))
        return [name for name in plans.plans() if wanted is None or name in wanted]

    def backward_variants(self) -> list[tuple[dict[str, str], str]]:
        """The training backward's alternatives (``mishops.plans.training``) that ``--backward-variants`` names."""
        known = {"cl": ({"MISHOPS_TRAIN_BACKWARD_LAYOUT": "channels_last"}, "backward in channels_last"),
                 "triton-wgrad": ({"MISHOPS_TRAIN_WGRAD": "triton"}, "Triton weight gradient"),
                 "triton-wgrad-s2": ({"MISHOPS_TRAIN_WGRAD": "triton", "MISHOPS_TRITON_WGRAD_STAGES": "2"},
                                     "Triton weight gradient, 2 stages")}
        return [known[v] for v in self.args.backward_variants.split(",") if v]

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated(self.clock.device) if self.clock.device.type == "cuda" else 0

    def reset_peak(self) -> None:
        if self.clock.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.clock.device)

    def peak_memory(self) -> int:
        return torch.cuda.max_memory_allocated(self.clock.device) if self.clock.device.type == "cuda" else 0


INFERENCE_HEADER = ["| case | what | ms | first call s | vs eager | vs compile | % of floor | error | output |",
                    "|---|---|---|---|---|---|---|---|---|"]
TRAINING_HEADER = ["| case | grads of | what | fwd+bwd ms | first call s | vs eager | vs compile | peak MiB "
                   "| dW rel. error | note |", "|---|---|---|---|---|---|---|---|---|---|"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="cases:\n" + "\n".join(f"  {i}: {c.label}" for i, c in enumerate(CASES, 1)))
    parser.add_argument("--shapes", default="ref,mid,small", help="comma-separated: ref, mid, small or NxCINxCOUTxHxW")
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--cases", default="all", help="comma-separated case numbers (1-based) or 'all'")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--train", action="store_true", help="also time forward + backward")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile(Model)")
    parser.add_argument("--train-only", action="store_true", help="with --train: leave out the inference rows")
    parser.add_argument("--train-configs", default="w,b|x,w,b",
                        help="'|'-separated: w,b (x not differentiated) and/or x,w,b")
    parser.add_argument("--plans", default="all", help="comma-separated plans to force, 'all', or 'none' (eager and auto only)")
    parser.add_argument("--no-auto", action="store_true", help="leave out run_block's own choice")
    parser.add_argument("--backward-variants", default="cl,triton-wgrad",
                        help="comma-separated extra torch_conv training rows: cl (cuDNN's backward on channels_last "
                             "copies), triton-wgrad (the Triton weight gradient); '' for none")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-cudnn-benchmark", action="store_true", help="leave torch.backends.cudnn.benchmark off")
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    clock = Clock(device)
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = True
    picked = CASES if args.cases == "all" else [CASES[int(i) - 1] for i in args.cases.split(",")]
    lines = [f"cudnn.benchmark={torch.backends.cudnn.benchmark}; median of {args.reps} calls "
             f"({'CUDA events' if device.type == 'cuda' else 'perf_counter'}); error: max |y - y64| on the first "
             f"{ERROR_IMAGES} images; floor: x read + output written once at the copy bandwidth", "", versions(device)]
    print("\n".join(lines), flush=True)
    for shape in parse_shapes(args.shapes, args.kernel):
        bandwidth = copy_bandwidth_gbps(clock, shape, args.reps)
        section = ["", f"## {shape}: copy bandwidth {bandwidth:.0f} GB/s", "", *INFERENCE_HEADER]
        print("\n".join(section), flush=True)
        training = ["", f"### {shape}: training step", "", *TRAINING_HEADER]
        for case in picked:
            run = CaseRun(case, shape, clock, args, bandwidth)
            if not (args.train and args.train_only):
                section += run.inference_rows()
            if args.train:
                if len(training) == 4:
                    print("\n".join(training), flush=True)
                training += run.training_rows()
            del run
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if args.out:  # after every case: a run stopped at a time limit keeps the cases it finished
                Path(args.out).write_text("\n".join(lines + section + (training if args.train else [])) + "\n")
        lines += section + (training if args.train else [])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
