"""Fixtures of the offline commands' tests."""

import numpy as np
import pytest

from tests.conftest import WORDS


@pytest.fixture
def synthetic_texts(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "texts.txt"
  path.write_text("\n".join(" ".join(rng.choice(WORDS, rng.integers(3, 12))) for _ in range(30)))
  return str(path)
