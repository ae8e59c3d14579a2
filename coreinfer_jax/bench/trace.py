"""Where the decode step's time goes inside the step itself, from a profiler trace.

Timing each kind of operation jitted alone (`bench/profile.py`) shows how fast
an access pattern streams, but not what it costs inside the compiled step,
where XLA fuses, reorders and copies differently (in issue #16 a kernel that
was 1.5x faster alone added 4.9 ms of layout copies to the step). So the
step's own executable is traced (`jax.profiler`), each executed operation
(a thunk on XLA:CPU) is mapped to its HLO instruction, and the instruction to
the model's named scope (`jax.named_scope` in `model/` and `runtime/`:
attention_projections, rope, cache_write, attention_over_cache, ffn_in,
ffn_activation, ffn_out, norm, embedding, output_matrix, sampling; anything
else, e.g. residual adds, is "other"). Times are summed over the threads that
ran them: a thunk's time is counted once whatever threads help it, and
independent thunks that overlap are both counted.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
from typing import Callable, Dict

import jax

SCOPES = ("attention_projections", "rope", "cache_write", "attention_over_cache", "ffn_in",
          "ffn_activation", "ffn_out", "norm", "embedding", "output_matrix", "sampling")
OTHER = "other"

_MODULE = re.compile(r"HloModule (\S+?),")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*?\s([a-z][\w-]*)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Control flow runs other computations' thunks inside its own event: counting
# it too would count their time twice.
_CONTAINERS = {"conditional", "while", "call"}
# XLA:CPU drops the metadata of the dots it keeps as library calls; a dot is
# then known by the parameter it reads (its argument's pytree path, e.g.
# `%params_layers_0__ffn_down_DF`).
_WEIGHT_SCOPES = ((re.compile(r"attn_[qkvo]_weight"), "attention_projections"),
                  (re.compile(r"ffn_(up|gate)_"), "ffn_in"),
                  (re.compile(r"ffn_down_"), "ffn_out"),
                  (re.compile(r"(embed_VE|lm_head_VE)"), "output_matrix"))
_OPERANDS = re.compile(r"%([\w.\-]+)")


def _scope(op_name: str) -> str:
  """The innermost of `SCOPES` in a `jit(f)/scope/.../op` metadata path."""
  return next((part for part in reversed(op_name.split("/")) if part in SCOPES), OTHER)


def instruction_scopes(hlo_text: str) -> Dict[str, str]:
  """Scope of every instruction of a compiled module's HLO text, by name;
  control flow maps to None. In order of evidence: the scope its own
  metadata names (a fusion's is its root's); for a fusion without one, the
  scope its fused instructions name most often; the
  weight it reads (`_WEIGHT_SCOPES`, through bitcasts); the scope of the
  first operand that has one (XLA:CPU drops the metadata of the ops it wraps,
  e.g. a norm's or a softmax's reduction, which belong with what they read)."""
  computations: Dict[str, list] = {}
  current = None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = computations.setdefault(head.group(1), [])
    elif current is not None and line.strip() != "}":
      current.append(line)

  def counted(lines) -> collections.Counter:
    return collections.Counter(_scope(m.group(1)) for line in lines
                               for m in [_OP_NAME.search(line)] if m)

  scopes: Dict[str, str] = {}
  aliases: Dict[str, str] = {}   # a bitcast's name -> what it bitcasts
  for lines in computations.values():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      name, opcode = m.groups()
      operands = _OPERANDS.findall(line.split("(", 1)[1].split(")")[0])
      if opcode == "bitcast" and operands:
        aliases[name] = operands[0]
      if opcode in _CONTAINERS:
        scopes[name] = None
        continue
      own = counted([line])
      calls = _CALLS.search(line)
      fused = counted(computations.get(calls.group(1), [])) if calls and opcode == "fusion" else {}
      named = [(n, s) for votes in (own, fused) for s, n in votes.items() if s != OTHER]
      if named:
        scopes[name] = named[0][1] if own.keys() - {OTHER} else max(named)[1]
        continue
      sources = [_resolve(aliases, o) for o in operands]
      weight = next((scope for pattern, scope in _WEIGHT_SCOPES
                     for source in sources if pattern.search(source)), None)
      read = next((scopes[o] for o in operands if scopes.get(o) not in (None, OTHER)), OTHER)
      scopes[name] = weight or read
  return scopes


def _resolve(aliases: Dict[str, str], name: str) -> str:
  while name in aliases:
    name = aliases[name]
  return name


def scope_seconds(run: Callable[[], None], hlo_text: str) -> Dict[str, float]:
  """Seconds per scope of the thunks of the module `hlo_text` compiles while
  `run()` runs under the profiler (summed over threads)."""
  from jax.profiler import ProfileData   # the profiler's reader: only here
  module_name = _MODULE.match(hlo_text).group(1)
  scopes = instruction_scopes(hlo_text)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      run()
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = ProfileData.from_file(path)
  seconds: Dict[str, float] = collections.defaultdict(float)
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if stats.get("hlo_module") != module_name:
          continue
        op = str(stats.get("hlo_op", event.name))
        scope = scopes.get(op, scopes.get(op.removesuffix(".clone"), OTHER))
        if scope is not None:
          seconds[scope] += event.duration_ns / 1e9
  return dict(seconds)
