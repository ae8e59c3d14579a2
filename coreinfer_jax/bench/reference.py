"""The reference: transformers' torch model and its decode rate, timed as ours."""

from __future__ import annotations

import os
import time
from typing import List


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


def hf_decode_tokens_per_second(model, prompt_ids: List[int], decode_steps: int) -> float:
  """Decode rate of `generate` (KV cache, greedy): the time of 1 + N new
  tokens minus the time of 1 (prefill and first token), over N."""
  import torch

  def timed(n):
    ids = torch.tensor([prompt_ids])
    t0 = time.perf_counter()
    with torch.no_grad():
      model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                     do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0

  timed(2)   # warm-up
  return decode_steps / max(1e-9, timed(decode_steps + 1) - timed(1))
