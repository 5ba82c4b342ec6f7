"""Where a kernel's warps stall, from the SASS source page ncu exports (``profile_hopper_conv.sh``).

Prints the stall reasons over all samples, the instructions with the most samples, and bands of
the SASS (by address) with their share of samples, executed instructions, opcode mix and top stall
reasons: the bands tell the main loop, the epilogue's math, its stores and the producer apart.

    python benchmarks/ncu_stalls.py NAME-sass.csv.gz [--top 8] [--band 0x2000]
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv_gz")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--band", type=lambda v: int(v, 16), default=0x2000)
    args = ap.parse_args()
    rows = list(csv.reader(gzip.open(args.csv_gz, "rt")))
    header, data = rows[1], rows[2:]
    col = {h: i for i, h in enumerate(header)}
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    samples = lambda r: int(r[col["Warp Stall Sampling (All Samples)"]] or 0)  # noqa: E731
    total = sum(samples(r) for r in data)
    reasons = collections.Counter()
    for r in data:
        reasons.update({h[6:]: int(r[col[h]] or 0) for h in stalls})
    print(f"{args.csv_gz}: {total} samples")
    for name, n in reasons.most_common(8):
        print(f"  {name:20s} {100 * n / total:5.1f}%")
    print("instructions with the most samples:")
    for r in sorted(data, key=samples, reverse=True)[:args.top]:
        top = ", ".join(f"{h[6:]}={r[col[h]]}" for h in sorted(stalls, key=lambda h: -int(r[col[h]] or 0))[:2])
        print(f"  {100 * samples(r) / total:5.1f}%  executed {int(r[col['Instructions Executed']] or 0):>9d}  "
              f"{r[1].strip()[:56]:56s} {top}")
    base = int(data[0][0], 16)
    bands: dict[int, dict] = {}
    for r in data:
        b = bands.setdefault((int(r[0], 16) - base) // args.band,
                             dict(s=0, ex=0, ops=collections.Counter(), st=collections.Counter()))
        b["s"] += samples(r)
        b["ex"] += int(r[col["Instructions Executed"]] or 0)
        words = r[1].split()
        b["ops"][(words[1] if words[0].startswith("@") else words[0]).split(".")[0]] += 1
        b["st"].update({h[6:]: int(r[col[h]] or 0) for h in stalls})
    print(f"bands of {args.band:#x} bytes with at least 0.5% of the samples:")
    for k, b in sorted(bands.items()):
        if b["s"] >= 0.005 * total:
            ops = " ".join(f"{o}:{n}" for o, n in b["ops"].most_common(5))
            st = " ".join(f"{o}={100 * n / max(b['s'], 1):.0f}%" for o, n in b["st"].most_common(3))
            print(f"  {k * args.band:6x} {100 * b['s'] / total:5.1f}%  executed {b['ex'] / 1e6:6.1f}M | {ops} | {st}")


if __name__ == "__main__":
    main()
