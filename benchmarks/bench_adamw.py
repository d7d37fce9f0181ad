"""pytest-benchmark: adamw — registry winners and shipped seeds against the torch baselines, on the shapes the
registry serves on this device (see benchmarks/conftest.py). Run: pytest benchmarks/bench_adamw.py --benchmark-only"""

OP = "adamw"


def test_adamw(kt_bench):
    """Verified against the fp64 reference, then timed; one CSV row per contestant (conftest)."""
