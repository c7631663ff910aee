"""Typed shard metadata and manifests: one writer, one validating reader, one-line errors naming file, rank, field."""

import json

import pytest
import torch

from xla_fsdp._layout import FlatSlot, flat_slot_problem, flat_slots, split_flat
from xla_fsdp._metadata import Manifest, ManifestFile, MetadataError, Original, ShardedParam, ShardMetadata


def _metadata(rank: int = 1) -> ShardMetadata:
    flat = ShardedParam((20,), 4, False, (Original("a.weight", (3, 4), 0, ("b.weight",)), Original("a.bias", (8,), 12)))
    dim0 = ShardedParam((5, 2), 4, True, (Original("c", (5, 2), 0),))
    return ShardMetadata(4, rank, {"flat_param_0": flat, "_fsdp_shard__c": dim0}, {"scale": "scale"},
                         ("a.weight", "a.bias", "c"), ("a.weight", "b.weight", "a.bias", "c", "scale"))


def test_the_dict_form_reads_back_to_the_same_metadata():
    metadata = _metadata()
    assert ShardMetadata.from_dict(metadata.to_dict(), "f.pth") == metadata


def _error(edit) -> str:
    data = _metadata().to_dict()
    edit(data)
    with pytest.raises(MetadataError) as raised:
        ShardMetadata.from_dict(data, "f.pth")
    message = str(raised.value)
    assert "\n" not in message and message.startswith("f.pth")
    return message


@pytest.mark.parametrize("edit,expected", [
    (lambda d: d.update(version=2), "field version is 2"),
    (lambda d: d.pop("params"), "field params is missing"),
    (lambda d: d["params"]["flat_param_0"].pop("originals"),
     "(rank 1): field params.flat_param_0.originals is missing"),
    (lambda d: d["params"]["flat_param_0"].update(shard_shape=[6]), "shard_shape is [6] but shape [20] over 4"),
    (lambda d: d["params"]["flat_param_0"]["originals"][1].update(offset=13), "elements 12..12 belong to no original"),
    (lambda d: d["params"]["flat_param_0"]["originals"][1].update(offset=11), "originals overlap at element 11"),
    (lambda d: d["params"]["flat_param_0"]["originals"][1].update(shape=[9]),
     "cover 21 elements but the tensor has 20"),
    (lambda d: d["params"]["flat_param_0"].update(shape=[2**30, 2**30]), "claims 1152921504606846976 elements"),
    (lambda d: d["params"]["flat_param_0"].update(world_size=2), "world_size is 2 but the file's world_size is 4"),
    (lambda d: d.update(rank=4), "field rank 4 is outside world_size 4"),
    (lambda d: d["params"]["flat_param_0"]["originals"][0].update(offset="0"), "offset must be an integer"),
])
def test_every_inconsistency_is_one_line_naming_the_field(edit, expected):
    assert expected in _error(edit)


def test_shard_sizes_are_checked_against_the_metadata_without_reading_data():
    metadata = _metadata()
    good = {"flat_param_0": torch.zeros(5), "_fsdp_shard__c": torch.zeros(2, 2), "scale": torch.zeros(3)}
    metadata.check_shards(good, "f.pth")
    with pytest.raises(MetadataError, match=r"f.pth \(rank 1\): model.flat_param_0 has 4 elements .* needs 5"):
        metadata.check_shards({**good, "flat_param_0": torch.zeros(4)}, "f.pth")
    with pytest.raises(MetadataError, match="model has no entry scale"):
        metadata.check_shards({k: v for k, v in good.items() if k != "scale"}, "f.pth")


def test_the_flat_layout_lays_originals_end_to_end_and_splits_them_back():
    slots = flat_slots([(3, 4), (8,), ()])
    assert slots == [FlatSlot(0, (3, 4)), FlatSlot(12, (8,)), FlatSlot(20, ())]
    assert flat_slot_problem(slots, 21) is None
    full = torch.arange(21.0)
    parts = split_flat(full, slots)
    assert [tuple(p.shape) for p in parts] == [(3, 4), (8,), ()]
    assert torch.equal(torch.cat([p.reshape(-1) for p in parts]), full)


def test_a_manifest_reads_back_and_must_list_every_rank_of_every_group(tmp_path):
    files = tuple(ManifestFile(f"c_rank-{r}.pth", 0, r, 2, 10, 7) for r in range(2))
    manifest = Manifest(3, 2, ((0, 1),), files)
    (tmp_path / "manifest.json").write_text(manifest.to_json())
    assert Manifest.read(tmp_path / "manifest.json") == manifest
    data = json.loads(manifest.to_json())
    data["files"] = data["files"][:1]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(MetadataError, match=r"manifest.json: field files lists \(group, rank\) \[\(0, 0\)\]"):
        Manifest.read(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(MetadataError, match="cannot be read as a checkpoint manifest"):
        Manifest.read(tmp_path / "manifest.json")
