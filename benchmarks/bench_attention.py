"""pytest-benchmark: attention — registry winners and shipped seeds against the torch baselines, on the shapes the
registry serves on this device (see benchmarks/conftest.py). Run: pytest benchmarks/bench_attention.py --benchmark-only"""

OP = "attention"


def test_attention(kt_bench):
    """Verified against the fp64 reference, then timed; one CSV row per contestant (conftest)."""
