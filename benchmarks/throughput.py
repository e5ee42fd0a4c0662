"""Simulator throughput vs the compute bound, overheads and scaling: `python benchmarks/throughput.py --help`.

Same as `crossgrad bench`; results are recorded in benchmarks/RESULTS.md.
"""
from crossgrad.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
