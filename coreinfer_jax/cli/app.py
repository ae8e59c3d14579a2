"""Running a command: flags, help, the named-config overlay, early checks, clean failures.

`run(main, ...)` is every command's entry point (`coreinfer-generate` and
`python scripts/generate.py` alike). In order, before `main` does any work:

- `--help` (`-h`, `--helpshort`) prints the command's docstring and its own
  flags with their meaning and exits 0; `--helpfull` adds absl's; a flag
  parsing error prints absl's one line (with its "Did you mean" suggestion)
  and exits 2;
- `--config` (a file NAME.json in `--configs_dir`) sets every flag it names
  that the command line did not set;
- every output path the command writes is checked (`outputs.check_*`) and
  every optional dependency its flags ask for is found (`optional.require`).

Then `main` runs. A user error (bad input) prints one line and exits 2;
Ctrl-C prints one line saying what was saved and how to resume, and exits 130
without a traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import app, flags
from absl import logging as absl_logging

from coreinfer_jax import files
from coreinfer_jax.checkpoint import CheckpointError, ModelCacheError, UnsupportedConfigError
from coreinfer_jax.cli import help as cli_help
from coreinfer_jax.cli import optional, outputs

FLAGS = flags.FLAGS

# Errors a user can cause with bad input: reported in one line, exit status 2.
# (artefacts.ClusterMismatchError and files.InputFileError are ValueErrors,
# checkpoint.ModelNotInstalledError a FileNotFoundError.)
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError,
               UnsupportedConfigError, CheckpointError, ModelCacheError,
               optional.MissingDependencyError)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + 2   # what a shell reports for SIGINT

# The checkout's configs/ folder (commands run from a checkout or editable install).
REPO_CONFIGS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")

# Paths this process has written, for the line printed on Ctrl-C.
_SAVED: List[str] = []


def load_named_config(configs_dir: str, name: str) -> Dict[str, Any]:
  path = os.path.join(configs_dir, f"{name}.json")
  if not os.path.isfile(path):
    available = sorted(f[:-5] for f in os.listdir(configs_dir) if f.endswith(".json"))
    raise FileNotFoundError(f"no config named {name!r} in {configs_dir} (available: {available})")
  return files.read_json(path)


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
  saved(path)


def saved(path: str) -> None:
  """Notes that `path` (a file, or a folder of finished pieces) holds finished
  work: named on Ctrl-C if it exists then and is not an empty folder."""
  if path not in _SAVED:
    _SAVED.append(path)


def _holds_work(path: str) -> bool:
  return os.path.isfile(path) or (os.path.isdir(path) and bool(os.listdir(path)))


def _parse_flags(command_module: str) -> Callable[[List[str]], List[str]]:
  def parse(argv: List[str]) -> List[str]:
    given = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if any(a in ("--help", "-h", "-?", "--helpshort") for a in given):
      print(cli_help.command_help(command_module, full=False))
      sys.exit(0)
    if "--helpfull" in given:
      print(cli_help.command_help(command_module, full=True))
      sys.exit(0)
    try:
      return FLAGS(argv)
    except flags.Error as e:
      message = " ".join(str(e).split())
      print(f"error: {message} (--help lists this command's flags)", file=sys.stderr)
      sys.exit(EXIT_USAGE)
  return parse


def _interrupt_handler(resume: Optional[str]):
  """SIGINT's handler: one line saying what was saved, then exit 130.

  It exits from the handler itself rather than raising KeyboardInterrupt: an
  exception raised while a garbage-collection callback runs (JAX has one) is
  printed and ignored, so the run would carry on; and unwinding would tear
  down the interpreter while XLA may still be compiling on its own threads
  (seen to crash). Every file written so far was written atomically, so
  there is nothing to flush."""
  def handler(signum, frame):
    del signum, frame
    kept = [path for path in _SAVED if _holds_work(path)]
    what = f"saved {', '.join(kept)}" if kept else "nothing was saved"
    hint = f"; {resume}" if kept and resume else ""
    # os.write, not print: the signal may have landed inside a print to stderr.
    os.write(sys.stderr.fileno(), f"\ninterrupted: {what}{hint}\n".encode())
    os._exit(EXIT_INTERRUPTED)
  return handler


def handle_interrupt(handler) -> None:
  """Installs `handler` for SIGINT, unless SIGINT is ignored (a background
  job of a shell script), as Python itself leaves it then."""
  if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
    signal.signal(signal.SIGINT, handler)


def run(main: Callable[[Sequence[str]], Any], *, output_files: Sequence[str] = (),
        output_plots: Sequence[str] = (), output_dirs: Sequence[str] = (),
        requires: Sequence[optional.Requirement] = (), resume: Optional[str] = None) -> None:
  """absl's `app.run(main)` with the checks above.

  output_files / output_plots / output_dirs: names of the flags holding paths
  the command writes (a file, an image, a folder); requires: optional dependencies, each needed when
  its flag is set; resume: how a rerun resumes, said on Ctrl-C."""
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
      for name in output_files:
        outputs.check_file(FLAGS[name].value, f"--{name}")
      for name in output_plots:
        outputs.check_plot(FLAGS[name].value, f"--{name}")
      for name in output_dirs:
        outputs.check_dir(FLAGS[name].value, f"--{name}")
      for requirement in requires:
        if FLAGS[requirement.flag].value:
          optional.require(requirement)
      return main(argv)
    except USER_ERRORS as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(EXIT_USAGE)

  handle_interrupt(_interrupt_handler(resume))
  app.run(wrapped, flags_parser=_parse_flags(main.__module__))
