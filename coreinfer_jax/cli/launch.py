"""The commands' entry points (`coreinfer-generate`, ..., and `scripts/*.py`).

This module imports nothing heavy: until the command's module (and with it JAX)
is imported, Ctrl-C ends the process with one line and exit status 130; then
`app.run` installs its own handler (which says what was saved).
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys

COMMANDS = ("analyze", "benchmark", "benchmark_scorer", "calibrate", "cluster", "evaluate",
            "generate", "importance", "merge_results", "profile_decode", "train_predictor")


def _interrupted_while_starting(signum, frame):
  del signum, frame
  os.write(sys.stderr.fileno(), b"\ninterrupted while starting: nothing was saved\n")
  os._exit(128 + signal.SIGINT)


def launch(name: str) -> None:
  """Imports `coreinfer_jax.commands.NAME` and runs it."""
  # transformers' "PyTorch was not found" advice, printed on import: we use
  # its tokenizers only (torch is needed by --compare_hf, which says so).
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:   # see app.handle_interrupt
    signal.signal(signal.SIGINT, _interrupted_while_starting)
  importlib.import_module(f"coreinfer_jax.commands.{name}").entry()


(analyze, benchmark, benchmark_scorer, calibrate, cluster, evaluate, generate, importance,
 merge_results, profile_decode, train_predictor) = (functools.partial(launch, name)
                                                    for name in COMMANDS)
