import pytest
import torch
import torch.nn.functional as F

from pFedHN.models import CNNHyper, CNNTarget, LocalLayer, parameter_shapes


def paper_forward(model: CNNTarget, x: torch.Tensor) -> torch.Tensor:
    """The paper's layer order (ReLU, then pool), written out independently."""
    x = F.max_pool2d(F.relu(F.conv2d(x, model.conv1.weight, model.conv1.bias)), 2)
    x = F.max_pool2d(F.relu(F.conv2d(x, model.conv2.weight, model.conv2.bias)), 2)
    x = F.relu(F.linear(x.flatten(1), model.fc1.weight, model.fc1.bias))
    x = F.relu(F.linear(x, model.fc2.weight, model.fc2.bias))
    return F.linear(x, model.fc3.weight, model.fc3.bias)


@pytest.mark.parametrize("channels,size,flat", [(1, 28, 2 * 7 * 4 * 4), (3, 32, 2 * 16 * 5 * 5)])
def test_target_flatten_size_follows_input(channels, size, flat):
    kernels = 7 if channels == 1 else 16
    model = CNNTarget(channels, kernels, 10, size)
    assert model.fc1.in_features == flat
    assert model(torch.randn(4, channels, size, size)).shape == (4, 10)


def test_target_cifar10_parameter_count():
    assert sum(p.numel() for p in CNNTarget(3, 16, 10, 32).parameters()) == 121_182


def test_target_matches_paper_layer_order_values_and_gradients():
    torch.manual_seed(0)
    model = CNNTarget(3, 16, 10, 32)
    x = torch.randn(8, 3, 32, 32)
    ours = model(x)
    ref = paper_forward(model, x)
    torch.testing.assert_close(ours, ref)
    g_ours = torch.autograd.grad(ours.square().sum(), list(model.parameters()))
    g_ref = torch.autograd.grad(paper_forward(model, x).square().sum(), list(model.parameters()))
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_local_target_returns_features_for_the_local_layer():
    body = CNNTarget(1, 7, 10, 28, local=True)
    assert body.fc3 is None
    assert "fc3.weight" not in dict(body.named_parameters())
    features = body(torch.randn(2, 1, 28, 28))
    assert features.shape == (2, 84)
    assert LocalLayer(84, 10)(features).shape == (2, 10)


@pytest.mark.parametrize("local", [False, True])
def test_hypernetwork_generates_exactly_the_target_parameters(local):
    target = CNNTarget(3, 16, 10, 32, local=local)
    hnet = CNNHyper(50, parameter_shapes(target))
    theta = hnet(7)
    expected = {k: v.shape for k, v in target.state_dict().items()}
    assert {k: v.shape for k, v in theta.items()} == expected
    target.load_state_dict(theta)  # strict: same names, same shapes


def test_hypernetwork_size_and_embedding_rule():
    hnet = CNNHyper(50, parameter_shapes(CNNTarget(3, 16, 10, 32)), n_hidden=3)
    assert hnet.embeddings.weight.shape == (50, 13)  # int(1 + 50 / 4)
    assert CNNHyper(100, {"w": torch.Size([2])}).embeddings.weight.shape[1] == 26
    total = sum(p.numel() for p in hnet.parameters())
    assert abs(total - 12.27e6) < 0.01e6
    assert hnet.heads["fc1_weight"].weight.numel() + hnet.heads["fc1_weight"].bias.numel() \
        == pytest.approx(9.70e6, rel=1e-3)


def test_different_clients_get_different_weights():
    hnet = CNNHyper(5, parameter_shapes(CNNTarget(1, 7, 10, 28)), n_hidden=1)
    a, b = hnet(0), hnet(1)
    assert not torch.equal(a["conv1.weight"], b["conv1.weight"])


def test_batched_generation_equals_one_client_at_a_time_up_to_float_rounding():
    torch.manual_seed(0)
    hnet = CNNHyper(50, parameter_shapes(CNNTarget(3, 16, 10, 32)))
    ids = [7, 0, 49, 7, 13]
    with torch.no_grad():
        batched = hnet.forward_many(ids)
        for i, theta in zip(ids, batched, strict=True):
            alone = hnet(i)
            assert list(theta) == list(alone)
            for name in alone:
                assert theta[name].shape == alone[name].shape
                # a different BLAS blocking, nothing else: float32 rounding
                torch.testing.assert_close(theta[name], alone[name], rtol=1e-5, atol=1e-6)
