"""badnet_jax.sweep.prefix: the step aliases of dead channels and the grouping of images by alive channels."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from badnet_jax.sweep import prefix


def test_step_aliases_follow_dead_channels():
    pool3 = np.ones((3, 5, 4, 60), np.float32)
    pool3[..., [2, 5, 9]] = 0.0  # dead on every image
    order = np.array([2, 5, 0, 9, 1] + list(range(10, 60)) + [3, 4, 6, 7, 8])
    aliases = np.asarray(prefix.step_aliases(jnp.asarray(pool3), jnp.asarray(order)))
    # Steps 1, 2 prune 2 and 5 (dead): same as step 0. Step 3 prunes 0 (alive). Step 4 prunes 9 (dead).
    np.testing.assert_array_equal(aliases[:6], [0, 0, 0, 3, 3, 5])
    np.testing.assert_array_equal(aliases[5:], np.arange(5, 61))


def _pool3_with_alive(alive_NxC):
    """pool_3 features whose channel c is non-zero (somewhere) on image i exactly when alive[i, c]."""
    pool3 = np.zeros((len(alive_NxC), 5, 4, 60), np.float32)
    pool3[:, 2, 1, :] = alive_NxC * 0.5
    return pool3


def test_alive_groups_is_a_stable_permutation_that_makes_each_pattern_one_run(rng):
    # Three channels alive everywhere, a few rare ones, and patterns spanning both 30-bit keys.
    patterns = rng.random((6, 60)) < 0.3
    patterns[:, [0, 31, 59]] = True
    which = rng.integers(0, 6, size=200)
    alive = patterns[which]
    perm = np.asarray(prefix.alive_groups(jnp.asarray(_pool3_with_alive(alive))))
    np.testing.assert_array_equal(np.sort(perm), np.arange(200))
    runs = [which[perm][0]]
    for w in which[perm][1:]:
        if w != runs[-1]:
            runs.append(w)
    assert sorted(runs) == sorted(set(which))  # each pattern appears as exactly one contiguous run
    for w in set(which):
        members = perm[which[perm] == w]
        np.testing.assert_array_equal(members, np.sort(members))  # input order kept within a run


def test_alive_groups_puts_the_rarest_channel_first(rng):
    alive = np.ones((8, 60), bool)
    alive[:, 40] = [0, 1, 0, 0, 1, 0, 0, 0]  # alive on 2 images: the most significant key
    alive[:, 3] = [1, 0, 1, 0, 1, 0, 1, 0]  # alive on 4
    perm = np.asarray(prefix.alive_groups(jnp.asarray(_pool3_with_alive(alive))))
    # Sorted by (channel 40, channel 3) bits, ascending, ties in input order.
    np.testing.assert_array_equal(perm, [3, 5, 7, 0, 2, 6, 1, 4])


