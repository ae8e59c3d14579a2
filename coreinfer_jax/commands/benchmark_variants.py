"""What `benchmark.py` measures: its runs (`Variant`: method, β, core
settings, where the FFNs live, the lossless draft length), each checked
against its flags before any weight loads; the prompts of each round; the
runs' labels. Reads the benchmark's flags."""

import itertools
from typing import List, NamedTuple, Optional

import numpy as np
from absl import flags

from coreinfer_jax import checkpoint
from coreinfer_jax.core import methods
from coreinfer_jax.core.policy import CorePolicy
from coreinfer_jax.core.spec import CoreSpec
from coreinfer_jax.runtime import offload
from coreinfer_jax.runtime import prompts as prompt_encoding
from coreinfer_jax.runtime import verify as verifying

FLAGS = flags.FLAGS


class Variant(NamedTuple):
  """One measured run: the method, its β flag value, core spec (None:
  dense) and policy, and where its sparsified FFNs live (None: device
  memory; "device" or "host": host memory, gathered on that side), and the
  lossless mode's draft length (0: off)."""
  method: str
  beta: Optional[str]
  core: Optional[CoreSpec]
  policy: CorePolicy
  offload: Optional[str]
  verify: int


def _offload_modes(tp: int):
  """The sparse runs' `Variant.offload` values, checked."""
  modes = FLAGS.offload_modes or [FLAGS.offload_gather if FLAGS.offload_ffn else "resident"]
  for mode in modes:
    if mode not in ("resident",) + offload.GATHER_SIDES:
      raise ValueError(f"--offload_modes: unknown mode {mode!r}; choose from resident, "
                       f"{', '.join(offload.GATHER_SIDES)}")
    if mode != "resident":
      offload.check_offload(True, True, tp, mode)
  return [None if mode == "resident" else mode for mode in modes]


def round_prompts(s, vocab_size: int) -> List[List[List[int]]]:
  """Per round, the batch's prompt ids: the same random ids every round, or
  the next lines of --prompts_file."""
  batch, length = s["batch_size"], s["prompt_len"]
  if FLAGS.prompts_file is None:
    ids = np.random.default_rng(0).integers(3, vocab_size, (batch, length)).tolist()
    return [ids] * s["rounds"]
  if s["shape"]:
    raise ValueError("--prompts_file needs a real model's tokenizer; --shape has random weights")
  texts = prompt_encoding.read_prompts(FLAGS.prompts_file)
  tokenizer = checkpoint.load_tokenizer(checkpoint.model_path(FLAGS.model))
  encoded = [prompt_encoding.encode(tokenizer, text)[-length:] for text in texts]
  return [[encoded[(r * batch + b) % len(encoded)] for b in range(batch)]
          for r in range(s["rounds"])]


def _draft_lengths(tp: int) -> List[int]:
  """`--verifies` as integers, each checked."""
  try:
    lengths = [int(n) for n in FLAGS.verifies]
  except ValueError:
    raise ValueError(f"--verifies: expected a comma list of integers, got "
                     f"{','.join(FLAGS.verifies)!r}") from None
  for n in lengths:
    verifying.check_verify(n, True, tp > 1, False)
  return lengths


def variants(s, config, fingerprint) -> List[Variant]:
  """Every run, checked before loading (dense runs stay resident: they read
  every weight)."""
  names = FLAGS.methods or [s["method"]]
  betas = FLAGS.betas or [s["beta"]]
  sharings = FLAGS.core_sharings or [s["core_sharing"]]
  top_ms = FLAGS.top_ms or [s["top_m"]]
  modes = _offload_modes(s["tp"])
  verifies = _draft_lengths(s["tp"])
  variants = []
  for method in names:
    sparse = method != "dense"
    for beta, sharing, top_m, mode, verify in itertools.product(
        betas if sparse else [None], sharings if sparse else [s["core_sharing"]],
        top_ms if sparse else [s["top_m"]], modes if sparse else [None],
        verifies if sparse else [0]):
      cluster_dir = s["cluster_dir"] if method == "similarity" else None
      own = dict(s, core_sharing=sharing, top_m=top_m,
                 predictor_dir=s["predictor_dir"] if method == "predictor" else None)
      policy = methods.policy_for(method, own, config,
                                  cluster_dir=cluster_dir, fingerprint=fingerprint, beta=beta)
      policy.check_decoding(s["tp"], mode is not None, verify)
      verifying.check_verify(verify, sparse, s["tp"] > 1, mode is not None)
      variants.append(Variant(method, beta, policy.spec, policy, mode, verify))
  if FLAGS.offload_ffn and all(v.core is None for v in variants):
    offload.check_offload(True, False, s["tp"])   # refused: nothing sparse to offload
  return variants


def label(v: Variant) -> str:
  if v.core is None:
    return v.method
  return (f"{v.method} β={v.beta}" + (" shared" if v.core.shared else "")
          + (f" {v.core.top_m}" if FLAGS.top_ms else "")
          + (f" {memory_label(v.offload)}" if FLAGS.offload_modes else "")
          + (f" verify {v.verify}" if v.verify else ""))


def memory_label(offload_mode: Optional[str]) -> str:
  return "resident" if offload_mode is None else f"offloaded ({offload_mode} gather)"
