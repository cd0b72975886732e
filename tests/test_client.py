import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import RecordDict

from pFedHN.client import (
    InnerLoop,
    LocalStore,
    PFedHNClient,
    Training,
    derive_seed,
    discard_state_after,
)
from pFedHN.dataset import DATASETS, federated_data
from pFedHN.models import CNNTarget
from pFedHN.settings import SplitSettings
from tests.conftest import TINY_MNIST

KW = {"in_channels": 1, "n_kernels": 7, "out_dim": 10, "input_size": 28}
LOOP = InnerLoop(steps=20, batch_size=16)


def manual_inner_loop(theta, data, seed, device="cpu", clip=50.0, norms=None):
    """The paper's inner loop written out by hand: fresh SGD, random batches, clip 50.

    ``norms``: a list that gets every step's gradient norm, before clipping."""
    model = CNNTarget(**KW).to(device)
    model.load_state_dict(theta)
    data = data.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=5e-3, momentum=0.9, weight_decay=5e-5)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(LOOP.steps):
        idx = torch.randperm(len(data.train_y), generator=gen)[: LOOP.batch_size].to(device)
        x = (data.train_x[idx].float() / 255 - 0.1307) / 0.3081
        loss = F.cross_entropy(model(x), data.train_y[idx])
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if norms is not None:
            norms.append(norm.item())
        if norm > clip:
            for g in grads:
                g.mul_(clip / (norm + 1e-6))
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_client(partition_id=3, state=None, local=False, mirror=None, device="cpu"):
    data = federated_data(DATASETS["mnist"], str(TINY_MNIST),
                          SplitSettings(10, 2, 500, 0))[partition_id]
    model = CNNTarget(**KW, local=local)
    store = LocalStore(state if state is not None else RecordDict(), mirror, checkpoint_every=3)
    client = PFedHNClient(partition_id, data, model, Training(LOOP, seed=7, out_dim=10),
                          store=store, device=device)
    return client, data


def test_delta_theta_is_theta_minus_trained_and_matches_manual_loop(device):
    torch.manual_seed(0)
    theta = {k: v.detach().clone() for k, v in CNNTarget(**KW).state_dict().items()}
    client, data = make_client(device=device)
    assert client.data.train_x.device.type == client.model.fc1.weight.device.type == device.type
    arrays = [v.numpy().copy() for v in theta.values()]
    delta, n, metrics = client.fit(arrays, {"server-round": 5})
    assert n == len(data.train_y) and metrics["partition-id"] == 3
    assert all(isinstance(d, np.ndarray) for d in delta)  # back on the host for Flower
    trained = manual_inner_loop(theta, data, derive_seed(7, 3, 5), device)
    for (name, before), d in zip(theta.items(), delta, strict=True):
        # sign: theta - delta_theta is the trained model
        torch.testing.assert_close(before - torch.from_numpy(d), trained[name].cpu(),
                                   rtol=1e-5, atol=1e-6)
    assert max(np.abs(d).max() for d in delta) > 1e-4  # it did train


def test_fit_reports_its_steps_how_many_were_clipped_and_the_largest_gradient_norm():
    torch.manual_seed(0)
    theta = {k: v.detach().clone() for k, v in CNNTarget(**KW).state_dict().items()}
    client, data = make_client()
    norms = []
    manual_inner_loop(theta, data, derive_seed(7, 3, 5), clip=float("inf"), norms=norms)
    clip = float(np.median(norms))  # a clip that shortens about half of the steps
    client.loop = InnerLoop(steps=20, batch_size=16, clip_norm=clip)
    delta, _, metrics = client.fit([v.numpy().copy() for v in theta.values()],
                                   {"server-round": 5})
    norms = []
    trained = manual_inner_loop(theta, data, derive_seed(7, 3, 5), clip=clip, norms=norms)
    assert metrics["steps"] == LOOP.steps
    assert 0 < metrics["clipped-steps"] == sum(n > clip for n in norms) < LOOP.steps
    assert metrics["largest-grad-norm"] == pytest.approx(max(norms), rel=1e-4)
    for (name, before), d in zip(theta.items(), delta, strict=True):
        torch.testing.assert_close(before - torch.from_numpy(d), trained[name],
                                   rtol=1e-5, atol=1e-6)


def test_inner_loop_seed_depends_on_round_and_partition():
    seeds = {derive_seed(7, p, r) for p in range(3) for r in range(3)}
    assert len(seeds) == 9
    assert derive_seed(7, 1, 2) == derive_seed(7, 1, 2)


def test_evaluate_reports_counts_for_val_and_test(device):
    client, data = make_client(device=device)
    arrays = [v.detach().numpy() for v in CNNTarget(**KW).state_dict().values()]
    loss, n, metrics = client.evaluate(arrays, {})
    assert n == len(data.val_y) == metrics["val-n"]
    assert metrics["test-n"] == len(data.test_y)
    assert 0 <= metrics["test-correct"] <= metrics["test-n"]
    assert loss == metrics["val-loss-sum"] / metrics["val-n"] > 0


def test_properties_tell_the_partition_id_and_parameter_count():
    client, _ = make_client(partition_id=6)
    # 7 -> 14 kernels (5x5), fc 224->120->84->10, biases included
    size = (7 * 25 + 7) + (14 * 7 * 25 + 14) + (224 * 120 + 120) + (120 * 84 + 84) + 850
    assert client.get_properties({}) == {"partition-id": 6, "num-parameters": size}


def test_pc_head_and_momentum_persist_in_the_state_record(device):
    state = RecordDict()
    arrays = [v.detach().numpy() for v in CNNTarget(**KW, local=True).state_dict().values()]
    client, _ = make_client(state=state, local=True, device=device)
    _, _, first = client.fit(arrays, {"server-round": 1})
    assert "head" in state and "head_momentum" in state
    assert first["head-fingerprint-in"] != first["head-fingerprint-out"]
    # a new client object (as Flower builds every round) on the same state
    client, _ = make_client(state=state, local=True, device=device)
    head, optimizer = client._head()
    momentum = state["head_momentum"].to_torch_state_dict()
    assert set(momentum) == {"fc.weight", "fc.bias"}
    for name, param in head.named_parameters():
        assert torch.equal(optimizer.state[param]["momentum_buffer"].cpu(), momentum[name])
    _, _, second = client.fit(arrays, {"server-round": 2})
    assert second["head-fingerprint-in"] == first["head-fingerprint-out"]


def test_head_mirror_keeps_what_a_resume_needs_and_restores_it(tmp_path):
    """Simulation mirror: with checkpoints every 3 rounds, a resume from the last
    checkpoint, or from the one before it (its fallback), finds the head as it was
    then, in a fresh Context.state."""
    mirror = tmp_path / "3"  # <mirror root>/<partition id>/<round>.pt
    arrays = [v.detach().numpy() for v in CNNTarget(**KW, local=True).state_dict().values()]
    state = RecordDict()
    fingerprints = {}
    for server_round in (1, 2, 4, 5, 7):
        client, _ = make_client(state=state, local=True, mirror=mirror)
        fingerprints[server_round] = client.fit(arrays, {"server-round": server_round})[2]
    # Checkpoints before round 7 started: round 6, and round 3 before it -> keep round 2
    # (the newest <= 3) and everything newer.
    kept = ["00000002", "00000004", "00000005", "00000007"]
    assert sorted(p.stem for p in mirror.glob("*.pt")) == kept
    discard_state_after(tmp_path, 6)  # resume from the round-6 checkpoint
    assert sorted(p.stem for p in mirror.glob("*.pt")) == kept[:3]
    client, _ = make_client(state=RecordDict(), local=True, mirror=mirror)  # new process
    resumed = client.fit(arrays, {"server-round": 7})[2]
    assert resumed["head-fingerprint-in"] == fingerprints[5]["head-fingerprint-out"]
    assert resumed["head-fingerprint-out"] == fingerprints[7]["head-fingerprint-out"]
    discard_state_after(tmp_path, 3)  # the round-6 checkpoint damaged: round 3's instead
    client, _ = make_client(state=RecordDict(), local=True, mirror=mirror)
    resumed = client.fit(arrays, {"server-round": 4})[2]
    assert resumed["head-fingerprint-in"] == fingerprints[2]["head-fingerprint-out"]
    assert resumed["head-fingerprint-out"] == fingerprints[4]["head-fingerprint-out"]
