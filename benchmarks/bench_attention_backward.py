"""pytest-benchmark: attention_backward — registry winners and shipped seeds against the torch baselines, on the shapes the
registry serves on this device (see benchmarks/conftest.py). Run: pytest benchmarks/bench_attention_backward.py --benchmark-only"""

OP = "attention_backward"


def test_attention_backward(kt_bench):
    """Verified against the fp64 reference, then timed; one CSV row per contestant (conftest)."""
