"""Generates text, streaming it, and reports prefill time and decode speed (also installed as `coreinfer-generate`)."""

from coreinfer_jax.cli.launch import generate

if __name__ == "__main__":
  generate()
