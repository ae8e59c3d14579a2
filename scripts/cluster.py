"""Builds similarity-guided core-neuron clusters offline over a dataset (also installed as `coreinfer-cluster`)."""

from coreinfer_jax.cli.launch import cluster

if __name__ == "__main__":
  cluster()
