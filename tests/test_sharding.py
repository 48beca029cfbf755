"""Sharded init and forward on an 8-device CPU mesh equal the single-device computation."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from cascade_jax import model, sharding
from cascade_jax.config import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=48)


def test_conftest_gave_us_eight_devices():
    assert len(jax.devices()) == 8


def test_make_mesh_fills_one_axis_and_rejects_bad_sizes():
    mesh = sharding.make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    with pytest.raises(ValueError, match="needs 12 devices but 8 are available"):
        sharding.make_mesh(data=3, fsdp=2, tensor=2)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="8 is not a multiple of 3"):
        sharding.make_mesh(data=-1, tensor=3)
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "context": 1, "tensor": 1}
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        sharding.make_mesh(fsdp=-1)  # the default data=-1 must then be given explicitly


def test_sharded_init_and_forward_equal_single_device():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = sharding.init_params(CFG, jax.random.key(7), mesh)
    single = model.init(CFG, jax.random.key(7))
    wq = sharded["layers"]["attn"]["wq"]
    assert wq.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (2, 16, 2, 8)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), sharded,
                 single)

    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 9)).astype(np.int32)
    batch = sharding.shard_batch({"tokens": tokens}, mesh)
    assert batch["tokens"].sharding.spec == PartitionSpec(("data", "fsdp"), None)
    forward = jax.jit(lambda p, t: model.forward(CFG, p, t))
    np.testing.assert_allclose(forward(sharded, batch["tokens"]),
                               forward(single, tokens), rtol=1e-5, atol=1e-5)


def test_mesh_that_does_not_divide_a_param_is_named():
    mesh = sharding.make_mesh(tensor=8)
    with pytest.raises(ValueError, match=r"layers/attn/wk has a dimension of 2 sharded 8 ways "
                                         r"over mesh axes \('tensor',\)"):
        sharding.param_shardings(CFG, mesh)


def test_custom_rules_replicate_a_logical_axis():
    mesh = sharding.make_mesh(tensor=8)
    rules = tuple((name, None if name in ("heads", "kv_heads") else axes)
                  for name, axes in sharding.DEFAULT_RULES)
    shardings = sharding.param_shardings(CFG, mesh, rules)
    assert isinstance(shardings["layers"]["attn"]["wk"], NamedSharding)
    assert shardings["layers"]["attn"]["wk"].spec == PartitionSpec(None, "fsdp", None, None)
    assert shardings["layers"]["mlp"]["w_up"].spec == PartitionSpec(None, "fsdp", "tensor")


def test_residual_stream_is_batch_sharded_not_embed_sharded_under_fsdp():
    """Pure FSDP (ZeRO-3): params are split along d_model, activations must be split along the
    batch. Without the model's constraint XLA copies the params' d_model sharding onto the
    residual stream and every device holds the whole batch (the plan's 130+ GiB temporaries).
    """
    mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
    params = sharding.init_params(CFG, jax.random.key(0), mesh)
    tokens = jax.device_put(np.zeros((8, 16), np.int32), sharding.batch_sharding(mesh))

    def residuals(p, t):
        return model.forward_with_intermediates(CFG, p, t, names=("block_in", "block_out"))[1]

    unconstrained = jax.jit(residuals)(params, tokens)  # no mesh context: constraint is a no-op
    assert unconstrained["block_in"].sharding.spec[1] is None  # batch whole: the failure mode
    constrained = jax.jit(sharding.traced_on_mesh(residuals, mesh))(params, tokens)
    for name, value in constrained.items():
        batch_axes, d_model_axes = value.sharding.spec[1], value.sharding.spec[3:4]
        assert batch_axes in ("fsdp", ("data", "fsdp")), (name, value.sharding.spec)
        assert d_model_axes in ((), (None,)), (name, value.sharding.spec)
        np.testing.assert_allclose(value, unconstrained[name], rtol=1e-6, atol=1e-6)


def test_micro_batches_must_split_over_the_batch_shards():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharding.check_batch_split(8, mesh, grad_accum=2)
    with pytest.raises(ValueError, match=r"batch_size=8 in grad_accum=4 micro-batches does not "
                                         r"split over the 4 batch shards.*multiple of 16"):
        sharding.check_batch_split(8, mesh, grad_accum=4)
    with pytest.raises(ValueError, match=r"global batch_size=6 does not split"):
        sharding.check_batch_split(6, mesh)
