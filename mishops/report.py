"""``mishops report``: the benchmarks' pytest-benchmark JSON as a markdown report and a plot.

``python -m mishops report out.json [more.json ...] --out DIR`` writes ``DIR/report.md`` and
``DIR/benchmark.png``. Several JSON files (e.g. one per benchmark module) are merged. Everything
printed comes from the JSON: the rows' ``extra_info`` (written by ``benchmarks/``) and the
``machine_info["mishops"]`` block (device, versions, date, backend availability), so a report can
be rebuilt anywhere, later, from the file alone. The plot needs matplotlib; without it only the
markdown is written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

DTYPE_ORDER = ("fp32", "bf16", "fp16")
#: the yardsticks sort first in their tables and are drawn as a reference line, not a backend.
YARDSTICKS = ("copy", "reference")
PNG_NAME = "benchmark.png"
MARKDOWN_NAME = "report.md"


@dataclass
class Run:
    env: dict = field(default_factory=dict)
    commit: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    def of(self, op: str) -> list[dict]:
        return [r for r in self.rows if r.get("op") == op]


def load(paths: list[Path]) -> Run:
    """All rows of all files; the environment and commit of the first file that has them."""
    run = Run()
    for path in paths:
        data = json.loads(Path(path).read_text())
        run.env = run.env or data.get("machine_info", {}).get("mishops", {})
        run.commit = run.commit or data.get("commit_info", {})
        for bench in data.get("benchmarks", []):
            info = dict(bench.get("extra_info") or {})
            if "op" not in info:
                continue
            info["name"] = bench.get("name", "")
            stats = bench.get("stats") or {}
            info["isolated_ms"] = stats["median"] * 1e3 if "median" in stats else None
            run.rows.append(info)
    return run


# --- formatting --------------------------------------------------------------------------------


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None:
        return missing
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return format(value, spec)


def size_label(row: dict) -> str:
    """``1e5`` for powers of ten; the exact count (and the shape, when it has one) otherwise."""
    numel = int(row.get("numel", 0))
    exponent = len(str(numel)) - 1
    if numel == 10**exponent:
        return f"1e{exponent}"
    shape = row.get("shape") or []
    return f"{numel:,}" + (f" ({'x'.join(map(str, shape))})" if len(shape) > 1 else "")


def _impl_order(rows: list[dict]) -> dict[str, int]:
    """Yardsticks first, then "auto", then the backends in the order the benchmarks ran them."""
    order: dict[str, int] = {name: i for i, name in enumerate(YARDSTICKS + ("reference-compiled", "auto"))}
    for row in rows:
        order.setdefault(row["impl"], len(order))
    return order


def _dtypes(rows: list[dict]) -> list[str]:
    present = {r.get("dtype") for r in rows}
    return [d for d in DTYPE_ORDER if d in present] + sorted(d for d in present - set(DTYPE_ORDER) if d)


def header_lines(run: Run) -> list[str]:
    env = run.env
    if env.get("gpu"):
        device = (f"{env['gpu']} (compute capability {env.get('compute_capability', '?')}, "
                  f"{env.get('gpu_memory_gib', '?')} GiB, L2 {env.get('l2_cache_mib', '?')} MiB, "
                  f"driver {env.get('driver') or 'unknown'})")
    else:
        device = f"CPU {env.get('cpu', 'unknown')} ({env.get('cpu_threads', '?')} threads), no GPU"
    software = (f"torch {env.get('torch', '?')} "
                f"(CUDA {env.get('cuda') or 'none'}, cuDNN {env.get('cudnn') or 'none'}), "
                f"triton {env.get('triton') or 'absent'}, cupy {env.get('cupy') or 'absent'}, "
                f"mishops {env.get('mishops', '?')}, Python {env.get('python', '?')}")
    commit = run.commit.get("id")
    dirty = " (uncommitted changes)" if run.commit.get("dirty") else ""
    revision = f"commit {commit[:10]}{dirty}" if commit else "no git commit"
    reps = "-".join(map(str, env.get("reps") or [])) or "the"
    if env.get("timing") == "cuda-events":
        timing = (f"CUDA events: median of {reps} back-to-back calls after untimed warm-up (builds, autotuning and "
                  "the dispatcher's profiling happen there), L2 flushed before each call when the data would fit in "
                  "it. \"isolated call ms\" is pytest-benchmark's wall-clock median of one call plus "
                  "`torch.cuda.synchronize()`: launch overhead included.")
    else:
        timing = f"`time.perf_counter`: median of {reps} calls after warm-up (CPU: no events, no cache flush)."
    lines = [f"- **Device:** {device}", f"- **Software:** {software}",
             f"- **Run:** {env.get('date', 'unknown date')}, {revision}",
             f"- **Timing:** {timing}",
             f"- **Settings:** cudnn.benchmark={env.get('cudnn_benchmark')}, "
             f"TF32 convolutions={env.get('cudnn_allow_tf32')}, TF32 matmul={env.get('matmul_allow_tf32')}; "
             "GB/s is effective bandwidth: the bytes the op must read plus those it must write, over the median "
             "time (intermediates a backend writes, like eager's, are not counted); errors are max |y - y_float64| "
             "over the first "
             f"{_fmt(env.get('error_elements'), ',', '?')} elements of each output (models: the first "
             f"{env.get('model_error_images', '?')} images of the batch)."]
    if env.get("quick_mode"):
        lines.append("- **Quick mode** (CPU, small sizes): checks that the pipeline works; these numbers say "
                     "nothing about GPU speed.")
    return lines


def backend_table(run: Run) -> list[str]:
    backends = run.env.get("backends") or {}
    if not backends:
        return []
    lines = ["| backend | available | why not |", "|---|---|---|"]
    for name, state in backends.items():
        lines.append(f"| {name} | {'yes' if state.get('available') else 'no'} | {state.get('reason') or ''} |")
    return lines


def elementwise_tables(run: Run, op: str) -> list[str]:
    rows = run.of(op)
    if not rows:
        return []
    order = _impl_order(rows)
    title = "forward" if op == "forward" else "backward (reads x and grad_out, writes grad_in)"
    yardstick = "`x.clone()`" if op == "forward" else "`x + g` (2 reads, 1 write)"
    lines = []
    for dtype in _dtypes(rows):
        lines += [f"### Double Mish {title}, {dtype}", "",
                  f"Copy yardstick: {yardstick} of the same tensors, measured in the same run.", "",
                  "| backend | elements | median ms | GB/s | % of copy | max abs error | isolated call ms |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in sorted((r for r in rows if r.get("dtype") == dtype), key=lambda r: (r["numel"], order[r["impl"]])):
            impl = f"auto → {r['chosen']}" if r["impl"] == "auto" and r.get("chosen") else r["impl"]
            lines.append(f"| {impl} | {size_label(r)} | {_fmt(r.get('median_ms'), '.4g')} "
                         f"| {_fmt(r.get('gbps'), ',.0f')} | {_fmt(r.get('pct_of_copy'), '.1f')} "
                         f"| {_fmt(r.get('max_abs_err'), '.2e')} | {_fmt(r.get('isolated_ms'), '.4g')} |")
        lines.append("")
    return lines


def model_label(row: dict) -> str:
    impl = row["impl"]
    if impl == "reference":
        return "Model (eager reference)"
    if impl == "reference-compiled":
        return "torch.compile(Model)"
    return f"ModelNew({impl})" + (f" → {row['chosen']}" if impl == "auto" and row.get("chosen") else "")


def model_table(run: Run) -> list[str]:
    rows = run.of("model")
    if not rows:
        return []
    order = _impl_order(rows)
    first = rows[0]
    shape = (f"input {'x'.join(map(str, first.get('input_shape', [])))}, "
             f"output {'x'.join(map(str, first.get('output_shape', [])))}")
    lines = [f"### Conv2d → Mish → Mish ({shape}, inference)", "",
             "Speed-up is over the eager reference Model in the same precision mode.", "",
             "| mode | model | median ms | speed-up | max abs error | first call s |",
             "|---|---|---:|---:|---:|---:|"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    for r in sorted(rows, key=lambda r: (modes.index(r["mode"]), order[r["impl"]])):
        lines.append(f"| {r['mode']} | {model_label(r)} | {_fmt(r.get('median_ms'), '.4g')} "
                     f"| {_fmt(r.get('speedup'), '.2f')}x | {_fmt(r.get('max_abs_err'), '.2e')} "
                     f"| {_fmt(r.get('first_call_s'), '.2f')} |")
    return lines + [""]


def overhead_table(run: Run) -> list[str]:
    rows = run.of("overhead")
    if not rows:
        return []
    lines = ["### Dispatcher overhead (cached choice, tiny tensor, host time per call)", "",
             "| device | chosen backend | `mish2(x)` µs | backend `forward(x)` µs | overhead µs |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r.get('chosen', '-')} | {_fmt(r.get('mish2_us'), '.2f')} "
                     f"| {_fmt(r.get('direct_us'), '.2f')} | {_fmt(r.get('overhead_us'), '.2f')} |")
    return lines + [""]


def markdown(run: Run, png_name: str | None) -> str:
    lines = ["# mishops benchmarks", "", *header_lines(run), ""]
    if png_name:
        lines += [f"![GB/s per backend and model times]({png_name})", ""]
    for section in (backend_table(run), elementwise_tables(run, "forward"), elementwise_tables(run, "backward"),
                    model_table(run), overhead_table(run)):
        if section:
            lines += [*section, ""]
    return "\n".join(lines).rstrip() + "\n"


# --- plot --------------------------------------------------------------------------------------


def footer(run: Run) -> str:
    env = run.env
    device = env.get("gpu") or f"CPU {env.get('cpu', '')}".strip()
    parts = [device, f"torch {env.get('torch', '?')}"]
    parts += [f"{label} {env[key]}" for key, label in (("driver", "driver"), ("cuda", "CUDA"), ("triton", "triton"),
                                                       ("cupy", "cupy")) if env.get(key)]
    parts += [env.get("date") or "unknown date"] + (["QUICK MODE (CPU)"] if env.get("quick_mode") else [])
    return " | ".join(parts)


def plot(run: Run, path: Path) -> bool:
    """GB/s against size per backend with the copy line (a panel per op and dtype), then model bars.

    Uses matplotlib's object API with the Agg canvas, so the caller's pyplot backend is untouched.
    Returns False, writing nothing, when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    ops = [op for op in ("forward", "backward") if run.of(op)]
    dtypes = _dtypes([r for op in ops for r in run.of(op)])
    models = run.of("model")
    ncols = max(len(dtypes), 1)
    nrows = len(ops) + (1 if models else 0)
    if nrows == 0:
        return False
    fig = Figure(figsize=(5.2 * ncols, 3.8 * nrows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(nrows, ncols)
    for i, op in enumerate(ops):
        order = _impl_order(run.of(op))
        for j, dtype in enumerate(dtypes):
            ax = fig.add_subplot(grid[i, j])
            rows = [r for r in run.of(op) if r.get("dtype") == dtype and r.get("gbps")]
            for impl in sorted({r["impl"] for r in rows}, key=order.get):
                series = sorted((r["numel"], r["gbps"]) for r in rows if r["impl"] == impl)
                style = {"color": "black", "linestyle": "--", "label": "copy (same run)"} if impl == "copy" \
                    else {"marker": "o", "label": impl}
                ax.plot([n for n, _ in series], [g for _, g in series], **style)
            ax.set_xscale("log")
            ax.set_title(f"double Mish {op}, {dtype}")
            ax.set_xlabel("elements")
            ax.set_ylabel("GB/s (read + written)")
            ax.grid(True, which="both", alpha=0.3)
            if rows:
                ax.legend(fontsize="small")
    if models:
        ax = fig.add_subplot(grid[nrows - 1, :])
        order = _impl_order(models)
        modes = list(dict.fromkeys(r["mode"] for r in models))
        ordered = sorted(models, key=lambda r: (modes.index(r["mode"]), order[r["impl"]]))
        labels = [f"{r['mode']}: {model_label(r)}" for r in ordered]
        times = [r["median_ms"] for r in ordered]
        bars = ax.barh(range(len(ordered)), times,
                       color=["gray" if r["impl"].startswith("reference") else "tab:blue" for r in ordered])
        speedups = [r.get("speedup", float("nan")) for r in ordered]
        ax.bar_label(bars, labels=[f"{t:.3g} ms ({s:.2f}x)" for t, s in zip(times, speedups)], padding=3,
                     fontsize="small")
        ax.set_yticks(range(len(ordered)), labels, fontsize="small")
        ax.invert_yaxis()
        ax.set_xlabel("ms per forward (lower is better); speed-up over the eager reference of the same mode")
        ax.set_title("Conv2d → Mish → Mish")
        ax.set_xlim(0, max(times) * 1.35)
    fig.suptitle(f"mishops benchmarks\n{footer(run)}", fontsize="medium")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


# --- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mishops report",
        description="Turn the JSON of `pytest benchmarks/ --benchmark-json=FILE` into report.md and benchmark.png.")
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON file(s); several are merged")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    args = parser.parse_args(argv)

    missing = [str(p) for p in args.json if not p.is_file()]
    if missing:
        print(f"mishops report: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    run = load(args.json)
    if not run.rows:
        print(f"mishops report: no mishops benchmark rows in {', '.join(map(str, args.json))} "
              "(was it written by `pytest benchmarks/ --benchmark-json=...`?)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / PNG_NAME
    plotted = plot(run, png)
    md = args.out / MARKDOWN_NAME
    md.write_text(markdown(run, PNG_NAME if plotted else None), encoding="utf-8")
    print(f"wrote {md}" + (f" and {png}" if plotted else " (install matplotlib for the plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
