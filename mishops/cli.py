"""``mishops`` / ``python -m mishops``: info, bench, tune, cache show|clear, report."""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from mishops import cache, dispatch, layout, plans, registry
from mishops.tuning import tune as mishops_tune

console = Console(width=None if sys.stdout.isatty() else 160)  # tables stay whole in logs

REFERENCE_SHAPE = (64, 128, 254, 254)  # the reference conv output: batch 64, 128 channels, 256-3+1
CPU_SHAPE = (4, 16, 64, 64)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 64x128x254x254, not {text!r}") from None


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    devices = [f"cuda:{i} {dispatch.device_label(torch.device('cuda', i))}" for i in range(torch.cuda.device_count())]
    console.print("devices: " + (", ".join(devices) if devices else f"no CUDA GPU; {dispatch.device_label(torch.device('cpu'))}"))
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
        formats = ",".join(sorted(plans._format_name(f) for f in plan.output_formats))
        plan_table.add_row(name, str(plan.priority), formats, "[green]yes[/green]" if ok else "[red]no[/red]", escape(ok.reason))
    console.print(plan_table)
    return 0


def _gbps(x: torch.Tensor, ms: float, passes: int = 2) -> float:
    return passes * x.nbytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")


def cmd_bench(args) -> int:
    device = _device(args.device)
    shape = args.shape or (REFERENCE_SHAPE if device.type == "cuda" else CPU_SHAPE)
    if args.shape is None and device.type != "cuda":
        console.print(f"[yellow]no CUDA GPU: using a small CPU shape {'x'.join(map(str, shape))} instead of the "
                      f"reference {'x'.join(map(str, REFERENCE_SHAPE))}[/yellow]")
    dtype = DTYPES[args.dtype]
    x = torch.randn(shape, device=device, dtype=dtype) * 3
    candidates, rejected = dispatch._candidates(x)
    budget = args.budget_ms / 1e3
    measurements: dict[str, dispatch.Measurement] = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("profiling", total=len(candidates) + 1)
        copy_ms, copy_spread, _ = dispatch._time(lambda: x.clone(), x, budget)
        progress.advance(task)
        for backend in candidates:
            progress.update(task, description=f"profiling {backend.name}")
            measurements.update(dispatch._profile("forward", [backend], x, budget))
            progress.advance(task)
    winner = dispatch.pick(measurements, {b.name: b.priority for b in candidates})
    table = Table(title=f"mish2 forward, {str(dtype).removeprefix('torch.')} {tuple(shape)} on "
                        f"{dispatch.device_label(device)}")
    for col in ("backend", "median ms", "spread ms", "GB/s", "% of copy", "chosen"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    table.add_row("copy (yardstick)", f"{copy_ms:.3f}", f"{copy_spread:.3f}", f"{_gbps(x, copy_ms):.0f}", "100", "")
    for name, m in sorted(measurements.items(), key=lambda kv: kv[1].median_ms):
        if m.ok:
            table.add_row(name, f"{m.median_ms:.3f}", f"{m.spread_ms:.3f}", f"{_gbps(x, m.median_ms):.0f}",
                          f"{100 * copy_ms / m.median_ms:.0f}", "[bold green]<-[/bold green]" if name == winner else "")
        else:
            table.add_row(name, "-", "-", "-", "-", f"[red]rejected: {escape(m.reason)}[/red]")
    for name, reasons in rejected.items():
        table.add_row(name, "-", "-", "-", "-", f"[dim]not run: {escape('; '.join(reasons))}[/dim]")
    console.print(table)
    if winner is None:
        console.print("[red]no backend produced a correct result[/red]")
        return 1
    if len(shape) == 4:
        from mishops.model import ModelNew

        model = ModelNew(args.in_channels, shape[1], 3, backend=winner).to(device=device, dtype=dtype)
        inp = torch.randn(shape[0], args.in_channels, shape[2] + 2, shape[3] + 2, device=device, dtype=dtype)
        with torch.no_grad():
            out = model(inp)
        console.print(f"ModelNew({args.in_channels}, {shape[1]}, 3, backend={winner!r}) on input "
                      f"{tuple(inp.shape)} -> output {tuple(out.shape)}, {layout.memory_format_name(out)}")
    return 0


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
    from mishops import dispatch, tuning

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

    return report.main([*args.json, "--out", args.out])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mishops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="device, versions, and every backend with why it is (un)available")

    bench = sub.add_parser("bench", help="profile every backend on one shape and print a table")
    bench.add_argument("--shape", type=_shape, help="default: the reference conv output on GPU, small on CPU")
    bench.add_argument("--dtype", choices=list(DTYPES), default="float32")
    bench.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    bench.add_argument("--in-channels", type=int, default=64, help="ModelNew input channels for the final run")
    bench.add_argument("--budget-ms", type=float, default=1000.0, help="timing budget per backend")

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

    rep = sub.add_parser("report", help="turn a pytest-benchmark JSON into a markdown table and a PNG plot")
    rep.add_argument("json", nargs="+", help="one or more pytest-benchmark JSON files")
    rep.add_argument("--out", default="benchmarks/results")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "dtype", None) is None and args.command == "tune":
        args.dtype = ["float32"]
    handler = {"info": cmd_info, "bench": cmd_bench, "tune": cmd_tune, "cache": cmd_cache, "report": cmd_report}
    return handler[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
