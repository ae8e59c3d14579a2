"""Trains the learned-predictor baseline (Deja Vu), one low-rank predictor per
sparsified layer (also installed as `coreinfer-train-predictor`)."""

from coreinfer_jax.cli.launch import train_predictor

if __name__ == "__main__":
  train_predictor()
