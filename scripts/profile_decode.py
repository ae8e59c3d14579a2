"""Where a decode step's time goes, per kind of operation (also installed as `coreinfer-profile-decode`)."""

from coreinfer_jax.cli.launch import profile_decode

if __name__ == "__main__":
  profile_decode()
