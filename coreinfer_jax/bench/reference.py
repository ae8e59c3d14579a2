"""The reference: transformers' torch model and the times its decode rate is
measured from, as ours."""

from __future__ import annotations

import os
import time
from typing import List, Tuple


def hf_model(model_path: str, hf_config: dict, dtype_name: str):
  """transformers' torch model for a checkpoint, or random in a shape."""
  import torch
  import transformers
  torch_dtype = getattr(torch, dtype_name)
  if model_path.startswith("random:"):
    config = transformers.AutoConfig.for_model(**hf_config)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype).eval()
  if os.path.isdir(model_path):
    return transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).eval()
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(model_path), gguf_file=os.path.basename(model_path), dtype=torch_dtype).eval()


def hf_generate_seconds(model, prompt_ids: List[int], decode_steps: int) -> Tuple[float, float]:
  """Seconds of `generate` (KV cache, greedy) for 1 + N new tokens and for 1
  (prefill and first token), after a warm-up: the N decode steps are their
  difference (`bench.rounds.difference` over rounds)."""
  import torch

  def timed(n):
    ids = torch.tensor([prompt_ids])
    t0 = time.perf_counter()
    with torch.no_grad():
      model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                     do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0

  timed(2)   # warm-up
  return timed(decode_steps + 1), timed(1)
