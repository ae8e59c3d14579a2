"""Backslash escapes in text given by flag (`--stop="\\n\\n"`, `--prompt`).

A shell passes `--stop="\\n\\n"` as a backslash and an n, twice; users mean
two newlines. These escapes of a Python string literal are read: `\\n`, `\\t`,
`\\r`, `\\\\` (one backslash), `\\"`, `\\'`, `\\0` (NUL, one digit),
`\\xHH`, `\\uXXXX` and `\\UXXXXXXXX`; any other backslash is kept as typed
(`\\a`, octal and `\\N{...}` are not read), and text without a backslash
(including non-ASCII text) is unchanged. A code point that is not a
character (beyond U+10FFFF, or a lone UTF-16 surrogate) is refused.
"""

from __future__ import annotations

import re

_SIMPLE = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[ntr\\\"'0])")

HELP = ("backslash escapes are read as in a Python string (\\n newline, \\t tab, \\\\ one "
        "backslash, \\uXXXX)")


def _replace(match: re.Match) -> str:
  code = match.group(1)
  if code in _SIMPLE:
    return _SIMPLE[code]
  value = int(code[1:], 16)
  if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
    raise ValueError(f"\\{code} is not a character (a code point beyond U+10FFFF or a "
                     "lone surrogate)")
  return chr(value)


def unescape(text: str) -> str:
  """`text` with its backslash escapes replaced by the characters they name."""
  return _ESCAPE.sub(_replace, text)
