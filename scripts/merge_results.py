"""Merges evaluate.py outputs into one JSON, table and plot (also installed as `coreinfer-merge-results`)."""

from coreinfer_jax.cli.launch import merge_results

if __name__ == "__main__":
  merge_results()
