"""Does a row of a BLAS product depend only on its own numbers? The check behind crossgrad.mixing.

    python benchmarks/row_kernels.py [--threads 1]

For random sparse matrices G [n, n] (n = 2 .. 64) and pools x [n, P], each block of rows of G times x (its
nonzero columns only, as a process holding those agents computes it) is compared with the same rows of the
full product G x (what the simulator computes), bit for bit, in the shapes crossgrad uses and in the ones
it avoids. Prints the number of differing blocks of each kind: the used ones must be 0 on a machine where
float32 runs are to be identical across layouts (tests/test_layouts.py checks the runs themselves).
"""
from __future__ import annotations

import argparse
import random
import warnings

import torch


def dense_blocks(sizes, widths, base: bool):
    """(used, avoided) mismatch counts of the dense product, mm or addmm, over every block of rows."""
    used = avoided = total = 0
    for n in sizes:
        for P in widths:
            G = torch.rand(n, n) * (torch.rand(n, n) < random.choice([0.2, 0.5, 1.0])) + 0.3 * torch.eye(n)
            x, b = torch.randn(n, P), torch.randn(n, P)
            full = torch.addmm(b, G, x) if base else torch.mm(G, x)
            for start in range(n):
                for m in sorted({1, 2, 3, n - start} - {0}):
                    if start + m > n:
                        continue
                    rows = G[start : start + m]
                    cols = sorted(set(rows.nonzero()[:, 1].tolist()))
                    A, bb = rows[:, cols], b[start : start + m]
                    total += 1
                    if m == 1:  # crossgrad pads a single row with a zero row
                        raw = torch.addmm(bb, A, x[cols]) if base else torch.mm(A, x[cols])
                        avoided += not torch.equal(raw, full[start : start + m])
                        A, bb = torch.cat([A, torch.zeros_like(A)]), torch.cat([bb, torch.zeros_like(bb)])
                    part = (torch.addmm(bb, A, x[cols]) if base else torch.mm(A, x[cols]))[:m]
                    differs = not torch.equal(part, full[start : start + m])
                    if P == 1:
                        avoided += differs
                    else:
                        used += differs
    return used, avoided, total


def sparse_blocks(widths):
    """Mismatch count of the CSR product (beta 0 and 1) over blocks of rows of graphs beyond 64 agents."""
    bad = total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for n in (80, 150):
            for P in widths:
                G = torch.rand(n, n)
                G[G < 0.95] = 0
                G += torch.eye(n)
                x, b = torch.randn(n, P), torch.randn(n, P)
                csr = G.to_sparse_csr()
                full0 = torch.addmm(torch.empty(n, P), csr, x, beta=0)
                full1 = torch.addmm(b, csr, x)
                for start, stop in ((0, 1), (3, 9), (n - 2, n), (0, n // 2)):
                    rows = G[start:stop]
                    cols = sorted(set(rows.nonzero()[:, 1].tolist()))
                    sub = rows[:, cols].to_sparse_csr()
                    p0 = torch.addmm(torch.empty(stop - start, P), sub, x[cols], beta=0)
                    p1 = torch.addmm(b[start:stop], sub, x[cols])
                    bad += (not torch.equal(p0, full0[start:stop])) + (not torch.equal(p1, full1[start:stop]))
                    total += 2
    return bad, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    random.seed(0)
    torch.manual_seed(0)
    sizes, widths = (2, 3, 5, 6, 7, 8, 16, 17, 33, 64), (1, 2, 7, 38, 115, 131, 1000, 4099, 61706)
    used, avoided, total = dense_blocks(sizes, widths, base=False)
    print(f"dense mm, {total} blocks: {used} differ in the shapes used (P >= 2, one row padded), "
          f"{avoided} in the shapes avoided (P = 1, or one row unpadded)")
    used, avoided, total = dense_blocks(sizes, (2, 7, 115, 4099, 61706), base=True)
    print(f"dense addmm (a base added inside the product: avoided), {total} blocks: {used} differ with one row "
          f"padded, {avoided} with one row unpadded")
    bad, total = sparse_blocks((1, 2, 115, 4099))
    print(f"sparse CSR, {total} blocks: {bad} differ")


if __name__ == "__main__":
    main()
