import copy
import time

import numpy as np
import pytest
import torch
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from pFedHN.core import PFedHNCore, clip_gradients
from pFedHN.models import CNNHyper, CNNTarget, MHHyper, parameter_shapes
from pFedHN.schedule import evaluation_rounds
from pFedHN.strategy import (
    NO_PARAMETERS,
    FederationTooSmallError,
    PFedHNStrategy,
    pooled_metrics,
)
from tests.conftest import tiny_settings

LR, MOMENTUM, WD, CLIP = 1e-2, 0.9, 1e-3, 50.0


def server_settings(*overrides):
    """The outer optimizer of these tests (SGD), with ``overrides``."""
    return tiny_settings(f"server.lr={LR}", f"server.momentum={MOMENTUM}", f"server.wd={WD}",
                         f"server.clip_norm={CLIP}", "server.optimizer=sgd", *overrides).server


def make_core(seed=0, device="cpu"):
    torch.manual_seed(seed)
    hnet = CNNHyper(4, parameter_shapes(CNNTarget(1, 7, 10, 28)), n_hidden=1)
    return PFedHNCore(hnet, server_settings(), device)


def reference_step(hnet, partition_ids, deltas, buffers):
    """One outer step by plain autograd: grad of mean_i <theta_i(phi), delta_i>,
    clipped by hand, then SGD with momentum and weight decay written out."""
    objective = sum(
        sum((t * d).sum() for t, d in zip(hnet(i).values(), delta, strict=True))
        for i, delta in zip(partition_ids, deltas, strict=True)
    ) / len(partition_ids)
    params = list(hnet.parameters())
    grads = torch.autograd.grad(objective, params, allow_unused=True)  # None: not used
    norm = torch.sqrt(sum(g.square().sum() for g in grads if g is not None))
    scale = min(1.0, CLIP / (float(norm) + 1e-6))
    with torch.no_grad():
        for k, (p, g) in enumerate(zip(params, grads, strict=True)):
            if g is None:
                continue  # untouched, weight decay included
            d_p = g * scale + WD * p
            buffers[k] = d_p.clone() if buffers[k] is None else MOMENTUM * buffers[k] + d_p
            p -= LR * buffers[k]
    return float(norm)


@pytest.mark.parametrize("scale", [1e-3, 10.0])  # clipping inactive / active
def test_update_equals_autograd_of_inner_product(scale, device):
    core = make_core(device=device)
    assert core.hnet.embeddings.weight.device.type == device.type
    reference = copy.deepcopy(core.hnet)
    buffers = [None] * len(list(reference.parameters()))
    rng = np.random.default_rng(1)
    norms = []
    for ids in ([2], [0], [3, 1]):  # momentum carries over; then two clients at once
        deltas = [[scale * rng.standard_normal(t.shape).astype(np.float32)
                   for t in core.hnet(i).values()] for i in ids]
        core.update(ids, deltas)
        as_tensors = [[torch.from_numpy(d).to(device) for d in delta] for delta in deltas]
        norms.append(reference_step(reference, ids, as_tensors, buffers))
        pairs = zip(core.hnet.parameters(), reference.parameters(), strict=True)
        for ours, ref in pairs:
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)  # float32 sums
    assert (max(norms) > CLIP) == (scale > 1)


@pytest.mark.parametrize("max_norm_over_norm", [0.5, 1.0, 1 + 1e-7, 2.0])
def test_clip_gradients_leaves_what_torchs_clip_leaves_bit_for_bit(max_norm_over_norm):
    """Under the limit, at it and just over: the same gradients as clip_grad_norm_,
    which multiplies even when its factor is 1."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((300, 7), (11,), (5, 5))]
    params.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient: left alone
    for p in params[:3]:
        p.grad = torch.randn_like(p) * 3
    norm = torch.nn.utils.get_total_norm([p.grad for p in params[:3]])
    max_norm = float(norm) * max_norm_over_norm
    reference = [None if p.grad is None else p.grad.clone() for p in params]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for copy_, grad in zip(copies, reference, strict=True):
        copy_.grad = grad
    torch.nn.utils.clip_grad_norm_(copies, max_norm)
    clip_gradients(params, max_norm)
    for ours, theirs in zip(params, copies, strict=True):
        assert (ours.grad is None) == (theirs.grad is None)
        if ours.grad is not None:
            assert torch.equal(ours.grad, theirs.grad)
    shrunk = torch.nn.utils.get_total_norm([p.grad for p in params[:3]])
    assert (shrunk < norm) == (max_norm_over_norm < 1)


def test_clip_gradients_spreads_a_nan_norm_as_torchs_clip_does():
    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(2)]
    params[0].grad, params[1].grad = torch.tensor([1.0, float("nan"), 0, 0]), torch.ones(4)
    clip_gradients(params, 50.0)
    assert params[1].grad.isnan().all()  # torch multiplies every gradient by its NaN factor


def test_generate_returns_host_arrays_of_the_target_shapes(device):
    core = make_core(device=device)
    theta = core.generate(2)
    shapes = [tuple(s) for s in core.hnet.target_shapes.values()]
    assert [a.shape for a in theta] == shapes
    assert all(isinstance(a, np.ndarray) for a in theta)
    expected = [t.detach().cpu().numpy() for t in core.hnet(2).values()]
    assert all(np.array_equal(a, b) for a, b in zip(theta, expected, strict=True))


def test_only_the_sampled_clients_embedding_gets_a_gradient_signal():
    core = make_core()
    core.optimizer.param_groups[0]["weight_decay"] = 0.0
    before = core.hnet.embeddings.weight.detach().clone()
    deltas = [[np.ones(t.shape, np.float32) for t in core.hnet(1).values()]]
    core.update([1], deltas)
    moved = (core.hnet.embeddings.weight.detach() != before).any(dim=1)
    assert moved.tolist() == [False, True, False, False]


def test_evaluation_rounds_include_start_every_k_and_last():
    assert evaluation_rounds(100, 30) == {0, 30, 60, 90, 100}
    assert evaluation_rounds(90, 30) == {0, 30, 60, 90}


def test_pooled_accuracy_weights_clients_by_samples():
    results = [
        {"val-n": 10, "val-correct": 10, "val-loss-sum": 1.0,
         "test-n": 10, "test-correct": 9, "test-loss-sum": 2.0},
        {"val-n": 90, "val-correct": 0, "val-loss-sum": 9.0,
         "test-n": 30, "test-correct": 15, "test-loss-sum": 6.0},
    ]
    m = pooled_metrics(results)
    assert m["val_acc"] == pytest.approx(0.1)  # not the mean of 1.0 and 0.0
    assert m["test_acc"] == pytest.approx(24 / 40)
    assert m["val_loss"] == pytest.approx(0.1)
    assert (m["test_acc_min"], m["test_acc_max"]) == pytest.approx((0.5, 0.9))
    assert m["test_acc_std"] == pytest.approx(0.2)


class _Node(ClientProxy):
    """A connected node that is never asked anything (the check comes first)."""

    def get_properties(self, ins, timeout, group_id):
        raise AssertionError("asked a node before the federation was complete")

    get_parameters = fit = evaluate = reconnect = get_properties


def test_too_few_nodes_stop_the_run_naming_the_nodes_and_num_clients():
    strategy = PFedHNStrategy(tiny_settings("num_clients=4", "server.node_timeout=0.5"),
                              make_core())
    manager = SimpleClientManager()
    for cid in ("a", "b"):
        manager.register(_Node(cid))
    started = time.monotonic()
    with pytest.raises(FederationTooSmallError) as error:
        strategy.configure_fit(1, NO_PARAMETERS, manager)
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "needs 4 Flower nodes" in message and "has 2" in message
    assert "num_clients" in message and 'num-supernodes=4' in message


def _within_a_rounding(ours: torch.Tensor, default: torch.Tensor, lr: float) -> bool:
    eps = torch.finfo(torch.float32).eps
    return bool(((ours - default).abs() <= 2 * eps * (ours.abs() + lr)).all())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_fused_optimizer_steps_like_the_default_kernel_within_a_float_rounding(optimizer):
    """server.fused_adam (MH-pFedHN's hypernetwork), server.fused_sgd (pFedHN's):
    torch's fused kernels. From the same state and delta a fused step is the
    default kernel's up to a float32 rounding; a resume may switch kernels."""
    rng = np.random.default_rng(3)
    lr = 2e-4 if optimizer == "adam" else LR

    def delta_for(core, i):
        return [[(0.01 * rng.standard_normal(t.shape)).astype(np.float32)
                 for t in core.hnet(i).values()]]

    torch.manual_seed(0)
    hnet = MHHyper([1000, 3000], chunk_size=256) if optimizer == "adam" else make_core().hnet
    strategies = {fused: PFedHNCore(copy.deepcopy(hnet), server_settings(
        f"server.optimizer={optimizer}", f"server.lr={lr}", f"server.fused_{optimizer}={fused}"))
                  for fused in (True, False)}
    fused, default = strategies[True], strategies[False]
    for i in (0, 1, 0):  # the optimizer's state builds up under the fused kernel ...
        fused.update([i], delta_for(fused, i))
    # ... then both continue from that state, as a resume under the other kernel would.
    default.hnet.load_state_dict(fused.hnet.state_dict())
    default.load_optimizer_state(copy.deepcopy(fused.optimizer_state()))  # as if read
    assert default.optimizer.param_groups[0]["fused"] is None
    assert fused.optimizer.param_groups[0]["fused"] is True
    before = copy.deepcopy(fused.hnet.state_dict())
    delta = delta_for(fused, 1)
    for core in (fused, default):
        core.update([1], delta)
    moved = 0
    for (name, ours), theirs in zip(fused.hnet.state_dict().items(),
                                    default.hnet.state_dict().values(), strict=True):
        moved += not torch.equal(ours, before[name])
        assert _within_a_rounding(ours, theirs, lr), name
    assert moved >= 4  # trunk, embedding and head stepped: the comparison means something
