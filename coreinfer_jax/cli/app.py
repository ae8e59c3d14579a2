"""Running a script: the named-config overlay, one-line user errors, JSON output.

`run(main)` is every script's entry point. It defines `--config` (a file
NAME.json in `--configs_dir`) and, once absl has parsed the command line,
sets every flag the named config names to the config's value unless the flag
was given on the command line; keys naming no flag of the script are left to
the scripts that have them. A user error (bad input) prints one line and
exits with status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Dict, Optional

from absl import app, flags
from absl import logging as absl_logging

from coreinfer_jax import files
from coreinfer_jax.checkpoint import CheckpointError, ModelCacheError, UnsupportedConfigError

FLAGS = flags.FLAGS

# Errors a user can cause with bad input: reported in one line, exit status 2.
# (artefacts.ClusterMismatchError is a ValueError, checkpoint.ModelNotInstalledError a
# FileNotFoundError.)
USER_ERRORS = (ValueError, FileNotFoundError, UnsupportedConfigError, CheckpointError,
               ModelCacheError)

# The checkout's configs/ folder (scripts run from a checkout or editable install).
REPO_CONFIGS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def load_named_config(configs_dir: str, name: str) -> Dict[str, Any]:
  path = os.path.join(configs_dir, f"{name}.json")
  if not os.path.isfile(path):
    available = sorted(f[:-5] for f in os.listdir(configs_dir) if f.endswith(".json"))
    raise FileNotFoundError(f"no config named {name!r} in {configs_dir} (available: {available})")
  with open(path) as fh:
    return json.load(fh)


def apply_named_config() -> None:
  """Sets each flag named by `--config` that the command line did not set."""
  for name, value in load_named_config(FLAGS.configs_dir, FLAGS.config).items():
    if name not in FLAGS or FLAGS[name].present:
      continue
    if isinstance(value, list):
      value = ",".join(str(v) for v in value)
    FLAGS[name].value = None if value is None else FLAGS[name].parser.parse(value)


def settings(names) -> Dict[str, Any]:
  """Flag values by name (after the named config's overlay)."""
  return {name: FLAGS[name].value for name in names}


def write_json(path: Optional[str], payload: Any) -> None:
  """Writes `payload` to `path` atomically, creating its folder (no path: nothing)."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files.write_json(path, payload)


def run(main) -> None:
  """absl's `app.run(main)` with the named-config overlay and one-line errors."""
  if "config" not in FLAGS:
    flags.DEFINE_string("config", "default", "named config: a file NAME.json in --configs_dir "
                        "whose keys set flags not given on the command line")
    flags.DEFINE_string("configs_dir", REPO_CONFIGS_DIR, "folder of named configs")

  def wrapped(argv):
    # JAX logs at INFO that TPU/GPU backends are absent; not news on a CPU run.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    if not FLAGS["verbosity"].present:   # orbax logs every save at INFO
      absl_logging.set_verbosity(absl_logging.WARNING)
    try:
      apply_named_config()
      return main(argv)
    except USER_ERRORS as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  app.run(wrapped)
