"""``mishops.fuse`` on a timm model built with Mish activations: speed against the unfused model.

    python benchmarks/bench_fuse_timm.py --out benchmarks/results/h200/fuse-timm.md     # on a GPU
    python benchmarks/bench_fuse_timm.py --device cpu --small                            # a quick check
    python benchmarks/bench_fuse_timm.py --no-compile                                    # eager rows only

The model is timm's ``cspdarknet53`` with ``act_layer="mish"`` (every conv is a ConvNormAct whose
BatchNormAct2d applies a Mish), in eval mode with random weights and randomised BatchNorm
statistics. For each case (fp32 with TF32 convs, bf16 autocast; eager and ``torch.compile``) the
unfused and the fused model are timed on the same input, and the fused output is compared with the
unfused one. timm is not a mishops dependency: without it this script says so and exits 0.

Timing: ``mishops.tuning.time_interleaved`` (the project's one timer, the two models' calls alternating;
median, L2 flushed before each call). The table is
printed and, with ``--out``, written as markdown with the device, versions, commit and date.
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import mishops
from mishops import tuning


#: calls of each model, alternating: a model of many small layers is host-bound, and the host's speed
#: drifts (two runs a minute apart timed the same unfused model at 16.0 and 7.1 ms); alternating the
#: two models' calls exposes both to the same drift, so their ratio holds where their times do not.
TIMED_CALLS = 50


def _randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None:
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def block_choices() -> list[str]:
    """The tuner's choice for each of the fused model's block keys (blocks of the same shapes share
    one), with its median and the eager plan's, as the tuner measured them: each block alone, from
    an idle GPU. Beside the model's time it says whether the choices or their timing misled."""
    def ms(m) -> str:
        return f"{m.median_ms:.3f} ms" if m is not None and m.ok else "untimed"

    chosen = [c for c in tuning.TUNER.memory.values() if c.op == "block"]
    winners = collections.Counter(c.winner for c in chosen).most_common()
    head = f"{len(chosen)} block keys: " + (", ".join(f"{name} {n}" for name, n in winners) or "none tuned")
    return [head, *(f"  - `{c.key}`: {c.winner} ({c.how}) {ms(c.measurements.get(c.winner))}, "
                    f"eager {ms(c.measurements.get('eager'))}" for c in chosen)]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mishops.fuse on a timm model with Mish: fused vs unfused")
    parser.add_argument("--model", default="cspdarknet53",
                        help="a timm model that takes act_layer (default cspdarknet53)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default 32 on a GPU, 1 with --small")
    parser.add_argument("--size", type=int, default=None, help="input height and width (default 256, 64 with --small)")
    parser.add_argument("--small", action="store_true",
                        help="a tiny input, fp32, eager only (add --compile for the compiled rows): "
                             "a quick check on CPU")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="the torch.compile rows (default: on, off with --small)")
    parser.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)

    try:
        import timm
    except ImportError:
        print("bench_fuse_timm: skipped: timm is not installed (pip install timm); it is not a mishops dependency")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_fuse_timm: error: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    batch = args.batch or (1 if args.small else 32)
    size = args.size or (64 if args.small else 256)
    settings = ["fp32"] if args.small or device.type == "cpu" else ["fp32", "bf16-autocast"]
    compile_rows = (not args.small) if args.compile is None else args.compile
    modes = ["eager"] + (["torch.compile"] if compile_rows else [])
    torch.backends.cudnn.allow_tf32 = True
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    torch.manual_seed(0)
    unfused = timm.create_model(args.model, pretrained=False, act_layer="mish").eval()
    _randomize_batchnorm(unfused)
    fused, report = mishops.fuse(copy.deepcopy(unfused), report=True)
    unfused = unfused.to(device, memory_format=memory_format)
    fused = fused.to(device, memory_format=memory_format)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)

    rows, tuned = [], []
    for setting in settings:
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if setting == "bf16-autocast" else None
        for mode in modes:
            models = {"unfused": unfused, "fused": fused}
            if mode == "torch.compile":
                torch._dynamo.reset()
                models = {k: torch.compile(m) for k, m in models.items()}
            outs, first, runs = {}, {}, {}
            for name, model in models.items():
                def run(model=model):
                    with torch.no_grad(), (amp if amp is not None else torch.autocast(device.type, enabled=False)):
                        return model(x)

                if name == "fused" and mode == "eager":
                    tuning.TUNER.forget()  # so that memory holds this setting's block choices only
                started = time.perf_counter()
                outs[name] = run()  # compiles, tunes: the first call
                first[name] = time.perf_counter() - started
                runs[name] = run
                if name == "fused" and mode == "eager":
                    tuned.append((setting, block_choices()))
            timed = tuning.time_interleaved(runs, device, TIMED_CALLS)
            ref, got = outs["unfused"].float(), outs["fused"].float()
            err = float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-30)
            u_ms, f_ms = timed["unfused"].median_ms, timed["fused"].median_ms
            rows.append((setting, mode, u_ms, f_ms, u_ms / f_ms, err, first["unfused"], first["fused"]))
            print(f"{setting:14s} {mode:14s} unfused {u_ms:9.3f} ms  fused {f_ms:9.3f} ms  x{u_ms / f_ms:5.2f}  "
                  f"rel. error {err:.2e}", flush=True)

    lines = [
        f"# mishops.fuse on timm {args.model} (act_layer=mish), inference",
        "",
        f"- **Device:** {_device_name(device)} ({device.type})",
        f"- **Software:** torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version() if device.type == 'cuda' else 'n/a'}), timm {timm.__version__}, "
        f"mishops {mishops.__version__}, Python {platform.python_version()}",
        f"- **Run:** {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, commit {_commit()}",
        f"- **Input:** {batch}x3x{size}x{size}, {'channels_last' if args.channels_last else 'NCHW'}; eval mode, "
        "random weights, randomised BatchNorm statistics; TF32 convs on",
        f"- **Fused:** {len(report.fused)} blocks ({sum(f.mish_count == 2 for f in report.fused)} with two Mish), "
        f"{len(report.left_alone)} left alone, {len(report.walked)} module(s) walked instead of traced",
        f"- **Timing:** mishops.tuning.time_interleaved, {TIMED_CALLS} calls of each model alternating (median, "
        "L2 flushed before each); first call (compile, tuning) listed apart",
        "",
        "| setting | mode | unfused ms | fused ms | speed-up | max error / max abs output "
        "| first call s (unfused / fused) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for setting, mode, u_ms, f_ms, speedup, err, u_first, f_first in rows:
        lines.append(f"| {setting} | {mode} | {u_ms:.3f} | {f_ms:.3f} | {speedup:.2f}x | {err:.2e} | "
                     f"{u_first:.1f} / {f_first:.1f} |")
    lines += ["", "The tuner's block choices (eager mode), each block key timed alone:", ""]
    for setting, choices in tuned:
        lines += [f"- {setting}: {choices[0]}", *choices[1:]]
    lines += ["", "Fuse report:", "", "```", str(report), "```", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
