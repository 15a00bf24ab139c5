"""The library's draws are jax.random's, bit for bit: each kind, shape and dtype, typed and raw
keys, under vmap (a key per sample) and sharded, with partitionable threefry and without."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax import draws

SHAPES = [(), (7, 1), (2, 16, 16, 4)]


def _pairs(key):
    """[(ours, jax.random's)] for every kind of draw and shape, and a key per sample under vmap."""
    pairs = []
    for shape in SHAPES:
        pairs += [(draws.normal(key, shape), jax.random.normal(key, shape)),
                  (draws.normal(key, shape, jnp.bfloat16), jax.random.normal(key, shape, jnp.bfloat16)),
                  (draws.uniform(key, shape, jnp.float32, -0.5, 2.0), jax.random.uniform(key, shape, jnp.float32, -0.5, 2.0)),
                  (draws.rademacher(key, shape), jax.random.rademacher(key, shape))]
    keys = jax.random.split(key, 5)
    return pairs + [(jax.vmap(lambda k: draws.normal(k, (3, 4, 2)))(keys),
                     jax.vmap(lambda k: jax.random.normal(k, (3, 4, 2)))(keys))]


@pytest.mark.parametrize("partitionable", [True, False])
def test_every_draw_is_jax_randoms_bit_for_bit(partitionable):
    with jax.threefry_partitionable(partitionable):
        for key in (jax.random.key(3), jax.random.PRNGKey(3))[:2 if partitionable else 1]:
            for ours, theirs in jax.jit(_pairs)(key):  # one program: the draws compile together
                assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
                np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))


@pytest.mark.devices(8)
@pytest.mark.parametrize("partitionable", [True, False])
def test_a_batch_sharded_draw_is_the_unsharded_draw(partitionable):
    """Every device draws its own rows, and they are the numbers of the unsharded draw."""
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:8]), ("data",)), P("data"))
    key = jax.random.key(4)
    with jax.threefry_partitionable(partitionable):
        ours = jax.jit(lambda k: draws.normal(k, (16, 4, 4, 1)), out_shardings=sharding)(key)
        theirs = jax.random.normal(key, (16, 4, 4, 1))
    assert len(ours.sharding.device_set) == 8
    np.testing.assert_array_equal(ours, theirs)
