"""The reference: transformers' torch model and the times its decode rate is
measured from, as ours. It runs on torch's accelerator when there is one
(CUDA), else on the CPU; `hf_offloaded` is the paper's baseline for a model
larger than the device: accelerate's big-model dispatch (what
`from_pretrained(device_map="auto", max_memory=...)` does), every module that
does not fit the device budget kept in host memory (on a machine without a
CUDA device, on disk) and copied to the device at each forward."""

from __future__ import annotations

import collections
import os
import time
from typing import Dict, List, Tuple


def torch_device() -> str:
  """Where the reference computes: the first CUDA device, else the CPU."""
  import torch
  return "cuda:0" if torch.cuda.is_available() else "cpu"


def hf_model(model_path: str, hf_config: dict, dtype_name: str, device: str = "cpu"):
  """transformers' torch model for a checkpoint, or random in a shape, on `device`."""
  import torch
  import transformers
  torch_dtype = getattr(torch, dtype_name)
  if model_path.startswith("random:"):
    config = transformers.AutoConfig.for_model(**hf_config)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
  elif os.path.isdir(model_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
  else:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(model_path), gguf_file=os.path.basename(model_path), dtype=torch_dtype)
  return model.eval().to(device)


def hf_offloaded(model, device_budget_bytes: int, offload_dir: str):
  """(`model` dispatched by accelerate within `device_budget_bytes` of
  `torch_device()`, how many modules each tier holds). The budget bounds the
  device's weights (`max_memory`); what does not fit stays in host memory,
  or on disk (`offload_dir`) where the device is the CPU itself."""
  import accelerate
  from accelerate.utils import get_max_memory
  device = torch_device()
  if device == "cpu":
    max_memory = {"cpu": device_budget_bytes}
  else:
    max_memory = {0: device_budget_bytes, "cpu": get_max_memory()["cpu"]}
  device_map = accelerate.infer_auto_device_map(
      model, max_memory=max_memory, no_split_module_classes=model._no_split_modules)
  tiers = collections.Counter(str(place) for place in device_map.values())
  tiers = {{"0": "cuda:0"}.get(tier, tier): count for tier, count in tiers.items()}
  return accelerate.dispatch_model(model, device_map, offload_dir=offload_dir), tiers


def hf_generate_seconds(model, prompt_ids: List[int], decode_steps: int,
                        device: str = "cpu") -> Tuple[float, float]:
  """Seconds of `generate` (KV cache, greedy) for 1 + N new tokens and for 1
  (prefill and first token), after a warm-up: the N decode steps are their
  difference (`bench.rounds.difference` over rounds). The prompt starts on
  `device`; the tokens are read back at the end."""
  import torch

  def timed(n):
    ids = torch.tensor([prompt_ids], device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
    out.cpu()
    return time.perf_counter() - t0

  timed(2)   # warm-up
  return timed(decode_steps + 1), timed(1)


def tiers_line(tiers: Dict[str, int]) -> str:
  return ", ".join(f"{count} modules on {tier}" for tier, count in sorted(tiers.items()))
