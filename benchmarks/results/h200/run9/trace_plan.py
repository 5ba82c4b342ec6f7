"""Run 9: where hopper_conv's plan spends the time its kernel and pad pass do not (fp32 NCHW and
channels_last, reference shape): a torch.profiler trace of 5 calls after warm-up, kernels in order
with their GPU durations and the gaps between them."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
from mishops.plans import hopper_conv as hc  # noqa: E402

torch.backends.cudnn.allow_tf32 = True
x = torch.rand(64, 64, 256, 256, device="cuda")
w = torch.randn(128, 64, 3, 3, device="cuda") / 24
b = torch.randn(128, device="cuda") / 10
for fmt in (torch.contiguous_format, torch.channels_last):
    xs = x.contiguous(memory_format=fmt)
    call = lambda: hc.conv_mish(xs, w, b, (0, 0), (1, 1), 2, fmt, hc.CONFIGS[0])  # noqa: E731
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    print(f"== {fmt}: {len(events)} GPU events in 5 calls")
    prev_end = None
    for e in events[-len(events) // 5:]:  # the last call
        gap = "" if prev_end is None else f"gap {e.time_range.start - prev_end:8.1f} us"
        print(f"{e.time_range.elapsed_us():9.1f} us {gap:16s} {e.name[:90]}")
        prev_end = e.time_range.end
    first, last = events[0].time_range.start, events[-1].time_range.end
    print(f"5 calls: {(last - first) / 5:.1f} us a call, first kernel start to last kernel end")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
