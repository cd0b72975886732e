"""The MH-pFedHN client zoo: every architecture, width and input it promises."""

import itertools

import pytest
import torch
from torch import nn

from pFedHN.zoo import (
    ARCHITECTURES,
    FIVE_BLOCKS,
    WIDTHS,
    assign_architectures,
    make_client_model,
)

NAMES = ["cnn"] + [f"{a}-{w}" for a in ARCHITECTURES[1:] for w in WIDTHS]


@pytest.mark.parametrize("name", NAMES)
def test_every_model_takes_every_promised_input(name):
    for channels, size in itertools.product((1, 3), (28, 32)):
        model = make_client_model(name, channels, 7, size).eval()
        assert model(torch.zeros(2, channels, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name,convs,linears", [
    ("vgg8-16", 6, 2), ("resnet10-16", 9, 1), ("resnet12-16", 11, 1), ("resnet18-16", 17, 1),
])
def test_depths_match_the_names(name, convs, linears):
    model = make_client_model(name, 3, 10, 32)
    three_by_three = [m for m in model.modules()
                      if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(three_by_three) == convs
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == linears


def test_width_sets_the_first_layer_and_batch_norm_statistics_are_buffers():
    model = make_client_model("resnet10-32", 3, 10, 32)
    assert model.stem[0].out_channels == 32
    parameters = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    assert any(name.endswith("running_mean") for name in buffers)
    assert not any("running" in name for name in parameters)  # never generated


def test_five_blocks_grow_in_size_and_split_clients_equally():
    sizes = [sum(p.numel() for p in make_client_model(n, 3, 10, 32).parameters())
             for n in FIVE_BLOCKS]
    assert sizes == sorted(sizes)
    assignment = assign_architectures("blocks", 50)
    assert [assignment.count(n) for n in FIVE_BLOCKS] == [10] * 5
    assert assignment == sorted(assignment, key=FIVE_BLOCKS.index)
    assert assign_architectures("vgg8-32", 3) == ["vgg8-32"] * 3
    assert assign_architectures(["cnn", "vgg8-16"], 2) == ["cnn", "vgg8-16"]


@pytest.mark.parametrize("args,message", [
    (("resnet34-16", 3, 10, 32), "unknown architecture"),
    (("vgg8", 3, 10, 32), "give a width"),
    (("vgg8-24", 3, 10, 32), "give a width"),
    (("cnn-16", 3, 10, 32), "takes no width"),
    (("resnet18-16", 2, 10, 32), "1 or 3 channels"),
    (("vgg8-16", 3, 10, 24), "28 or 32 pixels"),
])
def test_bad_names_and_inputs_fail_fast(args, message):
    with pytest.raises(ValueError, match=message):
        make_client_model(*args)
    with pytest.raises(ValueError, match="3 architectures listed for 2 clients"):
        assign_architectures(["cnn"] * 3, 2)
