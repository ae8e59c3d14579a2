"""Where a decode step's time goes, per kind of operation.

Each kind is the step's own code (`layers.linear`, the FFN kind's
`project_in`/`project_out`, `layers.attend`, `forward.logits`,
`sampling.sample`) jitted alone over every layer at the decode step's shapes
(batch `B`, one token, the real weights and caches), so its time and bytes
say how fast that access pattern streams here:

- `attention projections`: q, k, v (`bi,oi->bo` over `[out, D]`) and o;
- `FFN in`: up and gate, `btd,fd->btf` over `[N, D]` (neurons as rows);
- `FFN out`: down, `btf,df->btd` over `[D, N]` (neurons as columns);
- `attention over the cache`: scores, softmax and values over the cache's
  filled span (`layers.attend_filled`), as the step reads it;
- `output matrix`: the final norm and `bte,ve->btv`;
- `sampling`: the step's sampler on `[B, V]` logits;
- `dispatch`: a jitted call that takes the step's arguments (parameters and
  cache, donated) and computes nothing: the host's cost per step.

The step itself is timed as it runs (`Generator.decode`), two ways: one
blocking call (comparable with the kinds, each also one blocking call), and
pipelined as generation runs it (many calls, one wait); what the blocking
step takes beyond the kinds' sum (norms, RoPE, cache writes, residual adds,
and any overlap or fusion the kinds alone do not show) is its `rest`.
Everything is timed interleaved, round by round, so machine noise hits all
alike.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, List, Sequence, Tuple

import jax
import jax.numpy as jnp

from coreinfer_jax.bench import rounds
from coreinfer_jax.model import layers
from coreinfer_jax.model.cache import KVCache
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.forward import logits
from coreinfer_jax.model.params import ModelParams
from coreinfer_jax.runtime.sampling import SamplingConfig, sample


@dataclasses.dataclass(frozen=True)
class OpKind:
  """One kind of operation of the decode step, runnable alone."""
  name: str
  pattern: str                    # the access pattern, for the report
  run: Callable[[], jax.Array]    # one call, blocking until done
  bytes_read: int                 # weight and cache bytes it must read


def _nbytes(*arrays) -> int:
  return sum(a.size * a.dtype.itemsize for a in arrays if a is not None)


def _ffn_arrays(ffns, down: bool) -> List[jax.Array]:
  """The arrays of the down projection (`down=True`: every FFN kind names
  them down_*), or the others (up, gate and their biases)."""
  leaves = [(path, leaf) for f in ffns for path, leaf in jax.tree_util.tree_flatten_with_path(f)[0]]
  return [leaf for path, leaf in leaves if ("down" in jax.tree_util.keystr(path)) == down]


def _kind(name: str, pattern: str, fn: Callable, args: Tuple, bytes_read: int,
          **jit_args) -> OpKind:
  compiled = jax.jit(fn, **jit_args)
  return OpKind(name, pattern, lambda: jax.block_until_ready(compiled(*args)), bytes_read)


def op_kinds(params: ModelParams, config: ModelConfig, cache: KVCache, tokens_B: jax.Array,
             sampling: SamplingConfig) -> List[OpKind]:
  """The decode step's kinds of operation at these parameters (dense or
  compact FFNs) and this cache (its full length is attended, as in the step)."""
  B, D, dtype = tokens_B.shape[0], config.hidden_size, params.embed_VE.dtype
  H, KVH, hd = config.num_heads, config.num_kv_heads, config.head_dim
  x_BTD = jnp.ones((B, 1, D), dtype)
  attn = [p.attn for p in params.layers]
  ffns = [p.ffn for p in params.layers]

  def projections(attn, x):
    outs = [layers.linear(x, a.q_weight, a.q_bias)[..., :1] + layers.linear(x, a.k_weight, a.k_bias)[..., :1]
            + layers.linear(x, a.v_weight, a.v_bias)[..., :1]
            + layers.linear(jnp.ones(x.shape[:-1] + (H * hd,), x.dtype), a.o_weight, a.o_bias)[..., :1]
            for a in attn]
    return sum(outs)

  def ffn_in(ffns, x):
    total = 0
    for f in ffns:
      up, gate = f.project_in(x)
      total = total + up[..., :1] + (0 if gate is None else gate[..., :1])
    return total

  def ffn_out(ffns, x):
    return sum(f.project_out(jnp.ones_like(f.project_in(x)[0]))[..., :1] for f in ffns)

  S = cache.v[0].shape[2]
  filled = cache.length + 1
  visible_BTS = jnp.ones((B, 1, S), bool)
  scale = config.query_scale or 1.0 / hd ** 0.5
  span = next(n for n in layers.attention_spans(S, 1) if n >= int(filled))

  def over_cache(k_caches, v_caches, filled):
    q = jnp.ones((B, KVH, H // KVH, 1, hd), dtype)
    return sum(layers.attend_filled(q, k, v, visible_BTS, scale, filled)[..., :1]
               for k, v in zip(k_caches, v_caches))

  key = jax.random.key(0)
  logits_BV = jnp.zeros((B, config.vocab_size), jnp.float32)
  return [
      _kind("attention projections", "bi,oi->bo over [out, in] (q, k, v, o)", projections,
            (attn, x_BTD), _nbytes(*[w for a in attn for w in (a.q_weight, a.k_weight,
                                                                 a.v_weight, a.o_weight)])),
      _kind("FFN in", "btd,fd->btf over [N, D] (up, gate)", ffn_in, (ffns, x_BTD),
            _nbytes(*_ffn_arrays(ffns, down=False))),
      _kind("FFN out", "btf,df->btd over [D, N] (down)", ffn_out, (ffns, x_BTD),
            _nbytes(*_ffn_arrays(ffns, down=True))),
      _kind("attention over the cache", f"the filled {span} of [B, KVH, {S}, hd] slots",
            over_cache, (cache.k, cache.v, filled),
            _nbytes(*cache.k, *cache.v) * span // S),
      _kind("output matrix", "final norm, bte,ve->btv", lambda p, x: logits(p, config, x),
            (params, x_BTD), _nbytes(params.output_embedding)),
      _kind("sampling", "the step's sampler on [B, V]",
            lambda l, k: sample(l, k, sampling), (logits_BV, key), 0),
      _kind("dispatch", "a call taking the step's arguments, computing nothing",
            lambda p, c, t: t + 1, (params, cache, tokens_B), 0, keep_unused=True),
  ]


@dataclasses.dataclass
class Profile:
  step: rounds.Figure                         # seconds per decode step, one blocking call
  pipelined: rounds.Figure                    # seconds per decode step, pipelined
  kinds: List[Tuple[OpKind, rounds.Figure]]   # seconds per call, per kind
  rest: rounds.Figure                         # step minus the kinds' sum (or why not)


def profile(kinds: Sequence[OpKind], step: Callable[[], None],
            pipelined: Callable[[], None], pipelined_steps: int, repeats: int) -> Profile:
  """Times `step` (one decode step), `pipelined` (`pipelined_steps` decode
  steps, one wait) and every kind, interleaved, `repeats` rounds after a
  warm-up call of each."""
  runs = [step, pipelined] + [k.run for k in kinds]
  for run in runs:
    run()
  seconds = [[] for _ in runs]
  for _ in range(repeats):
    for out, run in zip(seconds, runs):
      out.append(_seconds(run))
  step_rounds, pipelined_rounds, kind_rounds = seconds[0], seconds[1], seconds[2:]
  parts = [sum(r[i] for r in kind_rounds) for i in range(repeats)]
  return Profile(rounds.measured(step_rounds),
                 rounds.measured([s / pipelined_steps for s in pipelined_rounds]),
                 [(k, rounds.measured(r)) for k, r in zip(kinds, kind_rounds)],
                 rounds.difference(step_rounds, parts, "kinds' sum"))


def _seconds(run: Callable[[], object]) -> float:
  t0 = time.perf_counter()
  run()
  return time.perf_counter() - t0
