"""Builds a model-global neuron importance from calibration text (also installed as
`coreinfer-importance`)."""

from coreinfer_jax.cli.launch import importance

if __name__ == "__main__":
  importance()
