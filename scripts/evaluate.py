"""Quality under sparsity on real data: dense vs sparse methods, every task kind (also installed as `coreinfer-evaluate`)."""

from coreinfer_jax.cli.launch import evaluate

if __name__ == "__main__":
  evaluate()
