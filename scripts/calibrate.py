"""Per-layer β calibrated on data, written as the β file `--beta_file` reads (also installed as `coreinfer-calibrate`)."""

from coreinfer_jax.cli.launch import calibrate

if __name__ == "__main__":
  calibrate()
