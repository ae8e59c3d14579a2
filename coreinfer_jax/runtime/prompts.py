"""Prompt text to token ids: raw, or wrapped in the tokenizer's chat template;
prompt files."""

from __future__ import annotations

from typing import List

from coreinfer_jax import files


def read_prompts(path: str) -> List[str]:
  """The non-empty lines of a UTF-8 prompts file (one prompt a line)."""
  prompts = [line for line in files.read_lines(path) if line.strip()]
  if not prompts:
    raise ValueError(f"{path} holds no prompts")
  return prompts


def encode(tokenizer, prompt: str, chat: bool = False) -> List[int]:
  if chat:
    return list(tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
        return_dict=True)["input_ids"])
  return list(tokenizer(prompt)["input_ids"])
