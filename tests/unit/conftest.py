"""Fixtures the unit tests share."""

from pathlib import Path

import pytest


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model directory as far as the config check goes (config.json; a vocabulary size for canaries)."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"vocab_size": 1000}')
    return d
