"""`--help`: a command's docstring and the flags it defines, with their meaning.

absl's short help lists only the flags of the `__main__` module, which for
our commands (defined in `coreinfer_jax.commands`, sharing flags from
`cli.flags`) is none of them, and exits 1. This lists every flag defined by
this package's modules (a process imports one command, so these are the
command's own flags, the shared ones it uses and `--config`), and the caller
exits 0.
"""

from __future__ import annotations

import sys
import textwrap
from typing import List

from absl import flags

FLAGS = flags.FLAGS
PACKAGE = "coreinfer_jax."


def _flag_lines(flag) -> List[str]:
  value = flag.default
  shown = ",".join(map(str, value)) if isinstance(value, list) else value
  default = "" if value in (None, []) else f" (default: {shown})"
  lines = [f"  --{flag.name}{default}"]
  lines += textwrap.wrap(" ".join(flag.help.split()), width=88, initial_indent="      ",
                         subsequent_indent="      ")
  return lines


def command_help(command_module: str, full: bool) -> str:
  """The help text of the command defined in `command_module`; `full` adds
  every other flag (absl's and the libraries')."""
  doc = (sys.modules[command_module].__doc__ or "").strip()
  by_module = FLAGS.flags_by_module_dict()
  lines = [doc, "", "flags:"]
  own = {f.name: f for m, fs in by_module.items() if m.startswith(PACKAGE) for f in fs}
  for name in sorted(own):
    lines += _flag_lines(own[name])
  if full:
    lines += ["", "other flags:"]
    others = {f.name: f for m, fs in by_module.items() for f in fs if f.name not in own}
    for name in sorted(others):
      lines += _flag_lines(others[name])
  else:
    lines += ["", "--helpfull also lists absl's logging flags."]
  return "\n".join(lines)
