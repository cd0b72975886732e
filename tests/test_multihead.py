"""MH-pFedHN's multi-head hypernetwork: sizes only, shared heads, the VJP update."""

import copy

import numpy as np
import torch

from pFedHN.models import MHHyper
from pFedHN.strategy import PFedHNStrategy
from pFedHN.zoo import make_client_model
from tests.test_strategy import CLIP, LR, MOMENTUM, WD, reference_step


def sizes_of(names):
    models = [make_client_model(n, 3, 10, 32) for n in names]
    return models, [sum(p.numel() for p in m.parameters()) for m in models]


def test_generated_vectors_fill_each_architecture_exactly():
    models, sizes = sizes_of(["cnn", "resnet10-16", "cnn", "vgg8-16"])
    hnet = MHHyper(sizes)  # the server knows the sizes, never the architectures
    assert hnet.chunks == [-(-k // 3072) for k in sizes] == [40, 101, 40, 114]
    assert hnet.head_weights["40"].shape == (40, 3072, 128)
    assert sorted(hnet.head_weights) == ["101", "114", "40"]  # clients 0 and 2 share one
    for i, model in enumerate(models):
        theta = hnet(i)["theta"]
        assert theta.shape == (sizes[i],) and hnet.shapes(i)["theta"] == theta.shape
        pieces = torch.split(theta.detach(), [p.numel() for p in model.parameters()])
        named = {name: piece.view_as(p) for (name, p), piece
                 in zip(model.named_parameters(), pieces, strict=True)}
        result = model.load_state_dict(named, strict=False)
        assert not result.unexpected_keys
        assert all("running" in k or "num_batches" in k for k in result.missing_keys)


def test_clients_with_equal_chunk_counts_share_a_head_and_only_theirs_learns():
    hnet = MHHyper([1000, 900, 3000], chunk_size=256, embedding_dim=8, hidden_dim=16)
    assert hnet.chunks == [4, 4, 12]
    strategy = PFedHNStrategy(hnet, num_clients=3, num_rounds=5)
    before = copy.deepcopy(hnet.state_dict())
    strategy.update([0], [[np.ones(1000, np.float32)]])
    after = hnet.state_dict()
    assert not torch.equal(after["head_weights.4"], before["head_weights.4"])
    assert not torch.equal(after["embeddings.0"], before["embeddings.0"])
    for unused in ("head_weights.12", "head_biases.12", "embeddings.1", "embeddings.2"):
        assert torch.equal(after[unused], before[unused]), unused  # no decay either


def test_update_equals_autograd_for_a_heterogeneous_pair():
    torch.manual_seed(0)
    hnet = MHHyper([1000, 3000], chunk_size=256, embedding_dim=8, hidden_dim=16)
    strategy = PFedHNStrategy(hnet, num_clients=2, num_rounds=5, lr=LR, momentum=MOMENTUM,
                              weight_decay=WD, clip_norm=CLIP)
    reference = copy.deepcopy(strategy.hnet)
    buffers = [None] * len(list(reference.parameters()))
    rng = np.random.default_rng(2)
    for ids in ([1], [0, 1], [0]):
        deltas = [[rng.standard_normal(hnet.sizes[i]).astype(np.float32)] for i in ids]
        strategy.update(ids, deltas)
        reference_step(reference, ids, [[torch.from_numpy(d[0])] for d in deltas], buffers)
        for ours, ref in zip(strategy.hnet.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_a_delta_of_another_clients_size_is_rejected():
    strategy = PFedHNStrategy(MHHyper([1000, 3000], chunk_size=256), num_clients=2,
                              num_rounds=5)
    assert strategy.check_delta([np.zeros(3000, np.float32)], 1) is None
    assert "expected (1000,)" in strategy.check_delta([np.zeros(3000, np.float32)], 0)
