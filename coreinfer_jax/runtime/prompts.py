"""Prompt text to token ids: raw, or wrapped in the tokenizer's chat template."""

from __future__ import annotations

from typing import List


def encode(tokenizer, prompt: str, chat: bool = False) -> List[int]:
  if chat:
    return list(tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
        return_dict=True)["input_ids"])
  return list(tokenizer(prompt)["input_ids"])
