"""The native kernels' build (kernels/native.py): the cache, its failure paths, the 8-lane build, concurrent builds.

Each test runs a real second process with its own cache folder and compiler (``CXX``)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from badnet_jax.kernels import native
from badnet_jax.kernels.native import native_library
from tests.conftest import REPO


def test_the_library_is_whole_and_holds_every_op():
    lib = native_library()
    if lib is None:
        assert not os.environ.get("CI"), "CI machines must build the native kernels"
        pytest.skip("no C++ compiler here: the native kernels cannot be built")
    digest = hashlib.sha256(lib.path.read_bytes()).hexdigest()
    assert lib.path.with_suffix(".sha256").read_text().strip() == digest
    assert lib.path.stat().st_mode & 0o022 == 0 and lib.lanes in (8, 16)
    assert all(src.is_file() for src in native.SOURCES) and len(native.TARGETS) == len(set(native.TARGETS)) == 3
    for target in native.TARGETS:  # each handler exported under its registered name
        assert hasattr(ctypes.CDLL(str(lib.path)), target)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=240, env={**os.environ, **env}, cwd=REPO)


# Whatever the build does, the ops give the NumPy values (integers: every form exact), by the native kernels
# where they are built and by XLA's forms where not.
PROBE = """
    import jax, jax.numpy as jnp, numpy as np
    from badnet_jax.kernels.conv2d import conv2d
    from badnet_jax.kernels.dense import dense, dense_top2, resolve_impl
    from badnet_jax.kernels.native import native_library
    from tests.kernels.numpy_conv import numpy_conv
    x = np.arange(2 * 9 * 8 * 3).reshape(2, 9, 8, 3) % 7
    k = np.arange(3 * 3 * 3 * 20).reshape(3, 3, 3, 20) % 5 - 2
    got = conv2d(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32))
    assert np.array_equal(np.asarray(got), numpy_conv(x, k).astype(np.float32))
    a = np.arange(7 * 5).reshape(7, 5) % 4; w = np.arange(5 * 19).reshape(5, 19) % 7 - 3
    impl = resolve_impl()
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    assert np.array_equal(np.asarray(dense(f32(a), f32(w), f32(np.zeros(19)), impl=impl)), a @ w)
    assert np.array_equal(np.asarray(dense_top2(f32(a), f32(w), f32(np.zeros(19)), impl=impl)[0]), (a @ w).argmax(1))
    print("kernel:", native_library(), impl)
"""


@pytest.mark.slow
def test_without_a_compiler_the_xla_forms_run(tmp_path):
    done = _run(PROBE, CXX=str(tmp_path / "no-such-compiler"), BADNET_JAX_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert "kernel: None reference" in done.stdout
    assert "no C++ compiler" in done.stderr and "no-such-compiler" in done.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_a_failing_compiler_is_reported_and_leaves_nothing(tmp_path):
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho 'cc1plus: fatal error: out of cheese' >&2\nexit 1\n")
    broken.chmod(0o755)
    done = _run(PROBE, CXX=str(broken), BADNET_JAX_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert "kernel: None" in done.stdout and "out of cheese" in done.stderr
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written library


@pytest.mark.slow
@pytest.mark.parametrize("off", ["0", "off", "False"])
def test_turned_off_by_the_environment(tmp_path, off):
    done = _run(PROBE, BADNET_JAX_NATIVE=off, BADNET_JAX_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert "kernel: None" in done.stdout and not (tmp_path / "cache").exists()


def _fake_compiler(path, script: str):
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


@pytest.mark.slow
def test_odd_compilers_fall_back_and_leave_nothing(tmp_path):
    cache = tmp_path / "cache"
    # Exits 0 without writing a library; prints bytes that are not UTF-8; is the C driver (no C++ runtime).
    quiet = _fake_compiler(tmp_path / "quiet", "exit 0\n")
    latin = _fake_compiler(tmp_path / "latin", "printf 'caf\\351 \\377\\n' >&2\nexit 1\n")
    for cxx, says in ((quiet, "wrote no shared library"), (latin, "caf")):
        done = _run(PROBE, CXX=cxx, BADNET_JAX_CACHE=str(cache))
        assert done.returncode == 0, done.stderr
        assert "kernel: None" in done.stdout and says in done.stderr and "C++17 compiler" in done.stderr
        assert not list(cache.glob("*.so")) and not list(cache.glob(".*"))


@pytest.mark.slow
def test_a_compiler_past_the_time_limit_is_stopped_with_its_children(tmp_path):
    pid = tmp_path / "child.pid"
    slow = _fake_compiler(tmp_path / "slow", f"sleep 120 &\necho $! > {pid}\nwait\n")
    code = PROBE.replace("import jax,", "import badnet_jax.kernels.native as native\n"
                         "    native.BUILD_TIMEOUT_S = 3\n    import jax,")
    done = _run(code, CXX=slow, BADNET_JAX_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0 and "kernel: None" in done.stdout and "ran past 3 s" in done.stderr, done.stderr
    stat = Path(f"/proc/{int(pid.read_text())}/stat")
    # Gone, or a zombie waiting for its new parent to reap it: not running.
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.slow
def test_a_damaged_library_in_the_cache_is_rebuilt_not_loaded(tmp_path):
    cache = tmp_path / "cache"
    first = _run(PROBE, BADNET_JAX_CACHE=str(cache), CXX="c++ -g0")  # a compiler with its own argument
    assert first.returncode == 0 and "kernel: NativeLibrary" in first.stdout, first.stderr
    (built,) = cache.glob("*.so")
    whole = built.stat().st_size
    with open(built, "r+b") as f:  # what a crash during a write leaves (loading it would kill the process)
        f.truncate(whole // 2)
    again = _run(PROBE, BADNET_JAX_CACHE=str(cache), CXX="c++ -g0")
    assert again.returncode == 0 and "kernel: NativeLibrary" in again.stdout, again.stderr
    assert built.stat().st_size == whole and built.stat().st_mode & 0o022 == 0


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AVX2 is an x86 instruction set")
def test_the_eight_lane_build_agrees_too(tmp_path):
    # The AVX2 build (8 lanes, 12 accumulators), what a CPU without AVX-512 runs: every case exact, and on
    # real values the same bits in either convolution form and for a dense row alone or in a batch. Tuned for
    # AMD Zen 3, where GCC would leave a one-vector tile's chain of multiply-adds unfused (two roundings).
    code = """
    import jax, jax.numpy as jnp, numpy as np
    from badnet_jax.kernels.conv2d import conv2d_direct
    from badnet_jax.kernels.dense import dense_native, dense_top2_native
    from badnet_jax.kernels.native import native_library
    from tests.kernels.numpy_conv import numpy_conv, numpy_epilogue
    from tests.kernels.test_dense import numpy_dense, numpy_top2
    assert native_library().lanes == 8, native_library()
    rng = np.random.default_rng(0)
    for f in (1, 7, 8, 9, 20, 24, 33, 40, 60, 80):
        for w in (3, 11, 30):
            x = rng.integers(0, 256, (2, 9, w + 3, 3)); k = rng.integers(-8, 9, (4, 4, 3, f))
            want = numpy_epilogue(numpy_conv(x, k), True, (2, 2))
            for form in ("channels", "columns"):
                got = conv2d_direct(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), relu=True,
                                    pool=(2, 2), form=form)
                assert np.array_equal(np.asarray(got), want.astype(np.float32)), (f, w, form)
    for m in (1, 5, 6, 13):  # rows around the 6-row tile; columns around the 8-lane vectors and 2-vector tiles
        for n in (1, 7, 8, 9, 16, 17, 25, 160, 1283):
            x = rng.integers(-3, 4, (m, 37)); w = rng.integers(-3, 4, (37, n)); b = rng.integers(-9, 10, (n,))
            add = rng.integers(-20, 21, (m, n))
            f32 = lambda v: jnp.asarray(v, jnp.float32)
            got = dense_native(f32(x), f32(w), f32(b), f32(add), relu_in=True, relu_out=True)
            assert np.array_equal(np.asarray(got), numpy_dense(x, w, b, add, True, True)), (m, n)
            arg, gap, _ = dense_top2_native(f32(x), f32(w), f32(b))
            want_arg, want_gap = numpy_top2(x @ w + b)
            assert np.array_equal(np.asarray(arg), want_arg) and np.array_equal(np.asarray(gap), want_gap), (m, n)
    bits = lambda v: np.asarray(v).view(np.uint32)
    # The last column vector, or the last output pixel, in a one-vector tile; rows of 7 and 8 columns cut into
    # channel tiles of at most 4 pixels (their weights put in registers by an empty asm).
    for f in (1, 9, 20, 40):
        for w in (7, 8, 33, 65):
            x, k = rng.standard_normal((2, 7, w + 3, 3)), rng.standard_normal((3, 4, 3, f))
            x, k = jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32)
            chan, cols = (conv2d_direct(x, k, form=form) for form in ("channels", "columns"))
            assert np.array_equal(bits(chan), bits(cols)), (f, w)
    x, w, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((13, 160), (160, 20), (20,)))
    batch = bits(dense_native(x, w, b))
    for r in range(13):
        assert np.array_equal(bits(dense_native(x[r:r + 1], w, b)), batch[r:r + 1]), r
    print("eight lanes ok")
    """
    done = _run(code, BADNET_JAX_NATIVE_FLAGS="-march=haswell -mtune=znver3", BADNET_JAX_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0 and "eight lanes ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="SSE-only is an x86 baseline")
def test_an_sse_only_build_compiles_and_is_exact(tmp_path):
    # Baseline x86-64 (no AVX: old CPUs, VMs that hide it) builds the 8-lane kernels from generic vector code;
    # nothing AVX-only (intrinsics, a ymm register operand) may reach that build, or it fails to compile and
    # every native kernel is lost.
    code = """
    import jax.numpy as jnp, numpy as np
    from badnet_jax.kernels.conv2d import conv2d_direct
    from badnet_jax.kernels.native import native_library
    from tests.kernels.numpy_conv import numpy_conv, numpy_epilogue
    assert native_library() is not None and native_library().lanes == 8, native_library()
    rng = np.random.default_rng(0)
    for f in (9, 40):
        for w in (8, 30):  # 8 columns: channel tiles of 4 pixels
            x = rng.integers(0, 256, (2, 9, w + 3, 3)); k = rng.integers(-8, 9, (4, 4, 3, f))
            want = numpy_epilogue(numpy_conv(x, k), True, (2, 2)).astype(np.float32)
            for form in ("channels", "columns"):
                got = conv2d_direct(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), relu=True,
                                    pool=(2, 2), form=form)
                assert np.array_equal(np.asarray(got), want), (f, w, form)
    print("sse ok")
    """
    done = _run(code, BADNET_JAX_NATIVE_FLAGS="-march=x86-64 -mtune=generic", BADNET_JAX_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0 and "sse ok" in done.stdout, done.stderr[-3000:]


def _tile_bodies(assembly: str) -> dict[tuple[int, int], list[str]]:
    """(FG, XT) -> the lines of each channel-form Tile<FG, XT> in GCC's AT&T assembly (its parts under any
    label naming it, e.g. a ``.cold`` one, together)."""
    bodies, tile = {}, None
    for line in assembly.splitlines():
        label = re.match(r"^(_Z\S+):$", line)
        if label:
            m = re.search(r"4TileILi(\d+)ELi(\d+)E", label.group(1))
            tile = (int(m.group(1)), int(m.group(2))) if m else None
        elif line.strip().startswith((".cfi_endproc", ".size")):
            tile = None  # the function ended: what follows until the next label is not the tile's
        elif tile:
            bodies.setdefault(tile, []).append(line)
    return bodies


def _weight_reads(body: list[str]) -> tuple[int, int]:
    """(multiply-adds, those reading a full vector from memory) of a tile (a broadcast pixel, `{1toN}`, read from
    memory is no weight)."""
    fmas = [line for line in body if "vfmadd" in line]
    return len(fmas), sum("(" in line and "{1to" not in line for line in fmas)


def _loop_accesses(body: list[str]) -> tuple[int, int, int]:
    """(multiply-adds, vector stack accesses inside its loops that hold multiply-adds, vector stores to other
    memory inside them) of a tile. Whole, a tile has FG * XT multiply-adds and no such access: every accumulator
    a register (its output is stored after the loops)."""
    labels = {m.group(1): i for i, m in ((i, re.match(r"^(\.L\w+):", line)) for i, line in enumerate(body)) if m}
    in_loop = set()
    for i, line in enumerate(body):  # a backward jump closes a loop from its label to here
        jump = re.match(r"^\s+j\w+\s+(\.L\w+)", line)
        if jump and labels.get(jump.group(1), i) < i:
            lines = range(labels[jump.group(1)], i + 1)
            if any("vfmadd" in body[k] for k in lines):
                in_loop.update(lines)
    stack = sum(1 for k in in_loop if re.search(r"vmov\w*\s.*\((%rsp|%rbp)\)", body[k])
                and re.search(r"%[yz]mm", body[k]))
    stored = sum(1 for k in in_loop if re.search(r"vmov\w*\s+%[yz]mm\d+, -?\d*\(%r(?!sp|bp)", body[k]))
    return sum("vfmadd" in line for line in body), stack, stored


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not shutil.which("g++"),
                    reason="x86 builds by GCC")
@pytest.mark.parametrize("march", ["-march=haswell -mtune=znver3",
                                   "-march=znver3 -mavx512f -mavx512vl -mavx512bw -mavx512dq -mavx512cd",
                                   "-march=x86-64-v4", "-march=skylake-avx512"])
def test_channel_tiles_hold_their_weights_and_accumulators_in_registers(tmp_path, march):
    # The builds GCC 12 makes on a Zen 3 (8 lanes), on a Zen 4 (16 lanes, Zen 3 tuning), with generic tuning
    # and on an Intel CPU with AVX-512. Tuned for Zen, GCC reads each weight from memory in every multiply-add of
    # a tile of 2 to 4 pixels (XT loads where 1 does; the stage load-bound), generically in tiles of 2 or 3,
    # unless the empty asm in Tile holds it in a register. With 16 lanes it left the tiles of one channel vector
    # by 18 to 24 pixels rolled (each accumulator loaded and stored around its multiply-add) and stored those of
    # 17 to the stack and back at every tap column, unless the pragmas unroll them. Compiled, not run (this CPU
    # may lack AVX-512): a 16-lane build that failed to compile would lose every native kernel on such a CPU.
    import jax

    out = tmp_path / "direct.s"
    flags = [f for f in native.FLAGS if f not in ("-shared", "-march=native")]
    cmd = ["g++", *flags, *native.GCC_FLAGS, *march.split(), "-I", str(native.HERE), "-I", jax.ffi.include_dir(),
           "-S", str(native.HERE / "conv2d" / "direct_cpu.cc"), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if "bad value" in done.stderr and ("-march=" in done.stderr or "-mtune=" in done.stderr):
        pytest.skip(f"this g++ does not know {march}")
    assert done.returncode == 0, done.stderr[-3000:]
    assembly = out.read_text()
    bodies = _tile_bodies(assembly)
    counts = {tile: _weight_reads(body) for tile, body in bodies.items()}
    # The channel vectors a tile can hold: MAX_FG (2 with 8 lanes, 4 with 16) and the remainders below it;
    # Tile<3, *> is compiled with 8 lanes too but never runs there. The lanes come from the code: zmm registers.
    runs = {1, 2, 3, 4} if "%zmm" in assembly else {1, 2}
    assert runs <= {fg for fg, _ in counts}, sorted(counts)
    short = {tile: c for tile, c in counts.items() if tile[0] in runs and 2 <= tile[1] <= 4}
    assert len(short) == 3 * len(runs) and all(fmas > 0 for fmas, _ in short.values()), short
    assert all(from_memory == 0 for _, from_memory in short.values()), short
    loops = {tile: _loop_accesses(body) for tile, body in bodies.items()}
    spilled = {(fg, xt): s for (fg, xt), s in loops.items() if fg in runs and s != (fg * xt, 0, 0)}
    assert not spilled, spilled  # (multiply-adds, stack accesses in its loops, stores in them)


# Real-valued inputs to every op and layout, their outputs saved: any difference in where a build fuses a
# multiply-add shows in the last bits.
BITS = """
    import sys, numpy as np, jax.numpy as jnp
    from badnet_jax.kernels.conv2d import conv2d_direct
    from badnet_jax.kernels.dense import dense_native, dense_top2_native
    from badnet_jax.kernels.native import native_library
    assert native_library() is not None
    rng, outs = np.random.default_rng(0), []
    for f, w, c in ((20, 47, 3), (5, 30, 3), (40, 26, 8), (60, 12, 8), (33, 70, 8)):
        x = jnp.asarray(rng.standard_normal((2, 12, w, c)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((3, 4, c, f)), jnp.float32)
        b = jnp.asarray(rng.standard_normal(f), jnp.float32)
        for form in ("channels", "columns"):
            for relu, pool in ((True, (2, 2)), (False, None)):
                outs.append(conv2d_direct(x, k, bias=b, relu=relu, pool=pool, form=form))
    for m, n in ((13, 1283), (6, 160), (1, 17)):
        x, w, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((m, 160), (160, n), (n,)))
        outs += [dense_native(x, w, b, relu_in=True, relu_out=True), *dense_top2_native(x, w, b)]
    np.savez(sys.argv[1], *[np.asarray(o) for o in outs])
    print("saved")
"""


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("clang++") or not shutil.which("g++"), reason="needs both g++ and clang++")
def test_a_clang_build_computes_the_gcc_builds_bits(tmp_path):
    # The flags fuse multiply-adds in the same places for both compilers (native.GCC_FLAGS, CLANG_FLAGS).
    outs = {}
    for cxx in ("g++", "clang++"):
        out = tmp_path / f"{cxx}.npz"
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(BITS), str(out)], capture_output=True, text=True,
                              timeout=400, env={**os.environ, "CXX": cxx, "BADNET_JAX_CACHE": str(tmp_path / cxx)},
                              cwd=REPO)
        assert done.returncode == 0 and "saved" in done.stdout, done.stderr[-3000:]
        outs[cxx] = np.load(out)
    gcc, clang = outs["g++"], outs["clang++"]
    assert gcc.files == clang.files and len(gcc.files) == 32
    for name in gcc.files:
        assert np.array_equal(gcc[name].view(np.uint32), clang[name].view(np.uint32)), name


@pytest.mark.slow
def test_processes_building_at_once_share_one_library(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "BADNET_JAX_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(PROBE)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for _ in range(3)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert all("kernel: NativeLibrary" in o[0] for o in outs)
    (built,) = cache.glob("*.so")
    assert built.name == native_library().path.name
    assert {p.name for p in cache.iterdir()} == {built.name, built.with_suffix(".sha256").name}  # no tmp
    # A later process loads it: no second build.
    stamp = built.stat().st_mtime_ns
    done = _run(PROBE, BADNET_JAX_CACHE=str(cache))
    assert done.returncode == 0 and "kernel: NativeLibrary" in done.stdout, done.stderr
    assert built.stat().st_mtime_ns == stamp


# On two CPU devices the kernels' helpers can wait in the pool's queue until the sweep ends: each call's packed
# weights (1283 classes: 820 KB) must not wait with them.
PINNED = """
    import resource, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from badnet_jax import init_params
    from badnet_jax.models.deepid import DeepID
    from badnet_jax.sweep import SweepOptions, plan_sweep
    from badnet_jax.sweep.strategies import sweep_set
    n = int(sys.argv[1])
    model, params = DeepID(), init_params(num_classes=1283, seed=0)
    plan = plan_sweep(SweepOptions(), [], model)
    assert len(jax.devices()) == 2 and plan.impl == "native", (jax.devices(), plan)
    rng = np.random.default_rng(0)
    feats = np.maximum(rng.standard_normal((n, 5, 4, 60), np.float32), 0) * (rng.random((n, 1, 1, 60)) < 0.5)
    orders = jnp.arange(60, dtype=jnp.int32)[None]
    mesh = Mesh(np.array(jax.devices()), ("data",))
    run = jax.jit(jax.shard_map(lambda f: sweep_set(model, params, f, orders, plan), mesh=mesh,
                                in_specs=P("data"), out_specs=P(None, None, "data"), check_vma=False))
    jax.block_until_ready(run(feats))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_a_kernel_call_holds_no_memory_once_it_returned():
    """The sweep's heads on two CPU devices: 6000 images peak within 100 MB of 500 (the kernels' late helpers
    hold nothing of their call; holding its packed weights, they took 400 MB more on a 2-core Zen 3)."""
    if native_library() is None:
        pytest.skip("no native kernels on this machine")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    peaks = {}
    for n in (500, 6000):
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(PINNED), str(n)], capture_output=True,
                              text=True, timeout=240, env=env, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        peaks[n] = int(done.stdout.split()[-1])
    assert peaks[6000] - peaks[500] < 100, peaks  # MB
