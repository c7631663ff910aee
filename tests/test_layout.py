"""The shard layout (pure host tensors, no XLA)."""

import pytest
import torch

from xla_fsdp._layout import ShardLayout


@pytest.mark.parametrize("shape", [(7, 15), (15, 3), (1,), (), (0, 4), (8, 2)])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("dim0", [False, True])
def test_shards_reassemble_the_full_tensor(shape, world, dim0):
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    layout = ShardLayout(shape, world, dim0)
    shards = [layout.shard(full, r) for r in range(world)]
    assert all(tuple(s.shape) == layout.shard_shape for s in shards)
    assert torch.equal(layout.unshard(shards), full)


def test_padding_is_zero_and_only_at_the_end():
    layout = ShardLayout((7, 15), 4)
    assert (layout.shard_numel, layout.padding) == (27, 3)
    last = layout.shard(torch.ones(7, 15), 3)
    assert torch.equal(last[-3:], torch.zeros(3)) and torch.equal(last[:-3], torch.ones(24))


def test_dim0_shards_are_whole_rows():
    layout = ShardLayout((7, 15), 4, shard_on_dim_0=True)
    assert layout.shard_shape == (2, 15) and layout.padding == 15
    full = torch.arange(105.0).reshape(7, 15)
    assert torch.equal(layout.shard(full, 1), full[2:4])


def test_wrong_shard_sizes_are_named():
    layout = ShardLayout((7, 15), 2)
    with pytest.raises(ValueError, match="shard of rank 1 has 10 elements, expected 53"):
        layout.unshard([torch.zeros(53), torch.zeros(10)])
    with pytest.raises(ValueError, match="expected 2 shards, got 1"):
        layout.unshard([torch.zeros(53)])
    with pytest.raises(ValueError, match="rank 2 is outside"):
        layout.shard(torch.zeros(7, 15), 2)


@pytest.mark.parametrize("old_world, new_world", [(8, 4), (4, 8), (2, 3), (3, 2), (4, 1)])
@pytest.mark.parametrize("dim0", [False, True])
def test_a_shard_at_another_world_size_is_built_from_the_pieces_of_the_old_shards_and_originals(
        old_world, new_world, dim0):
    from xla_fsdp._layout import FlatSlot, flat_slots, slot_pieces
    shape = (7, 15)
    full = torch.arange(105.0).reshape(shape)
    old, new = ShardLayout(shape, old_world, dim0), ShardLayout(shape, new_world, dim0)
    old_shards = [old.shard(full, r).reshape(-1) for r in range(old_world)]
    old_slots = [FlatSlot(r * old.shard_numel, (old.shard_numel,)) for r in range(old_world)]
    # The same tensor as two originals laid end to end (a flat parameter): rows 0-2 and rows 3-6.
    originals, slots = [full[:3], full[3:]], flat_slots([(3, 15), (4, 15)])
    for rank in range(new_world):
        start, stop = new.span(rank)
        from_old, from_originals = torch.zeros(new.shard_numel), torch.zeros(new.shard_numel)
        for r, begin, end in slot_pieces(old_slots, start, stop):
            at = old_slots[r].offset + begin - start
            from_old[at:at + end - begin] = old_shards[r][begin:end]
        for i, begin, end in slot_pieces(slots, start, stop):
            at = slots[i].offset + begin - start
            from_originals[at:at + end - begin] = originals[i].reshape(-1)[begin:end]
        expected = new.shard(full, rank)
        assert torch.equal(from_old.reshape(new.shard_shape), expected), rank
        assert torch.equal(from_originals.reshape(new.shard_shape), expected), rank
