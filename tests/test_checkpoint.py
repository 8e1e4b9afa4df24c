"""Checkpointer: plain arrays by default, zstd when asked, and either kind restores under either setting."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax import checkpoint

ZEROS = 1 << 20  # float32 values: 4 MiB that zstd squeezes to almost nothing


@pytest.mark.parametrize("compression", [False, True])
def test_compression_setting_and_restore_under_the_other_setting(tmp_path, compression):
  state = {"zeros": jnp.zeros((ZEROS,), jnp.float32), "w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
           "step": jnp.asarray(7, jnp.int32)}
  writer = checkpoint.Checkpointer(str(tmp_path), keep=2, compression=compression)
  writer.save(7, state, [{"epoch": 0}], {"samples_seen": 56})
  writer.close()
  size = sum(path.stat().st_size for path in (tmp_path / "7" / "state").rglob("*") if path.is_file())
  if compression:
    assert size < ZEROS  # a quarter of the raw bytes at most
  else:
    assert size >= 4 * ZEROS

  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
  reader = checkpoint.Checkpointer(str(tmp_path), keep=2, compression=not compression)
  restored, positions, meta = reader.restore(7, abstract)
  reader.close()
  for name in state:
    np.testing.assert_array_equal(restored[name], state[name])
  assert positions == {"process_0": {"epoch": 0}} and meta["samples_seen"] == 56


def test_restore_budget_bounds_the_restore_and_admits_the_largest_array(tmp_path):
  mib = 1 << 20
  state = {f"small{i}": jnp.full((mib // 4,), i, jnp.float32) for i in range(8)}  # 1 MiB each
  state["large"] = jnp.arange(mib, dtype=jnp.float32)  # 4 MiB
  writer = checkpoint.Checkpointer(str(tmp_path), keep=2)
  writer.save(3, state, [{"epoch": 0}], {})
  writer.close()
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)

  assert checkpoint.restore_budget_gb(abstract, 0) is None
  assert checkpoint.restore_budget_gb(abstract, 8) == 8
  budget = checkpoint.restore_budget_gb(abstract, 1e-6)
  assert budget == 2 * 4 * mib / 1e9
  with pytest.raises(ValueError, match="ckpt_restore_gb must be >= 0"):
    checkpoint.restore_budget_gb(abstract, -1)

  # The bound reaches Orbax: one below the largest array fails that array's read...
  too_small = checkpoint.Checkpointer(str(tmp_path), keep=2, restore_gb=3 * mib / 1e9)
  with pytest.raises(Exception, match="Requested more bytes"):
    too_small.restore(3, abstract)
  too_small.close()
  # ...and the budget, smaller than the whole state (12 MiB), restores every array.
  reader = checkpoint.Checkpointer(str(tmp_path), keep=2, restore_gb=budget)
  restored, _, _ = reader.restore(3, abstract)
  reader.close()
  assert budget * 1e9 < sum(a.nbytes for a in state.values())
  for name in state:
    np.testing.assert_array_equal(restored[name], state[name])


def test_keeping_no_checkpoint_is_refused(tmp_path):
  """Orbax's max_to_keep=0 deletes every checkpoint, the one just written included."""
  with pytest.raises(ValueError, match="train.keep_checkpoints must be at least 1"):
    checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=0)


def test_checksums_are_independent_of_sharding_and_old_steps_are_compared_on_their_plain_sum():
  """The sums of a sharded array are those of the whole array (each process saves and checks the same numbers on
  any mesh). A step saved before the weighted sum was stored (`[dtype, sum]`) still finds a changed value, though not
  two values swapped."""
  values = np.random.default_rng(0).standard_normal((10, 6, 8)).astype(np.float32)
  mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
  sharded = jax.device_put(values, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "fsdp")))
  saved = checkpoint.checksums({"w": values})
  assert checkpoint.checksums({"w": sharded}) == saved and len(saved["w"]) == 3
  flat = values.reshape(-1)
  changed = flat.copy()
  changed[7] = np.nextafter(changed[7], np.float32(np.inf))
  swapped = flat.copy()
  swapped[[3, 41]] = swapped[[41, 3]]
  old = {"w": saved["w"][:2]}
  for stored, damaged, found in [(saved, changed, True), (saved, swapped, True), (old, changed, True),
                                 (old, swapped, False)]:
    assert checkpoint.checksum_differences(stored, {"w": damaged.reshape(values.shape)}) == (["w"] if found else [])
  assert checkpoint.checksum_differences(saved, {"w": sharded}) == []


def test_closing_the_checkpoints_of_a_failed_launch_logs_its_own_error_instead_of_raising_it(tmp_path, caplog):
  """A launch that fails closes its checkpoint manager on the way out; were that close to raise too (storage refusing
  the clean-up of interrupted saves), its error would replace the launch's own as the one reported."""
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=1)
  close = ckpt.manager.close

  def refused() -> None:
    close()
    raise PermissionError("403 Permission 'storage.objects.delete' denied")

  ckpt.manager.close = refused
  with caplog.at_level(logging.WARNING):
    ckpt.close_after_failure()
  assert "closing the checkpoints of the failed launch failed too: PermissionError: 403" in caplog.text


@pytest.mark.parametrize("min_bytes", [checkpoint.REPLICA_PARALLEL_MIN_BYTES, 1024])
def test_small_replicated_arrays_are_saved_whole_without_a_compile_per_device(tmp_path, caplog, monkeypatch,
                                                                               min_bytes):
  """Orbax splits the save of a replicated array between its replicas through a slicing program compiled for each
  device, which a process's first save waits for. A norm scale (1 KiB here) is written whole by one replica: no
  slice compiled. An array whose slices reach the bound (with the bound lowered to 1 KiB) is still split."""
  monkeypatch.setattr(checkpoint, "REPLICA_PARALLEL_MIN_BYTES", min_bytes)
  jax.clear_caches()  # slices compiled before in this process would not be compiled again
  mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
  spec = jax.sharding.PartitionSpec
  state = {"w": jax.device_put(np.arange(4096, dtype=np.float32).reshape(jax.device_count(), -1),
                               jax.sharding.NamedSharding(mesh, spec("fsdp"))),
           "scale": jax.device_put(np.arange(256 * jax.device_count(), dtype=np.float32),
                                   jax.sharding.NamedSharding(mesh, spec()))}
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    ckpt.save(1, state, [{}], {})
    ckpt.manager.wait_until_finished()
  slices = [record for record in caplog.records if "Compiling jit(slice)" in record.getMessage()]
  assert len(slices) == (0 if min_bytes > 1024 else jax.device_count())
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
  restored, _, _ = ckpt.restore(1, abstract)
  ckpt.close()
  for name in state:
    np.testing.assert_array_equal(restored[name], state[name])


def test_gather_per_process_pads_to_few_shapes_and_returns_each_object(monkeypatch):
  """Each shape of its all-gather is a compile (jit specialises on shapes), and the data positions it gathers at every
  save change length often: padded to their exact length, a long run compiled one all-gather after another."""
  shapes = []

  def two_processes(array):  # what process_allgather gives when both processes hold `array`
    shapes.append(array.shape)
    return np.stack([array, array])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(checkpoint.multihost_utils, "process_allgather", two_processes)
  objects = [{"cursor": 10 ** digits, "text": "é" * digits} for digits in range(1, 40)]
  for obj in objects:
    assert checkpoint.gather_per_process(obj) == [obj, obj]
  padded = {shape for shape in shapes if shape != (1,)}  # the lengths' own gather is one shape
  # 39 lengths from 32 to 500 bytes: 5 powers of two (39 shapes before).
  assert padded == {(32,), (64,), (128,), (256,), (512,)}, padded
