"""Core-neuron selection against a plain NumPy reference of the official rule,
and its invariants (exact k, distinct, permutation-equivariant)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coreinfer_jax.core import selection
from coreinfer_jax.core.spec import SCORINGS, TOP_M_ALGORITHMS
from coreinfer_jax.model.ffn import NeuronValues


def reference_signed(h_TF: np.ndarray, k: int, alpha: float) -> np.ndarray:
  """The official CoreInfer rule on one prompt's real tokens, written as its
  code reads, plus our fixed tie rule and the fill to exactly k neurons."""
  T, F = h_TF.shape
  # limit = int(token_sparsity * (h > 0).sum() / T), here in float32.
  m = int(np.floor(np.float32(alpha) * np.float32((h_TF > 0).sum()) / np.float32(T)))
  top = np.argsort(-h_TF, axis=1, kind="stable")[:, :m]   # ties: lower index first
  unique, counts = np.unique(top.reshape(-1), return_counts=True)
  summed = h_TF.sum(axis=0, dtype=np.float32)
  core = unique[np.lexsort((unique, -summed[unique], -counts))]   # most frequent first
  rest = np.setdiff1d(np.arange(F), core)
  fill = rest[np.lexsort((rest, -summed[rest]))]                  # fill by score
  return np.concatenate([core, fill])[:k]


def _select(values_BTF, real_BT, k, scoring="signed", alpha=0.2, relu=False, top_m="bisection",
            out_norms_F=None):
  """`relu`: the values are a ReLU FFN's fc1 output (h = relu(values)), else
  SwiGLU's h; `out_norms_F`: the down-projection column norms (default 1)."""
  values = jnp.asarray(values_BTF)
  norms = jnp.ones(values.shape[-1]) if out_norms_F is None else jnp.asarray(out_norms_F)
  neuron_values = NeuronValues(values, jax.nn.relu(values) if relu else values, norms, None)
  fn = jax.jit(selection.select_core, static_argnames=("k", "scoring", "alpha", "top_m"))
  return np.asarray(fn(neuron_values, jnp.asarray(real_BT), k=k, scoring=scoring, alpha=alpha,
                       top_m=top_m))


@pytest.mark.parametrize("top_m", TOP_M_ALGORITHMS)
@pytest.mark.parametrize("case", ["continuous", "integer_ties", "fill", "padded"])
def test_signed_selection_matches_numpy_reference(case, top_m):
  rng = np.random.default_rng({"continuous": 0, "integer_ties": 1, "fill": 2, "padded": 3}[case])
  B, T, F, k, alpha = 3, 13, 96, 40, 0.3
  if case == "integer_ties":   # many equal values within tokens, equal counts and equal sums
    values = rng.integers(-3, 4, size=(B, T, F)).astype(np.float32)
  else:
    values = rng.normal(size=(B, T, F)).astype(np.float32)
  if case == "fill":           # m = 1 per token, so fewer than k neurons are ever core
    alpha = 0.03
  real = np.ones((B, T), bool)
  if case == "padded":         # left padding with large values that must not count
    for b, pad in enumerate([0, 4, 9]):
      real[b, :pad] = False
      values[b, :pad] = 100.0
  got = _select(values, real, k, alpha=alpha, top_m=top_m)
  for b in range(B):
    expected = reference_signed(values[b][real[b]], k, alpha)
    np.testing.assert_array_equal(got[b], expected)
  if case == "fill":
    assert len(np.unique(np.argsort(-values, axis=-1)[:, :, :1])) < k


def test_magnitude_ranks_large_negative_values():
  values = np.zeros((1, 4, 8), np.float32)
  values[0, :, 3] = -5.0          # large negative SwiGLU output on every token
  values[0, :, 5] = 1.0
  values[0, :, 6] = 0.5
  signed = _select(values, np.ones((1, 4), bool), k=2, scoring="signed", alpha=1.0)
  magnitude = _select(values, np.ones((1, 4), bool), k=2, scoring="magnitude", alpha=1.0)
  assert 3 not in signed[0] and 3 in magnitude[0]


def test_opt_signed_scoring_ranks_values_before_relu():
  values = np.full((1, 3, 6), -1.0, np.float32)
  values[0, :, 0] = 2.0
  values[0, :, 4] = -0.1          # least negative: first fill after the one core neuron
  got = _select(values, np.ones((1, 3), bool), k=2, scoring="signed", alpha=1.0, relu=True)
  np.testing.assert_array_equal(got[0], [0, 4])


def test_griffin_matches_its_definition():
  rng = np.random.default_rng(4)
  values = rng.normal(size=(2, 7, 50)).astype(np.float32)
  real = np.ones((2, 7), bool)
  real[1, :3] = False
  got = _select(values, real, k=12, scoring="griffin")
  for b in range(2):
    h = values[b][real[b]]
    normalised = h / np.linalg.norm(h, axis=1, keepdims=True)
    score = np.linalg.norm(normalised, axis=0)
    np.testing.assert_array_equal(got[b], np.argsort(-score, kind="stable")[:12])


@pytest.mark.parametrize("seed", [0, 1])
def test_weight_aware_scorings_match_numpy_reference(seed):
  """wina: the signed reference rule on |h|·c; wina_griffin: GRIFFIN's
  definition on h·c, with c the down-projection column norms."""
  rng = np.random.default_rng(10 + seed)
  B, T, F, k, alpha = 2, 11, 64, 20, 0.3
  values = rng.normal(size=(B, T, F)).astype(np.float32)
  norms = rng.uniform(0.1, 3.0, size=F).astype(np.float32)
  real = np.ones((B, T), bool)
  real[1, :4] = False
  wina = _select(values, real, k, "wina", alpha, out_norms_F=norms)
  wina_griffin = _select(values, real, k, "wina_griffin", out_norms_F=norms)
  for b in range(B):
    weighted = values[b][real[b]] * norms
    np.testing.assert_array_equal(wina[b], reference_signed(np.abs(weighted), k, alpha))
    normalised = weighted / np.linalg.norm(weighted, axis=1, keepdims=True)
    expected = np.argsort(-np.linalg.norm(normalised, axis=0), kind="stable")[:k]
    np.testing.assert_array_equal(wina_griffin[b], expected)


def test_weight_aware_scorings_drop_a_large_activation_that_writes_nothing():
  values = np.ones((1, 4, 8), np.float32)
  values[0, :, 2] = 9.0                          # the largest activation, every token
  norms = np.ones(8, np.float32)
  norms[2] = 1e-3                                # ... into a down column near zero
  for plain, weighted in (("magnitude", "wina"), ("griffin", "wina_griffin")):
    assert 2 in _select(values, np.ones((1, 4), bool), 2, plain, 0.3, out_norms_F=norms)[0]
    assert 2 not in _select(values, np.ones((1, 4), bool), 2, weighted, 0.3, out_norms_F=norms)[0]


def test_global_importance_mix_ranks_shares_then_prior():
  primary = jnp.asarray([[4.0, 3.0, 2.0, 1.0, 0.0]])
  prior = jnp.asarray([0.0, 0.0, 0.1, 0.3, 0.6])
  def order(w):
    return np.argsort(-np.asarray(selection.mix_importance(primary, prior, w))[0], kind="stable")
  np.testing.assert_array_equal(order(0.0), [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(order(1.0), [4, 3, 2, 0, 1])
  # Halfway: shares 0.4, 0.3, 0.2, 0.1, 0 against the prior.
  np.testing.assert_allclose(np.asarray(selection.mix_importance(primary, prior, 0.5))[0],
                             [0.2, 0.15, 0.15, 0.2, 0.3], rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 20), F=st.integers(2, 70),
       k_fraction=st.floats(0.01, 1.0), alpha=st.floats(0.01, 1.0), scoring=st.sampled_from(SCORINGS),
       relu=st.booleans())
def test_exactly_k_distinct_in_range_and_permutation_equivariant(seed, T, F, k_fraction, alpha,
                                                                  scoring, relu):
  rng = np.random.default_rng(seed)
  k = max(1, round(k_fraction * F))
  values = rng.normal(size=(1, T, F)).astype(np.float32)
  norms = rng.uniform(0.1, 3.0, size=F).astype(np.float32)
  if relu and scoring != "signed":   # these score h = relu(values): keep h free of ties at 0
    values = np.abs(values) + 0.01
  real = np.ones((1, T), bool)
  got = _select(values, real, k, scoring, alpha, relu, out_norms_F=norms)
  assert got.shape == (1, k) and got.dtype == np.int32
  assert len(set(got[0].tolist())) == k and got.min() >= 0 and got.max() < F
  # Continuous values leave no ties, so the choice depends on values, not positions
  # (the neurons' down-projection norms move with them).
  perm = rng.permutation(F)
  permuted = _select(values[:, :, perm], real, k, scoring, alpha, relu, out_norms_F=norms[perm])
  np.testing.assert_array_equal(perm[permuted[0]], got[0])


def test_top_m_mask_handles_ties_and_m_zero():
  scores = jnp.asarray([[[1.0, 3.0, 3.0, 3.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0]]])
  mask = selection.top_m_mask(scores, jnp.asarray([[2, 0]]))
  np.testing.assert_array_equal(np.asarray(mask)[0], [[0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 20), F=st.integers(2, 70),
       alpha=st.floats(0.01, 1.0), ties=st.booleans())
def test_both_top_m_algorithms_count_the_same_token_wise_core_neurons(seed, T, F, alpha, ties):
  rng = np.random.default_rng(seed)
  values = rng.normal(size=(2, T, F)).astype(np.float32)
  if ties:   # equal values within tokens, and both zeros (-0.0 ranks below 0.0)
    values = np.round(values).astype(np.float32) * rng.choice([1.0, -1.0], size=values.shape)
  real = np.ones((2, T), bool)
  real[1, :rng.integers(0, T)] = False
  counts = {top_m: np.asarray(selection.token_core_counts(jnp.asarray(values), jnp.asarray(real),
                                                          alpha, top_m))
            for top_m in TOP_M_ALGORITHMS}
  np.testing.assert_array_equal(counts["top_k"], counts["bisection"])
  with pytest.raises(ValueError, match="unknown top-m algorithm 'sort'; choose one of bisection, top_k"):
    selection.token_core_counts(jnp.asarray(values), jnp.asarray(real), alpha, "sort")
