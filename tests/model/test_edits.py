"""Structural edits (fold BatchNorm, low-rank pair) applied by name, and replayed when a checkpoint loads."""

from __future__ import annotations

import pytest
import torch
from builders import assert_same_state, randomize_, small_resnet

from rankcut.errors import RankcutError
from rankcut.files.checkpoint import CheckpointMeta, load, load_with_meta, save
from rankcut.model import archs
from rankcut.model.edits import FoldBatchNorm, LowRankPair, edit_from_dict, edit_to_dict, get_module, set_module
from rankcut.model.layers import LowRank


def _edited_model():
    """A small-resnet with BatchNorm folds and low-rank pairs (a pair re-factorised, a Linear pair too)."""
    model = randomize_(small_resnet(width=8))
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(x)
    folds = [FoldBatchNorm("stem", "bn"), FoldBatchNorm("layer1.conv1", "layer1.bn1"),
             FoldBatchNorm("layer2.shortcut.0", "layer2.shortcut.1")]
    for edit in folds:
        edit.apply(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5, msg="folding BatchNorm changed outputs")
    pairs = [LowRankPair("layer1.conv1", 5), LowRankPair("layer1.conv1", 3), LowRankPair("fc", 4),
             LowRankPair("layer3.conv2", 7)]
    for edit in pairs:
        edit.apply(model)
    randomize_(model, seed=4)  # the pairs start with placeholder weights: fill them
    return model, (*folds, *pairs), x


def test_edits_replay_on_load(tmp_path):
    model, edits, x = _edited_model()
    meta = CheckpointMeta("rankcut:small-resnet", {"width": 8},
                          archs.default_input("rankcut:small-resnet", {})).with_edits(*edits)
    path = tmp_path / "edited.safetensors"
    save(model, meta, path)

    loaded, loaded_meta = load_with_meta(path)
    assert loaded_meta.edits == edits
    assert isinstance(loaded.layer1.conv1, LowRank) and loaded.layer1.conv1.rank == 3
    assert isinstance(loaded.fc, LowRank) and isinstance(loaded.fc.up, torch.nn.Linear)
    assert isinstance(loaded.bn, torch.nn.Identity)
    assert_same_state(loaded, model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    # and once more through save/load, edits and all
    again = tmp_path / "again.safetensors"
    save(loaded, loaded_meta, again)
    assert_same_state(load(again), model)


def test_edits_contradicting_the_tensors_are_refused(tmp_path):
    model, edits, _ = _edited_model()
    meta = CheckpointMeta("rankcut:small-resnet", {"width": 8}, archs.default_input("rankcut:small-resnet", {}))
    path = tmp_path / "lying.safetensors"
    save(model, meta.with_edits(*edits[:-1], LowRankPair("layer3.conv2", 6)), path)  # tensors are rank 7
    with pytest.raises(RankcutError, match="does not match its own description.*layer3.conv2"):
        load(path)
    save(model, meta.with_edits(*edits[:-1]), path)  # the last pair not recorded at all
    with pytest.raises(RankcutError, match="missing layer3.conv2.weight"):
        load(path)


def test_edits_round_trip_through_dicts_and_refuse_malformed_ones():
    for edit in (FoldBatchNorm("layer1.conv1", "layer1.bn1"), LowRankPair("fc", 3)):
        assert edit_from_dict(edit_to_dict(edit)) == edit
    assert edit_to_dict(LowRankPair("fc", 3)) == {"kind": "low_rank", "layer": "fc", "rank": 3}
    for junk, message in [({"kind": "prune", "layer": "fc"}, "unknown edit 'prune'"), ("low_rank", "unknown edit"),
                          ({"kind": "low_rank", "layer": "fc"}, "malformed low_rank edit: fields"),
                          ({"kind": "low_rank", "layer": "fc", "rank": 3, "extra": 1}, "malformed low_rank edit: fields"),
                          ({"kind": "low_rank", "layer": "fc", "rank": True}, "rank=True"),
                          ({"kind": "fold_bn", "layer": "stem", "bn": 7}, "bn=7")]:
        with pytest.raises(RankcutError, match=message):
            edit_from_dict(junk)


def test_edits_refuse_what_they_cannot_apply():
    model = small_resnet()
    for edit, message in [(FoldBatchNorm("stem", "layer1.conv1"), "expected a conv/linear and a BatchNorm"),
                          (FoldBatchNorm("stem", "layer2.bn1"), "channel counts differ"),
                          (LowRankPair("bn", 2), "BatchNorm2d is not a conv or linear layer"),
                          (LowRankPair("fc", 11), "outside 1..10"), (LowRankPair("nope", 2), "no layer named 'nope'")]:
        with pytest.raises(RankcutError, match=message):
            edit.apply(model)
    with pytest.raises(RankcutError, match="no layer named 'layer1.nope'"):  # never adds a module that was not there
        set_module(model, "layer1.nope", torch.nn.Identity())
    assert isinstance(get_module(model, "fc"), torch.nn.Linear)  # nothing was changed by the refusals
