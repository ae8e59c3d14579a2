"""Continuation-scorer throughput: multiple-choice examples per second for many methods (also installed as `coreinfer-benchmark-scorer`)."""

from coreinfer_jax.cli.launch import benchmark_scorer

if __name__ == "__main__":
  benchmark_scorer()
