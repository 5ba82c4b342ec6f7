"""The mishops command line (``mishops``, ``python -m mishops``): info, bench, tune, cache, report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from mishops import cache, dispatch, layout, plans, registry, tuning
from mishops.tuning import tune as mishops_tune

console = Console(width=None if sys.stdout.isatty() else 160)  # tables stay whole in logs

REFERENCE_SHAPE = (64, 128, 254, 254)  # the reference conv output: batch 64, 128 channels, 256-3+1
CPU_SHAPE = (4, 16, 64, 64)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
#: above this many elements a CPU bench says beforehand that it will take long (the issue's
#: 64x128x254x254 bf16 ran 64 s at 9.6 GB)
CPU_LONG_ELEMENTS = 1 << 25

DESCRIPTION = """\
Conv2d -> Mish -> Mish as fast as the hardware allows. Run "mishops COMMAND --help" for a command's options.

environment: MISHOPS_BACKEND, MISHOPS_PLAN, MISHOPS_AUTOTUNE, MISHOPS_TUNE_BUDGET_MS, MISHOPS_CACHE_DIR and
MISHOPS_LOG (see the README)."""


class UsageError(Exception):
    """A bad option or environment value: one line on stderr and exit code 2."""


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 64x128x254x254, not {text!r}") from None
    if any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"shape must have positive sizes, like 64x128x254x254, not {text!r}")
    return dims


def _device_arg(text: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, checked against what this machine has."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported (use cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is visible to PyTorch (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


def _device(name) -> torch.device:
    if name:
        return name if isinstance(name, torch.device) else torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_environment(environ=os.environ) -> None:
    """Every ``MISHOPS_*`` value the commands read, checked before any work: ``UsageError`` names
    the variable and what it takes."""

    def bad(name: str, value: str, wants: str) -> UsageError:
        return UsageError(f"{name}={value!r}: {wants}")

    for name in ("MISHOPS_TUNE_BUDGET_MS", "MISHOPS_BUILD_LOCK_TIMEOUT_S"):
        value = environ.get(name)
        if value:
            try:
                _positive_float(value)
            except argparse.ArgumentTypeError:
                raise bad(name, value, "must be a positive number") from None
    value = environ.get("MISHOPS_CUDNN_CONFIGS")
    if value and not (value.strip().lower() == "all" or (value.strip().isdigit() and int(value) > 0)):
        raise bad("MISHOPS_CUDNN_CONFIGS", value, "must be a positive whole number or 'all'")
    value = environ.get("MISHOPS_AUTOTUNE")
    if value and value not in ("0", "1"):
        raise bad("MISHOPS_AUTOTUNE", value, "must be 0 (no timing: preference order) or 1")
    value = environ.get("MISHOPS_LOG")
    if value and not isinstance(logging.getLevelName(value.upper()), int):
        raise bad("MISHOPS_LOG", value, "must be a logging level: DEBUG, INFO, WARNING or ERROR")
    value = environ.get("MISHOPS_BACKEND")
    if value:
        from mishops.nn import check_backend

        try:
            check_backend(value, "MISHOPS_BACKEND")
        except ValueError as exc:
            raise UsageError(str(exc).removeprefix("mishops: ")) from None
    value = environ.get("MISHOPS_PLAN")
    if value and value not in plans.plans():
        raise bad("MISHOPS_PLAN", value, f"unknown plan; valid: {', '.join(plans.plans())}")


class _Formatter(logging.Formatter):
    """``WARNING mishops: message``, also for messages that carry their own ``mishops:`` prefix."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        doubled = f"{record.name}: {record.name}: "
        return text.replace(doubled, f"{record.name}: ", 1)


def _setup_logging() -> None:
    log = logging.getLogger("mishops")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    level = os.environ.get("MISHOPS_LOG")
    if level:
        log.setLevel(level.upper())


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for package in ("triton", "cupy", "cudnn"):
        try:
            versions[package] = str(__import__(package).__version__)
        except Exception:
            versions[package] = "absent"
    return versions


def cmd_info(args) -> int:
    from mishops import __version__

    console.print(f"[bold]mishops {__version__}[/bold]")
    devices = [f"cuda:{i} {tuning.device_label(torch.device('cuda', i))}" for i in range(torch.cuda.device_count())]
    console.print("devices: " + (", ".join(devices) if devices else f"no CUDA GPU; {tuning.device_label(torch.device('cpu'))}"))
    console.print("versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()))
    console.print(f"tuning cache: {cache.cache_dir()}")
    table = Table("backend", "priority", "devices", "available", "reason")
    for name, backend in registry.backends().items():
        ok = registry.availability(name)
        devices = "any" if backend.devices is None else ",".join(sorted(backend.devices))
        table.add_row(name, str(backend.priority), devices, "[green]yes[/green]" if ok else "[red]no[/red]", escape(ok.reason))
    for name, reason in registry.failures().items():
        if name not in registry.backends():
            table.add_row(name, "-", "-", "[red]no[/red]", escape(reason))
    console.print(table)
    plan_table = Table("block plan (ModelNew)", "priority", "outputs", "available", "reason")
    for name, plan in plans.plans().items():
        ok = plans.availability(name)
        formats = ",".join(sorted(plans.format_name(f) for f in plan.output_formats))
        plan_table.add_row(name, str(plan.priority), formats, "[green]yes[/green]" if ok else "[red]no[/red]", escape(ok.reason))
    for name, reason in plans.PLANS.failed.items():
        if name not in plans.plans():
            plan_table.add_row(name, "-", "-", "[red]no[/red]", escape(reason))
    console.print(plan_table)
    return 0


def _gbps(x: torch.Tensor, ms: float, passes: int = 2) -> float:
    return passes * x.nbytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")


def _time_ms(fn, like: torch.Tensor, budget_s: float) -> float:
    """Median ms of ``fn()``, by the project's one timer."""
    return tuning.time_ms(fn, like.device, budget_s).median_ms


def _long_on_cpu(shape: tuple[int, ...], dtype: torch.dtype, in_channels: int) -> str:
    """A warning for a CPU bench that will take long (empty when it will not)."""
    n = 1
    for d in shape:
        n *= d
    if n < CPU_LONG_ELEMENTS:
        return ""
    size = torch.empty((), dtype=dtype).element_size()
    conv_in = shape[0] * in_channels * (shape[2] + 2) * (shape[3] + 2) if len(shape) == 4 else 0
    gigabytes = (6 * n + conv_in) * size / 1e9  # the input, profiling's scratch copies, the block's tensors
    return (f"a {'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')} bench on CPU moves {n / 1e6:.0f} M "
            f"elements per pass: expect minutes and about {gigabytes:.1f} GB of memory "
            f"(a smaller --shape such as {'x'.join(map(str, CPU_SHAPE))} takes seconds)")


def _bench_model(args, shape, dtype, device, winner: str) -> int:
    """ModelNew with the winning backend and with "auto", timed and checked against the reference block."""
    if len(shape) != 4:
        console.print(f"ModelNew not run: --shape {'x'.join(map(str, shape))} is not a 4-D conv output "
                      "(batch x channels x height x width), e.g. 4x16x64x64")
        return 0
    from mishops.model import ModelNew
    from mishops.plans import TOLERANCE, mismatch

    torch.manual_seed(0)
    inp = torch.randn(shape[0], args.in_channels, shape[2] + 2, shape[3] + 2, device=device, dtype=dtype)
    budget = args.budget_ms / 1e3
    reference = ModelNew(args.in_channels, shape[1], 3, backend="eager").to(device=device, dtype=dtype)
    table = Table(title=f"ModelNew({args.in_channels}, {shape[1]}, 3) on input {tuple(inp.shape)}")
    for col in ("block", "median ms", "output", "check against the reference block"):
        table.add_column(col, justify="right" if col == "median ms" else "left")
    with torch.no_grad():
        def reference_block():
            return torch.nn.functional.mish(torch.nn.functional.mish(reference.conv(inp)))

        expected = reference_block()
        ref_ms = _time_ms(reference_block, expected, budget)
        table.add_row("reference (conv, F.mish twice)", f"{ref_ms:.3f}", f"{tuple(expected.shape)}", "-")
        failed = False
        for backend in dict.fromkeys(["auto", winner]):
            model = ModelNew(args.in_channels, shape[1], 3, backend=backend).to(device=device, dtype=dtype)
            model.load_state_dict(reference.state_dict())
            out = model(inp)
            wrong = mismatch(out, expected)
            failed = failed or bool(wrong)
            ms = _time_ms(lambda: model(inp), out, budget)
            label = f"backend={backend!r}"
            if backend == "auto":
                chosen = [c for c in tuning.TUNER.last_choices() if c.op == "block"]
                label += f" (plan {chosen[-1].winner})" if chosen else ""
            rtol, atol = TOLERANCE[dtype]
            verdict = (f"[red]wrong: {escape(wrong)}[/red]" if wrong
                       else f"[green]ok[/green] (rtol {rtol:g}, atol {atol:g})")
            table.add_row(label, f"{ms:.3f}", f"{tuple(out.shape)} {layout.memory_format_name(out)}", verdict)
    console.print(table)
    return 1 if failed else 0


def cmd_bench(args) -> int:
    device = _device(args.device)
    shape = args.shape or (REFERENCE_SHAPE if device.type == "cuda" else CPU_SHAPE)
    if args.shape is None and device.type != "cuda":
        console.print(f"[yellow]no CUDA GPU: using a small CPU shape {'x'.join(map(str, shape))} instead of the "
                      f"reference {'x'.join(map(str, REFERENCE_SHAPE))}[/yellow]")
    dtype = DTYPES[args.dtype]
    if device.type == "cpu":
        warning = _long_on_cpu(shape, dtype, args.in_channels)
        if warning:
            print(f"mishops bench: warning: {warning}", file=sys.stderr, flush=True)
    x = torch.randn(shape, device=device, dtype=dtype) * 3
    problem = dispatch.problem("forward", x)
    budget = args.budget_ms / 1e3
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("timing a copy", total=len(problem.candidates) + 1)
        copy = tuning.time_ms(lambda: x.clone(), device, budget)
        copy_ms, copy_spread = copy.median_ms, copy.spread_ms

        def step(name):
            progress.advance(task)
            progress.update(task, description=f"checking and timing {name}")

        measurements = tuning.TUNER.measure(problem, step)
    winner = tuning.pick(measurements, {b.name: b.priority for b in problem.candidates})
    table = Table(title=f"mish2 forward, {str(dtype).removeprefix('torch.')} {tuple(shape)} on "
                        f"{tuning.device_label(device)}")
    for col in ("backend", "median ms", "spread ms", "GB/s", "% of copy", "chosen"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    table.add_row("copy (yardstick)", f"{copy_ms:.3f}", f"{copy_spread:.3f}", f"{_gbps(x, copy_ms):.0f}", "100", "")
    for name, m in sorted(measurements.items(), key=lambda kv: kv[1].median_ms):
        if m.ok:
            table.add_row(name, f"{m.median_ms:.3f}", f"{m.spread_ms:.3f}", f"{_gbps(x, m.median_ms):.0f}",
                          f"{100 * copy_ms / m.median_ms:.0f}", "[bold green]<-[/bold green]" if name == winner else "")
        else:
            table.add_row(name, "-", "-", "-", "-", f"[red]rejected: {escape(m.reason)}[/red]")
    for name, why in problem.rejected.items():
        table.add_row(name, "-", "-", "-", "-", f"[dim]not run: {escape(why)}[/dim]")
    console.print(table)
    if winner is None:
        console.print("[red]no backend produced a correct result[/red]")
        return 1
    del x
    return _bench_model(args, shape, dtype, device, winner)


def _choice_rows(table: Table, label: str, choice) -> None:
    """One row per candidate of ``choice`` (fastest first), the winner marked; then the ruled-out ones."""
    first = True
    for name, m in choice.ranked():
        mark = "[bold green]<- chosen[/bold green]" if name == choice.winner else ""
        result = f"{m.median_ms:.3f}" if m.ok else f"[red]out: {escape(m.reason)}[/red]"
        table.add_row(label if first else "", choice.how if first else "", name, result, mark)
        first = False
    if not choice.measurements:
        table.add_row(label, choice.how, choice.winner, "-", "[bold green]<- chosen[/bold green]")
    for name, why in choice.rejected.items():
        table.add_row("", "", name, "-", f"[dim]cannot take it: {escape(why)}[/dim]")


def _tune_block(args, device: torch.device, dname: str) -> list:
    from mishops.model import ModelNew

    n, c, h, w = args.block
    model = ModelNew(c, args.out_channels, args.kernel).to(device)
    x = torch.randn(n, c, h, w, device=device)
    if args.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    dtype = DTYPES[dname]
    if dtype in (torch.float32, torch.float64):
        model, x = model.to(dtype), x.to(dtype)
        return mishops_tune(model, x, train=args.train)
    with torch.autocast(device.type, dtype=dtype):  # 16-bit blocks run under autocast, as users run them
        return mishops_tune(model, x, train=args.train)


def cmd_tune(args) -> int:
    device = _device(args.device)
    written = tuning.stats["cache_writes"]
    table = Table("what", "how", "candidate", "median ms", "")
    with Progress(console=console, transient=True) as progress:
        if args.block:
            task = progress.add_task("tuning", total=len(args.dtype))
            for dname in args.dtype:
                label = f"block {'x'.join(map(str, args.block))}->{args.out_channels} k{args.kernel} {dname}" \
                        + (" channels_last" if args.channels_last else "") + (" train" if args.train else "")
                progress.update(task, description=f"tuning {label}")
                choices = _tune_block(args, device, dname)
                for choice in choices:
                    _choice_rows(table, f"{label}\n{choice.op}", choice)
                if not choices:
                    table.add_row(label, "-", "-", "-", "already chosen in this process, or named by MISHOPS_PLAN")
                progress.advance(task)
        else:
            shapes = args.shape or [REFERENCE_SHAPE if device.type == "cuda" else CPU_SHAPE]
            ops = ["forward", "backward"] if args.backward else ["forward"]
            jobs = [(s, d, op) for s in shapes for d in args.dtype for op in ops]
            task = progress.add_task("tuning", total=len(jobs))
            for shape, dname, op in jobs:
                label = f"mish2 {op} {dname} {'x'.join(map(str, shape))}"
                progress.update(task, description=f"tuning {label}")
                x = torch.randn(shape, device=device, dtype=DTYPES[dname])
                if args.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                choice = dispatch.decide(op, x)
                if choice is None:
                    table.add_row(label, "named", dispatch.choose(op, x).name, "-",
                                  "MISHOPS_BACKEND names the backend: nothing to tune")
                else:
                    _choice_rows(table, label, choice)
                progress.advance(task)
    console.print(table)
    stored = tuning.stats["cache_writes"] - written
    if stored:
        console.print(f"stored {stored} new measurement set(s) in {cache.cache_dir()}")
    else:
        console.print(f"nothing new stored: every choice was already in {cache.cache_dir()} or needed no timing")
    return 0


def cmd_cache(args) -> int:
    if args.action == "clear":
        removed = cache.clear()
        console.print(f"removed {len(removed)} file(s) from {cache.cache_dir()}")
        return 0
    files = cache.all_cache_files()
    if not files:
        console.print(f"no tuning cache in {cache.cache_dir()}")
        return 0
    for path in files:
        try:
            doc = json.loads(path.read_text())
            env, entries = doc["environment"], doc["entries"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            console.print(f"[red]{path}: unreadable ({exc}); it will be rebuilt on next use[/red]")
            continue
        table = Table("key", "backend", "ok", "median ms", "spread ms",
                      title=f"{path.name}: " + ", ".join(f"{k} {v}" for k, v in env.items()))
        for key, per_backend in sorted(entries.items()):
            for name, m in sorted(per_backend.items(), key=lambda kv: kv[1].get("median_ms", float("inf"))):
                table.add_row(key, name, "yes" if m.get("ok") else escape(f"no: {m.get('reason', '')}"),
                              f"{m.get('median_ms', float('nan')):.4f}", f"{m.get('spread_ms', float('nan')):.4f}")
        console.print(table)
    return 0


def cmd_report(args) -> int:
    from mishops import report

    for path in args.json:
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except OSError as exc:
            raise UsageError(f"{path}: cannot read it ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise UsageError(f"{path}: not a JSON file ({str(exc).splitlines()[0]})") from None
    try:
        return report.main([*args.json, "--out", args.out])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"{', '.join(args.json)}: not a pytest-benchmark JSON file "
                         f"({type(exc).__name__}: {str(exc)[:100]})") from None


class _Parser(argparse.ArgumentParser):
    """argparse, with the usage line dropped from errors: one line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mishops", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    sub.add_parser("info", help="device, versions, and every backend with why it is (un)available")

    bench = sub.add_parser("bench", help="profile every backend on one shape, then time and check ModelNew")
    bench.add_argument("--shape", type=_shape, help="the conv output NxCxHxW (default: the reference "
                                                   "64x128x254x254 on a GPU, 4x16x64x64 on CPU)")
    bench.add_argument("--dtype", choices=list(DTYPES), default="float32")
    bench.add_argument("--device", type=_device_arg, help="cpu, cuda or cuda:N (default: cuda if present)")
    bench.add_argument("--in-channels", type=_positive_int, default=64, help="ModelNew's input channels")
    bench.add_argument("--budget-ms", type=_positive_float, default=1000.0, help="timing budget per backend")

    tune = sub.add_parser("tune", help="make and store choices ahead of time: mish2 shapes, or a whole block")
    tune.add_argument("--shape", type=_shape, action="append", help="a mish2 input shape, repeatable; e.g. 64x128x254x254")
    tune.add_argument("--block", type=_shape, help="a block's input NxCxHxW, e.g. 64x64x256x256 (with --out-channels, --kernel)")
    tune.add_argument("--out-channels", type=int, default=128, help="the block's output channels (default 128)")
    tune.add_argument("--kernel", type=int, default=3, help="the block's kernel size (default 3)")
    tune.add_argument("--train", action="store_true", help="also the block's training choices (forward + backward)")
    tune.add_argument("--dtype", choices=list(DTYPES), action="append", help="repeatable; 16-bit blocks run under autocast")
    tune.add_argument("--device")
    tune.add_argument("--channels-last", action="store_true")
    tune.add_argument("--backward", action="store_true", help="tune mish2's backward too")

    cache_cmd = sub.add_parser("cache", help="show or clear the tuning cache")
    cache_cmd.add_argument("action", choices=["show", "clear"])

    rep = sub.add_parser("report", help="turn pytest-benchmark JSON files into a markdown table and a PNG plot")
    rep.add_argument("json", nargs="+", help="one or more pytest-benchmark JSON files")
    rep.add_argument("--out", default="benchmarks/results", help="the folder for report.md and benchmark.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "dtype", None) is None and args.command == "tune":
        args.dtype = ["float32"]
    handler = {"info": cmd_info, "bench": cmd_bench, "tune": cmd_tune, "cache": cmd_cache, "report": cmd_report}
    try:
        check_environment()
        _setup_logging()
        return handler[args.command](args)
    except UsageError as exc:
        print(f"mishops {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except dispatch.NoBackendError as exc:  # what no backend or plan can run, in its first line
        print(f"mishops {args.command}: error: {str(exc).splitlines()[0].removeprefix('mishops: ')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mishops {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
