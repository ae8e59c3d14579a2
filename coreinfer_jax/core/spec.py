"""Which layers are sparsified, how many core neurons each keeps, how they are scored.

`CoreSpec` is frozen and hashable: the jitted prefill closes over it, so every
size in it (each layer's k) is static. `core_spec` builds one from user-facing
settings and rejects bad input before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple, Union

from coreinfer_jax import files

# signed, magnitude, wina: the stability rule over each token's top-m neurons
# by the value, |h|, or |h|·||down[:, i]|| (WINA's weight-aware criterion);
# griffin, wina_griffin: GRIFFIN's sum of per-token normalised squares of h,
# or of h·||down[:, i]|| (`selection` has the exact rules).
SCORINGS = ("signed", "magnitude", "griffin", "wina", "wina_griffin")
TOKEN_WISE_SCORINGS = ("signed", "magnitude", "wina")
CORE_PLACEMENTS = ("local", "global")
CORE_SHARINGS = ("per_sequence", "shared")
# How selection finds each token's top m (the same sets either way, tested):
# "bisection" counts above a bisected threshold, far faster on XLA:CPU;
# "top_k" is `lax.top_k` of at most ⌊α·F⌋ + 1, for backends with a fast one.
TOP_M_ALGORITHMS = ("bisection", "top_k")

# The official code sparsifies layers 5..26 (end 27 exclusive) of a 32-layer
# model; as a fraction of depth this carries over to any depth.
PAPER_LAYER_FRACTIONS = (5 / 32, 27 / 32)


@dataclasses.dataclass(frozen=True)
class CoreSpec:
  """Per model layer, the number of core neurons k (None: the layer stays dense).

  `blocks` > 1: the set is k/blocks neurons from each of `blocks` equal,
  consecutive neuron blocks (the `local` placement on a tensor-parallel mesh
  of that many devices, each owning a block); 1: the k first over all
  neurons. `shared`: one set for the whole batch, ranked over every
  sequence's real tokens, instead of one per sequence. `top_m`: how the
  token-wise top-m is found (`selection.TOP_M_ALGORITHMS`; the same sets,
  at another speed)."""
  scoring: str
  alpha: float                         # token-wise fraction (signed, magnitude)
  layer_k: Tuple[Optional[int], ...]   # one entry per model layer
  layer_beta: Tuple[Optional[float], ...]
  blocks: int = 1
  shared: bool = False
  top_m: str = "bisection"

  @property
  def sparse_layers(self) -> Tuple[int, ...]:
    return tuple(i for i, k in enumerate(self.layer_k) if k is not None)

  def summary(self) -> dict:
    """The `"core"` record of the scripts' JSON."""
    layers = self.sparse_layers
    betas = [self.layer_beta[i] for i in layers]
    ks = [self.layer_k[i] for i in layers]
    uniform = len(set(betas)) == 1
    return {"k": ks[0] if uniform else ks, "layers": list(layers), "scoring": self.scoring,
            "alpha": self.alpha, "beta": betas[0] if uniform else betas,
            "blocks": self.blocks, "sharing": CORE_SHARINGS[self.shared], "top_m": self.top_m}


def num_core_neurons(beta: float, num_neurons: int, blocks: int = 1) -> int:
  """k = round(β·F), rounding halves up, at least 1; with `blocks`, the same
  in each block (k = blocks · round(β·F/blocks)), so that every block keeps
  as many."""
  return blocks * max(1, int(math.floor(beta * num_neurons / blocks + 0.5)))


def parse_layers(text: str, num_layers: int) -> Tuple[int, ...]:
  """"paper" (the official range as a fraction of depth), "all", "A:B"
  (A inclusive, B exclusive) or a comma list "3,4,7"."""
  text = text.strip()
  if text == "all":
    return tuple(range(num_layers))
  if text == "paper":
    start, end = (int(math.floor(f * num_layers + 0.5)) for f in PAPER_LAYER_FRACTIONS)
    return tuple(range(start, max(end, start + 1)))
  try:
    if ":" in text:
      a, b = text.split(":")
      layers = tuple(range(int(a or 0), int(b) if b else num_layers))
    else:
      layers = tuple(int(t) for t in text.split(","))
  except ValueError:
    raise ValueError(f"sparse layers {text!r}: expected 'paper', 'all', 'A:B' or a comma "
                     f"list of layer indices") from None
  bad = [i for i in layers if not 0 <= i < num_layers]
  if bad or not layers:
    raise ValueError(f"sparse layers {text!r}: layer index {bad[0] if bad else '(none)'} is out "
                     f"of range for a model of {num_layers} layers (0..{num_layers - 1})")
  if len(set(layers)) != len(layers):
    raise ValueError(f"sparse layers {text!r} repeat a layer")
  return layers


def _check_fraction(name: str, value: float) -> float:
  if not 0.0 < value <= 1.0:
    raise ValueError(f"{name} must be in (0, 1], got {value}")
  return float(value)


def read_beta_file(path: str, num_layers: int) -> Tuple[Optional[float], ...]:
  """A JSON file `{"beta": [b_0, ..., b_{L-1}]}` (or the bare list): one β per
  model layer, null for a layer that stays dense."""
  data = files.read_json(path)
  betas = data.get("beta") if isinstance(data, dict) else data
  if not isinstance(betas, list):
    raise ValueError(f"{path}: expected a list of per-layer β under the key 'beta'")
  if len(betas) != num_layers:
    raise ValueError(f"{path}: {len(betas)} per-layer β values for a model of {num_layers} layers")
  return tuple(_layer_beta(path, i, b) for i, b in enumerate(betas))


def _layer_beta(path: str, layer: int, value) -> Optional[float]:
  """A β file's entry for one layer, checked: a JSON string or list there
  would otherwise fail as a Python comparison error naming neither."""
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{path}: β of layer {layer} is {value!r}, expected a number or null")
  return _check_fraction(f"{path}: β of layer {layer}", value)


def core_spec(num_layers: int, num_neurons: int, *, beta: Union[float, Sequence[float]] = 0.4,
              alpha: float = 0.2, scoring: str = "signed", sparse_layers: str = "paper",
              beta_file: Optional[str] = None, blocks: int = 1,
              sharing: str = "per_sequence", top_m: str = "bisection") -> CoreSpec:
  """Validated settings. `beta` is one β for every sparsified layer or a list
  with one β per sparsified layer; `beta_file` (one β per model layer) replaces
  both `beta` and `sparse_layers`; `blocks`, `sharing` and `top_m` as
  `CoreSpec` says."""
  if scoring not in SCORINGS:
    raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
  if sharing not in CORE_SHARINGS:
    raise ValueError(f"unknown core sharing {sharing!r}; choose one of {', '.join(CORE_SHARINGS)}")
  if top_m not in TOP_M_ALGORITHMS:
    raise ValueError(f"unknown top-m algorithm {top_m!r}; choose one of {', '.join(TOP_M_ALGORITHMS)}")
  if blocks < 1 or num_neurons % blocks:
    raise ValueError(f"{blocks} neuron blocks do not divide the model's {num_neurons} FFN neurons")
  alpha = _check_fraction("alpha (token-wise fraction)", alpha)
  if beta_file:
    layer_beta = read_beta_file(beta_file, num_layers)
  else:
    layers = parse_layers(sparse_layers, num_layers)
    betas = [beta] * len(layers) if isinstance(beta, (int, float)) else list(beta)
    if len(betas) != len(layers):
      raise ValueError(f"{len(betas)} per-layer β values for {len(layers)} sparsified layers "
                       f"{list(layers)}")
    chosen = dict(zip(layers, (_check_fraction("beta (kept fraction)", b) for b in betas)))
    layer_beta = tuple(chosen.get(i) for i in range(num_layers))
  if all(b is None for b in layer_beta):
    raise ValueError("no layer is sparsified")
  layer_k = tuple(None if b is None else num_core_neurons(b, num_neurons, blocks)
                  for b in layer_beta)
  return CoreSpec(scoring, alpha, layer_k, layer_beta, blocks, sharing == "shared", top_m)


def parse_beta(text: str) -> Union[float, Tuple[float, ...]]:
  """A flag value: one β ("0.4") or one per sparsified layer ("0.5,0.4,0.3")."""
  try:
    values = tuple(float(t) for t in str(text).split(","))
  except ValueError:
    raise ValueError(f"--beta {text!r}: expected a number or a comma list of numbers") from None
  return values[0] if len(values) == 1 else values
