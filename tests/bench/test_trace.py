"""The traced step's time is attributed to the model's named scopes."""

import jax
import jax.numpy as jnp

from coreinfer_jax.bench import trace


def _step(params, x_BD):
  with jax.named_scope("ffn_in"):
    h = jnp.einsum("bd,fd->bf", x_BD, params["ffn_up_FD"])
  with jax.named_scope("ffn_activation"):
    h = jax.nn.silu(h)
  with jax.named_scope("norm"):
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)
  return jnp.einsum("bf,df->bd", h, params["ffn_down_DF"])   # unscoped: known by its weight


def test_every_thunk_is_attributed_and_timed():
  params = {"ffn_up_FD": jnp.ones((1024, 256)), "ffn_down_DF": jnp.ones((256, 1024))}
  x = jnp.ones((1, 256))
  compiled = jax.jit(_step).lower(params, x).compile()
  scopes = trace.instruction_scopes(compiled.as_text())
  assert set(scopes.values()) >= {"ffn_in", "ffn_out"}
  assert set(scopes.values()) <= set(trace.SCOPES) | {trace.OTHER}

  def run():
    for _ in range(20):
      out = compiled(params, x)
    out.block_until_ready()
  seconds = trace.scope_seconds(run, compiled.as_text())
  assert seconds["ffn_in"] > 0 and seconds["ffn_out"] > 0
  assert seconds.get(trace.OTHER, 0) < 0.5 * sum(seconds.values())
