"""The network experiment's compute_ms: one lenet5 (EvoNorm) gradient on a batch of 32 Fashion-MNIST-shaped
images, forward and backward, on one CPU thread of this machine.

    python experiments/net_compute_ms.py      # prints the parameter count and ms per gradient

Five repetitions of 100 gradients after 20 warm-up ones; the median is the figure the net_*.toml files
take (an agent's gradient alone, without the simulator's batching or the other agents' work).
"""
from __future__ import annotations

import statistics
import time

import torch

from crossgrad.models.registry import count_parameters, make_model


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = make_model("lenet5", (1, 28, 28), 10, "evonorm")
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    loss = torch.nn.CrossEntropyLoss()

    def gradient() -> None:
        model.zero_grad()
        loss(model(x), y).backward()

    for _ in range(20):
        gradient()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(100):
            gradient()
        times.append((time.perf_counter() - start) / 100 * 1e3)
    print(f"lenet5 evonorm, {count_parameters(model):,} parameters ({4 * count_parameters(model):,} B as float32)")
    print(f"ms per gradient, batch 32, 1 thread: median {statistics.median(times):.2f} "
          f"(min {min(times):.2f}, max {max(times):.2f}; {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
