"""Measures the paper's findings on a model: a JSON of the numbers and a PNG each (also installed as `coreinfer-analyze`)."""

from coreinfer_jax.cli.launch import analyze

if __name__ == "__main__":
  analyze()
