"""badnet_jax.defense.inputs: which data files a defense run reads, and the ones it refuses before any work."""

from __future__ import annotations

import pytest

from badnet_jax import ConfigError
from badnet_jax.defense.pipeline import DefenseConfig, run_defense
from tests.cli import run_cli


def test_some_but_not_all_data_files_is_an_error(lab_dir, tmp_path):
    with pytest.raises(ConfigError, match="missing clean_test"):
        run_defense(DefenseConfig(clean_valid=str(lab_dir / "data/cl/valid.h5"), out_dir=str(tmp_path / "o")))
    proc = run_cli("prune", "--bd_valid", "x.h5", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "error: give the clean sets --clean_valid and --clean_test" in proc.stderr
    assert "missing --clean_valid, --clean_test" in proc.stderr
