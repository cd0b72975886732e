"""The MH-pFedHN client zoo: every architecture, width and input it promises."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pFedHN.zoo import (
    ARCHITECTURES,
    BLOCKS,
    MH_ARCHITECTURES,
    WIDTHS,
    assign_architectures,
    make_client_model,
)

NAMES = ["cnn", *MH_ARCHITECTURES] + [f"{a}-{w}" for a in ARCHITECTURES[1:] for w in WIDTHS]
FIVE_BLOCKS = BLOCKS["bn-blocks"]


def count(name, channels=3, classes=10, size=32):
    return sum(p.numel() for p in make_client_model(name, channels, classes, size).parameters())


# The MH-pFedHN authors' parameter counts (their config), CIFAR-10 and CIFAR-100.
AUTHORS_COUNTS = {
    "mh-cnn": (234_006, 239_856), "mh-vgg8": (268_814, 274_664),
    "mh-resnet10": (347_178, 353_028), "mh-resnet12": (523_242, 529_092),
    "mh-resnet18": (565_386, 571_236),
}


@pytest.mark.parametrize("name", MH_ARCHITECTURES)
def test_authors_zoo_has_their_parameter_counts(name):
    assert (count(name, classes=10), count(name, classes=100)) == AUTHORS_COUNTS[name]


def test_authors_zoo_layers_and_order():
    resnet = make_client_model("mh-resnet12", 3, 10, 32)
    names = [n for n, _ in resnet.named_parameters()]
    # Their order: stem, then per block shortcut, conv1, conv2, bn1, bn2; classifier last.
    assert names[:4] == ["conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"]
    assert names[names.index("res_net.1.reslayer.weight"):][:4] == [
        "res_net.1.reslayer.weight", "res_net.1.reslayer.bias",
        "res_net.1.conv1.weight", "res_net.1.conv1.bias"]
    assert names[-2:] == ["final.weight", "final.bias"]
    downsampling = [i for i, block in enumerate(resnet.res_net)
                    if isinstance(block.reslayer, nn.Conv2d)]
    assert downsampling == [1, 6]  # ResNet12's two stride-2 blocks
    for name, blocks in (("mh-resnet10", [3, 6]), ("mh-resnet18", [6, 12])):
        model = make_client_model(name, 3, 10, 32)
        assert [i for i, b in enumerate(model.res_net)
                if isinstance(b.reslayer, nn.Conv2d)] == blocks
    vgg = make_client_model("mh-vgg8", 3, 10, 32)
    assert sum(isinstance(m, nn.Dropout) for m in vgg.modules()) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in vgg.modules())
    cnn = make_client_model("mh-cnn", 3, 10, 32)
    assert [m.out_features for m in cnn.modules() if isinstance(m, nn.Linear)] == [108, 64, 10]


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


@pytest.mark.parametrize("blocks", BLOCKS)
def test_five_blocks_grow_in_size_and_split_clients_equally(blocks):
    names = BLOCKS[blocks]
    sizes = [count(n) for n in names]
    assert sizes == sorted(sizes)
    assignment = assign_architectures(blocks, 50)
    assert [assignment.count(n) for n in names] == [10] * 5
    assert assignment == sorted(assignment, key=names.index)
    assert assign_architectures("vgg8-32", 3) == ["vgg8-32"] * 3
    assert assign_architectures(["cnn", "vgg8-16"], 2) == ["cnn", "vgg8-16"]


def test_blocks_deal_the_remainder_to_the_first_blocks_as_the_authors_do():
    assignment = assign_architectures("blocks", 12)
    assert [assignment.count(n) for n in MH_ARCHITECTURES] == [3, 3, 2, 2, 2]
    assert assignment[:3] == ["mh-cnn"] * 3 and assignment[-2:] == ["mh-resnet18"] * 2


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


@pytest.mark.parametrize("name", ["mh-cnn", "mh-vgg8"])
def test_channels_last_networks_compute_what_the_plain_layout_does_up_to_float_rounding(name):
    """The authors' CNN and VGG8 run channels-last (faster CPU convolutions): their
    logits and gradients stay as close to a float64 computation in the plain
    layout as float32 allows, also after weights are loaded as a flat theta is."""
    torch.manual_seed(0)
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    model = make_client_model(name, 3, 10, 32)
    model.eval()  # VGG8's dropout
    weights = {k: torch.randn_like(v) * v.std() for k, v in model.state_dict().items()}
    model.load_state_dict(weights)  # as the client loads theta: a copy into each tensor
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters() if p.dim() == 4)

    reference = make_client_model(name, 3, 10, 32).double()
    reference.eval()
    reference.load_state_dict(weights)
    for p in reference.parameters():
        p.data = p.data.contiguous()  # the plain layout
    results = []
    for net, x in ((model, images), (reference, images.double())):
        logits = net(x)
        nn.functional.cross_entropy(logits, labels).backward()
        results.append((logits.double(), torch.cat([p.grad.flatten().double()
                                                    for p in net.parameters()])))
    (logits, grads), (ref_logits, ref_grads) = results
    assert (logits - ref_logits).norm() <= 1e-5 * ref_logits.norm()
    assert (grads - ref_grads).norm() <= 1e-5 * ref_grads.norm()


def authors_layer_order(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The authors' CNN and VGG8 as they order the layers (ReLU, then pool), written out."""
    def conv(layer: nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
        return F.conv2d(inputs, layer.weight, layer.bias, padding=1)

    def linear(layer: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, layer.weight, layer.bias)

    x = x.contiguous(memory_format=torch.channels_last)
    if hasattr(model, "conv1"):  # mh-cnn
        x = F.max_pool2d(F.relu(conv(model.conv1, x)), 2)
        x = F.max_pool2d(F.relu(conv(model.conv2, x)), 2).flatten(1)
        x = F.relu(linear(model.fc2, F.relu(linear(model.fc1, x))))
        return linear(model.fc3, x)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    for first, second in zip(convs[::2], convs[1::2], strict=True):
        x = F.max_pool2d(F.relu(conv(second, F.relu(conv(first, x)))), 2)
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    x = F.relu(linear(linears[1], F.relu(linear(linears[0], x.flatten(1)))))
    return linear(linears[2], x)


@pytest.mark.parametrize("name", ["mh-cnn", "mh-vgg8"])
def test_pool_before_relu_gives_the_authors_values_and_gradients_bit_for_bit(name):
    """Our CNN and VGG8 pool before a ReLU the authors apply first (a quarter of
    the elements): logits and every parameter's gradient equal theirs exactly,
    also where a whole pooling window is negative."""
    torch.manual_seed(0)
    model = make_client_model(name, 3, 10, 32)
    model.eval()  # VGG8's dropout
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    logits = model(images)
    assert (logits != 0).all()
    results = []
    for forward in (model, lambda x: authors_layer_order(model, x)):
        out = forward(images)
        results.append((out, torch.autograd.grad(F.cross_entropy(out, labels),
                                                 list(model.parameters()))))
    (ours, our_grads), (theirs, their_grads) = results
    assert torch.equal(ours, theirs)
    for mine, reference in zip(our_grads, their_grads, strict=True):
        assert torch.equal(mine, reference)
    first = model.conv1 if name == "mh-cnn" else model.features[0]
    pooled = F.max_pool2d(first(images.contiguous(memory_format=torch.channels_last)), 2)
    assert (pooled < 0).any()  # a window with no positive value: its gradient is zero both ways
