"""badnet_jax.io.checkpoint: orbax checkpoints of B' and of GoodNet restore exactly, or are refused in one line.

The round trip through a whole defense run is in tests/defense/test_pipeline.py, the input scale they carry in
tests/defense/test_scale.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from badnet_jax import init_params, save_badnet, save_goodnet
from badnet_jax.goodnet import GoodNet
from badnet_jax.models.deepid import DeepID
from badnet_jax.errors import BadNetError, CheckpointError, ConfigError
from badnet_jax.io import checkpoint
from tests.conftest import REPO, damaged_copy
from tests.io.conftest import PATH_KINDS, no_hang, odd_path


@pytest.mark.parametrize("kind", ["loop", "dangling", "fifo", "missing"])
def test_checkpoint_reader_says_what_the_path_is(tmp_path, kind):
    path = odd_path(tmp_path, kind, 0)
    no_hang()
    try:
        with pytest.raises(BadNetError) as err:
            checkpoint.restore_goodnet(path)
    finally:
        signal.alarm(0)
    assert str(path) in str(err.value) and PATH_KINDS[kind] in str(err.value)
    plain = tmp_path / "plain_file"
    plain.write_bytes(b"not a folder")
    with pytest.raises(BadNetError, match="is a file, not a checkpoint folder"):
        checkpoint.restore_badnet(plain)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_checkpoint_restores_exactly_or_is_refused(tmp_path, demo_goodnet_ckpt, data):
    """Any file of a GoodNet checkpoint truncated or removed: the same variables come back, or CheckpointError."""
    src, variables = demo_goodnet_ckpt
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    rel = data.draw(st.sampled_from(files))
    full = (src / rel).stat().st_size
    size = data.draw(st.one_of(st.none(), st.integers(0, max(full - 1, 0))))
    damaged = damaged_copy(src, tmp_path / f"c{len(list(tmp_path.iterdir()))}", rel, size)
    try:
        _, got = checkpoint.restore_goodnet(damaged)
    except CheckpointError as err:
        assert str(damaged) in str(err) and "tensorstore_spec" not in str(err) and len(str(err)) < 600
        return
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_saving_what_is_not_a_badnet_or_goodnet_is_refused_before_writing(tmp_path):
    params = init_params(num_classes=4)
    with pytest.raises(ConfigError, match=r"params: no output \(kernel and bias\) among its layers"):
        save_badnet(tmp_path / "b", DeepID(4), {k: v for k, v in params.items() if k != "output"})
    with pytest.raises(ConfigError, match=r"mask: channel 0 is 3"):
        save_badnet(tmp_path / "b", DeepID(4), params, mask=np.full(60, 3.0))
    with pytest.raises(ConfigError, match=r"variables: expected a GoodNet's variables"):
        save_goodnet(tmp_path / "g", GoodNet(DeepID(4)), {"params": params})
    assert not list(tmp_path.iterdir())


# In a second process: a failed restore, then an asyncio task failing with an error that names the restored
# folder (what orbax's other reads leave, "Task exception was never retrieved", when the loop drops them) and
# one naming another folder. Only the first is quiet: the user sees the one error the restore raised.
NEVER_RETRIEVED = """
import asyncio, gc, sys
from pathlib import Path
from badnet_jax import CheckpointError
from badnet_jax.io.checkpoint import restore_goodnet
folder, other = Path(sys.argv[1]), Path(sys.argv[2])
try:
    restore_goodnet(folder)
except CheckpointError:
    print("refused")

async def read(p):
    raise ValueError(f'OUT_OF_RANGE: Error reading "params.x/0.0" in OCDBT database at local file "{p}/"')

loop = asyncio.new_event_loop()
for p in (folder.resolve(), other.resolve()):
    task = loop.create_task(read(p))
    loop.run_until_complete(asyncio.sleep(0.01))
    del task
    gc.collect()
loop.close()
"""


def test_reads_still_in_flight_after_a_failed_restore_are_not_logged(tmp_path):
    folder, other = tmp_path / "not_a_checkpoint", tmp_path / "not_a_checkpoint2"  # a sibling is another folder
    folder.mkdir()
    proc = subprocess.run([sys.executable, "-c", NEVER_RETRIEVED, str(folder), str(other)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout == "refused\n", proc.stderr[-2000:]
    assert proc.stderr.count("Task exception was never retrieved") == 1, proc.stderr
    assert str(other.resolve()) in proc.stderr and str(folder.resolve()) + "/" not in proc.stderr, proc.stderr
