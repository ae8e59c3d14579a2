"""A resumable pass over a tokenized dataset in batches: what every offline
command that prefills a dataset shares (clustering statistics, the global
importance, a predictor's training data).

Each batch is left-padded to a bucket and computed by the caller's compiled
function; its arrays are saved as one shard in a work folder the moment it
finishes (written atomically), and a rerun loads the shards it finds instead
of recomputing them: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from coreinfer_jax import files
from coreinfer_jax.runtime.batching import DEFAULT_BUCKETS, left_pad

Shard = Dict[str, np.ndarray]


def tokenize(tokenizer, texts: Sequence[str], max_tokens: int):
  """Token ids of each text, truncated to its first `max_tokens`."""
  return [list(tokenizer(t)["input_ids"])[:max_tokens] or [0] for t in texts]


def bucket(length: int) -> int:
  return next((b for b in DEFAULT_BUCKETS if b >= length), length)


def run_key(*parts) -> str:
  """A short hash of everything a run's results depend on (names its work folder)."""
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def clear_work_dir(work_dir: str) -> None:
  for path in glob.glob(os.path.join(work_dir, "batch-*.npz")):
    os.remove(path)
  if os.path.isdir(work_dir):
    os.rmdir(work_dir)


class BatchPass:
  """The shards of one pass (`run`), and what it cost."""

  def __init__(self):
    self.computed = 0      # batches computed in this call (the rest came from shards)
    self.resumed = 0
    self.seconds = 0.0     # compute time of the batches computed

  def run(self, token_ids: Sequence[Sequence[int]], batch_size: int,
          compute: Callable[[jax.Array, jax.Array], Shard], *, work_dir: Optional[str] = None,
          progress: bool = False, desc: str = "prefill") -> List[Shard]:
    """Per batch of `batch_size` texts, `compute(tokens [B, T], start [B])`'s
    arrays (host numpy), from `work_dir`'s shard when it has one."""
    if batch_size < 1:
      raise ValueError(f"batch size must be at least 1, got {batch_size}")
    starts = list(range(0, len(token_ids), batch_size))
    if work_dir:
      os.makedirs(work_dir, exist_ok=True)
    shards = []
    for n, first in enumerate(tqdm(starts, desc=desc, unit="batch", disable=not progress)):
      path = os.path.join(work_dir, f"batch-{n:06d}.npz") if work_dir else None
      if path and os.path.exists(path):
        with np.load(path) as shard:
          shards.append(dict(shard))
        self.resumed += 1
        continue
      batch = token_ids[first:first + batch_size]
      tokens, start = left_pad(batch, bucket(max(len(t) for t in batch)))
      t0 = time.perf_counter()
      arrays = {name: np.asarray(a) for name, a in jax.block_until_ready(
          compute(jnp.asarray(tokens), jnp.asarray(start))).items()}
      self.seconds += time.perf_counter() - t0
      self.computed += 1
      if path:
        files.write_npz(path, arrays)   # a shard either exists whole or not at all
      shards.append(arrays)
    return shards
