"""The package's top-level names: ``supermask.__all__`` lists what ``import supermask`` offers, each
name the object of the module that defines it (MaskBank among them, from supermask.bank)."""
from __future__ import annotations

import torch
import torch.nn as nn

import supermask
from supermask import bank


def test_every_name_of_all_is_there_and_defined_in_a_submodule():
    assert len(set(supermask.__all__)) == len(supermask.__all__)
    for name in supermask.__all__:
        obj = getattr(supermask, name)
        assert obj.__module__.startswith("supermask."), (name, obj.__module__)
        assert getattr(__import__(obj.__module__, fromlist=[name]), name) is obj


def test_mask_bank_is_exported_and_star_import_binds_it():
    assert "MaskBank" in supermask.__all__
    assert supermask.MaskBank is bank.MaskBank
    scope: dict = {}
    exec("from supermask import *", scope)
    assert scope["MaskBank"] is bank.MaskBank


def test_mask_bank_from_the_top_level_switches_the_masks():
    layer = supermask.SupermaskLinear(32, 8, k=0.25, seed=0, name="fc")
    model = nn.Sequential(layer)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, mask0 = model(x), layer.mask()
        masks = supermask.MaskBank(model, 2, seed=1)
        assert torch.equal(model(x), before)  # task 0: the layer's own scores
        masks.set_task(1)
        assert layer.scores is masks.scores[0][1]
        assert int(layer.mask().sum()) == 64 and not torch.equal(layer.mask(), mask0)  # 0.25 of 256 kept
        assert not torch.equal(model(x), before)
        masks.set_task(0)
        assert torch.equal(model(x), before)
