"""Per-operation cost of the scaled-sign codec with error feedback on a parameter-heavy model.

    python benchmarks/codec_ops.py [--edges 32] [--model cnn5-1m:3x8x8] [--threads 1]

Times each piece of a compressed round on [edges, P] float32 rows (best of 7), next to a plain copy
of the block, the unit every pass over it costs.
"""
from __future__ import annotations

import argparse
import time

import torch

from crossgrad.bench import bench_model
from crossgrad.codecs import ErrorFeedback, ScaledSign
from crossgrad.flat import ParamLayout


def best_ms(f, k: int = 7) -> float:
    times = []
    for _ in range(k):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edges", type=int, default=32)
    ap.add_argument("--model", default="cnn5-1m:3x8x8")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    name, shape = a.model.split(":")
    layout = ParamLayout.of(bench_model(name, tuple(int(v) for v in shape.split("x"))))
    rows = torch.randn(a.edges, layout.size, generator=torch.Generator().manual_seed(0))
    out = torch.empty_like(rows)
    codec = ScaledSign(layout)
    feedback = ErrorFeedback(codec)
    feedback.init(rows.shape, rows.dtype, rows.device)
    payload = codec.encode(rows)
    back = torch.randperm(a.edges)
    print(f"{name}: P = {layout.size:,}, {layout.num_tensors} tensors, rows [{a.edges}, P] float32, "
          f"{a.threads} thread(s)")
    for label, f in [
        ("copy of the block", lambda: out.copy_(rows)),
        ("scales, temporary per tensor", lambda: codec._scales(rows)),
        ("scales, in a scratch block", lambda: codec._scales(rows, out)),
        ("sign packing", lambda: codec._pack(rows)),
        ("decode (unpack + signs)", lambda: codec.decode(payload, rows.dtype, out=out)),
        ("in-process delivery (gather)", lambda: torch.index_select(rows, 0, back, out=out)),
        ("ErrorFeedback.encode", lambda: feedback.encode(rows, out=out)),
    ]:
        print(f"  {label:32s} {best_ms(f):8.1f} ms")


if __name__ == "__main__":
    main()
