"""badnet_jax.defense.inputs: which data files a defense run reads, the ones it refuses before any work, and the
argument named when a file cannot be read."""

from __future__ import annotations

import numpy as np
import pytest

from badnet_jax import ConfigError, DataFileError, ModelFileError, save_lab_h5
from badnet_jax.defense.pipeline import DefenseConfig, run_defense
from tests.cli import run_cli
from tests.conftest import LAB_B, asset


def test_some_but_not_all_data_files_is_an_error(lab_dir, tmp_path):
    with pytest.raises(ConfigError, match="missing clean_test"):
        run_defense(DefenseConfig(clean_valid=str(lab_dir / "data/cl/valid.h5"), out_dir=str(tmp_path / "o")))
    proc = run_cli("prune", "--bd_valid", "x.h5", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "error: give the clean sets --clean_valid and --clean_test" in proc.stderr
    assert "missing --clean_valid, --clean_test" in proc.stderr


def test_a_file_that_cannot_be_read_names_the_argument_it_was_given_for(tmp_path):
    """A library caller gives up to five files: the error names the argument (and the path) at fault."""
    sets = {"clean_valid": str(asset("faces/lab3/valid_subset.h5")),
            "clean_test": str(asset("faces/lab3/test_subset.h5"))}
    with pytest.raises(ModelFileError) as err:
        run_defense(DefenseConfig(model=str(tmp_path / "bd_weight.h5"), out_dir=str(tmp_path / "o"), **sets))
    assert err.value.field == "model"
    assert str(err.value) == f"model={tmp_path / 'bd_weight.h5'}: file not found"
    png = str(asset("triggers/sun_glass_trigger.png"))
    with pytest.raises(DataFileError) as err:
        run_defense(DefenseConfig(model=str(asset(LAB_B)), out_dir=str(tmp_path / "o"), **{**sets, "clean_test": png}))
    assert err.value.field == "clean_test" and str(err.value).startswith(f"clean_test={png}: is not an HDF5 file")
    assert not (tmp_path / "o").exists()


def test_a_model_object_or_images_in_memory_are_refused_before_any_work(tmp_path):
    """The defense reads files; what a library caller holds in memory goes to rank_and_sweep, which it names."""
    from badnet_jax.models.deepid import DeepID

    for given, kind in (({"model": DeepID()}, "DeepID"), ({"clean_valid": np.zeros((2, 55, 47, 3))}, "ndarray")):
        with pytest.raises(ConfigError, match=rf"^{next(iter(given))}: expected the path of an? .*, got a {kind}: "
                                              r"the defense reads its inputs from files; .* rank_and_sweep") as err:
            run_defense(DefenseConfig(out_dir=str(tmp_path / "o"), **given))
        assert err.value.field == next(iter(given))
    assert not (tmp_path / "o").exists()


def test_an_empty_data_file_is_refused_naming_its_argument(tmp_path):
    empty = tmp_path / "empty.h5"
    save_lab_h5(empty, np.zeros((0, 55, 47, 3), np.uint8), np.zeros((0,), np.int32))
    sets = {"clean_valid": str(empty), "clean_test": str(asset("faces/lab3/test_subset.h5"))}
    with pytest.raises(ConfigError) as err:
        run_defense(DefenseConfig(model=str(asset(LAB_B)), out_dir=str(tmp_path / "o"), **sets))
    assert err.value.field == "clean_valid"
    assert str(err.value) == f"clean_valid={empty}: holds no images (its 'data' has 0 rows)"
    proc = run_cli("prune", "--model", asset(LAB_B), "--clean_valid", empty, "--clean_test", sets["clean_test"],
                   "--out_dir", tmp_path / "o", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and f"error: --clean_valid {empty}: holds no images" in proc.stderr, proc.stderr[-800:]
    assert not (tmp_path / "o").exists()
