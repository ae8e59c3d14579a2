"""Decode speed against the machine's bandwidth and against transformers (also installed as `coreinfer-benchmark`)."""

from coreinfer_jax.cli.launch import benchmark

if __name__ == "__main__":
  benchmark()
