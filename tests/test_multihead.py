"""MH-pFedHN's multi-head hypernetwork: sizes only, shared heads, the VJP update."""

import copy

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from pFedHN.client import Distillation, InnerLoop, LocalStore, PFedHNClient, Training
from pFedHN.config import ConfigError, load_settings
from pFedHN.core import PFedHNCore
from pFedHN.dataset import DATASETS, federated_data
from pFedHN.experiment import prepare, run
from pFedHN.export import export, load_client_model
from pFedHN.models import MHHyper
from pFedHN.settings import SplitSettings
from pFedHN.strategy import Exchange, PFedHNStrategy, RoundsFailingError, payload_bytes
from pFedHN.zoo import make_client_model
from tests.conftest import TINY_MNIST, TINY_OVERRIDES, compose_config, tiny_settings
from tests.test_dataset import write_image_folder
from tests.test_export import exported_test_accuracies, recorded
from tests.test_strategy import CLIP, LR, MOMENTUM, WD, reference_step, server_settings

# torch's fused SGD fails on MH-pFedHN's per-client embeddings (the config refuses it there).
DEFAULT_SGD = ("server.fused_sgd=false",)


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
    core = PFedHNCore(hnet, server_settings(*DEFAULT_SGD))
    before = copy.deepcopy(hnet.state_dict())
    core.update([0], [[np.ones(1000, np.float32)]])
    after = hnet.state_dict()
    assert not torch.equal(after["head_weights.4"], before["head_weights.4"])
    assert not torch.equal(after["embeddings.0"], before["embeddings.0"])
    for unused in ("head_weights.12", "head_biases.12", "embeddings.1", "embeddings.2"):
        assert torch.equal(after[unused], before[unused]), unused  # no decay either


def test_update_equals_autograd_for_a_heterogeneous_pair():
    torch.manual_seed(0)
    hnet = MHHyper([1000, 3000], chunk_size=256, embedding_dim=8, hidden_dim=16)
    core = PFedHNCore(hnet, server_settings(*DEFAULT_SGD))
    reference = copy.deepcopy(core.hnet)
    buffers = [None] * len(list(reference.parameters()))
    rng = np.random.default_rng(2)
    for ids in ([1], [0, 1], [0]):
        deltas = [[rng.standard_normal(hnet.sizes[i]).astype(np.float32)] for i in ids]
        core.update(ids, deltas)
        reference_step(reference, ids, [[torch.from_numpy(d[0])] for d in deltas], buffers)
        for ours, ref in zip(core.hnet.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_written_out_vjp_equals_autograds_for_exactly_the_parameters_asked_for():
    torch.manual_seed(0)
    hnet = MHHyper([1000, 3000, 900], chunk_size=256, embedding_dim=8, hidden_dim=16)
    everything = set(hnet.parameters())
    for i in (1, 0, 2, 1):  # heads of 12 and 4 chunks in turn: one buffer serves both
        delta = torch.randn(hnet.sizes[i])
        ours = hnet.vjp(i, [delta], everything)
        uses = {hnet.embeddings[i], *hnet.trunk.parameters(), *hnet.head(hnet.chunks[i])}
        assert set(ours) == uses
        used = [p for p in hnet.parameters() if p in uses]
        expected = torch.autograd.grad(hnet(i)["theta"], used, delta)
        for param, grad in zip(used, expected, strict=True):
            torch.testing.assert_close(ours[param], grad, rtol=1e-5, atol=1e-7)
    # the novel phase asks for embeddings only: no head gradient is made
    asked = {hnet.embeddings[0], hnet.embeddings[1]}
    assert list(hnet.vjp(0, [torch.randn(1000)], asked)) == [hnet.embeddings[0]]


def test_a_delta_of_another_clients_size_is_rejected():
    core = PFedHNCore(MHHyper([1000, 3000], chunk_size=256), server_settings(*DEFAULT_SGD))
    assert core.check_delta([np.zeros(3000, np.float32)], 1) is None
    assert "expected (1000,)" in core.check_delta([np.zeros(3000, np.float32)], 0)


# --- the MH-pFedHN client ---------------------------------------------------------

MNIST_ZOO = {"in_channels": 1, "num_classes": 10, "input_size": 28}


def mh_client(partition_id, name, state, global_model=None, epochs=1):
    """A tiny-MNIST MH-pFedHN client of architecture ``name``, on ``state``."""
    data = federated_data(DATASETS["mnist"], str(TINY_MNIST),
                          SplitSettings(10, 2, 500, 0))[partition_id]
    loop = InnerLoop(batch_size=32, weight_decay=5e-4, epochs=epochs)
    return PFedHNClient(partition_id, data, make_client_model(name, **MNIST_ZOO),
                        Training(loop, seed=3, out_dim=10, flat=True), store=LocalStore(state),
                        global_model=global_model and make_client_model(global_model, **MNIST_ZOO))


def test_client_cuts_flat_theta_returns_flat_delta_and_keeps_batch_norm_statistics():
    state = RecordDict()
    client = mh_client(2, "resnet10-16", state)
    size = client.get_properties({})["num-parameters"]
    assert set(client.get_properties({})) == {"partition-id", "num-parameters"}  # no architecture
    theta = torch.randn(size, generator=torch.Generator().manual_seed(0)) * 0.05
    delta, n, _ = client.fit([theta.numpy()], {"server-round": 1})
    assert len(delta) == 1 and delta[0].shape == (size,) and n == len(client.data.train_y)
    trained = torch.cat([p.detach().flatten() for p in client.model.parameters()])
    torch.testing.assert_close(torch.from_numpy(delta[0]), theta - trained)
    saved = state["buffers"].to_torch_state_dict()
    assert saved.keys() == dict(client.model.named_buffers()).keys()
    assert saved["stem.1.running_mean"].abs().sum() > 0  # it learned statistics
    # Flower builds a new client every round: the statistics come back from the state.
    again = mh_client(2, "resnet10-16", state)
    again.evaluate([theta.numpy()], {})
    for name, tensor in again.model.named_buffers():
        assert torch.equal(tensor, saved[name]), name
    # and the generated weights are exactly theta, cut in parameter order
    torch.testing.assert_close(
        torch.cat([p.detach().flatten() for p in again.model.parameters()]), theta)


def test_distillation_loss_is_the_weighted_kl_and_cross_entropy():
    torch.manual_seed(0)
    logits, teacher, labels = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    alpha, t = 0.2, 15.0
    p_teacher = torch.softmax(teacher / t, 1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(logits / t, 1))).sum(1).mean()
    ce = -torch.log_softmax(logits, 1)[torch.arange(5), labels].mean()
    expected = alpha * t * t * kl + (1 - alpha) * ce
    torch.testing.assert_close(Distillation(alpha, t).loss(logits, teacher, labels), expected)
    torch.testing.assert_close(Distillation(0.0, t).loss(logits, teacher, labels), ce)


def test_global_phase_trains_the_global_model_and_personal_phase_distils_from_it():
    client = mh_client(1, "vgg8-16", RecordDict(), global_model="cnn")
    theta_own = torch.randn(client.get_properties({})["num-parameters"]) * 0.05
    theta_global = torch.randn(sum(p.numel() for p in client.global_model.parameters())) * 0.05
    delta, _, _ = client.fit([theta_global.numpy()], {"server-round": 1, "phase": "global"})
    assert delta[0].shape == theta_global.shape and np.abs(delta[0]).max() > 0
    distilled, _, _ = client.fit([theta_own.numpy(), theta_global.numpy()],
                                 {"server-round": 1, "distill": True})
    assert distilled[0].shape == theta_own.shape
    # the teacher was loaded with the global theta and left as it came
    torch.testing.assert_close(
        torch.cat([p.detach().flatten() for p in client.global_model.parameters()]), theta_global)
    # same batches without the teacher: a different update, so the teacher was used
    plain = mh_client(1, "vgg8-16", RecordDict(), global_model="cnn")
    alone, _, _ = plain.fit([theta_own.numpy()], {"server-round": 1})
    assert not np.allclose(alone[0], distilled[0])


def test_global_phase_trains_unclipped_as_the_authors_do_and_personal_phase_clips():
    def fitted(clip_norm, config, thetas):
        client = mh_client(1, "cnn", RecordDict(), global_model="cnn")
        client.loop = InnerLoop(batch_size=32, weight_decay=5e-4, epochs=1, clip_norm=clip_norm)
        return client.fit([t.numpy() for t in thetas], {"server-round": 1} | config)[0][0]

    size = sum(p.numel() for p in make_client_model("cnn", **MNIST_ZOO).parameters())
    theta = torch.randn(size, generator=torch.Generator().manual_seed(1)) * 0.05
    tight, loose = 1e-4, None  # a clip far below the gradients' norm, and none
    np.testing.assert_array_equal(fitted(tight, {"phase": "global"}, [theta]),
                                  fitted(loose, {"phase": "global"}, [theta]))
    # the personal phase (here distilling from the same theta) does clip
    clipped = fitted(tight, {"distill": True}, [theta, theta])
    assert np.abs(clipped).max() < 0.5 * np.abs(fitted(loose, {"distill": True},
                                                       [theta, theta])).max()


def test_epochs_are_shuffled_passes_with_a_smaller_last_batch():
    order, sizes = InnerLoop(batch_size=32, epochs=2).batches(70, torch.Generator())
    assert sizes == [32, 32, 6, 32, 32, 6]
    for one_pass in order.split(70):
        assert sorted(one_pass.tolist()) == list(range(70))
    order, sizes = InnerLoop(steps=3, batch_size=32).batches(70, torch.Generator())
    assert sizes == [32, 32, 32] and len(order) == 96  # pFedHN: independent draws


def mh_settings(*overrides):
    """MH-pFedHN on tiny MNIST, two clients (Adam, as the authors' preset), plus ``overrides``."""
    return tiny_settings("algorithm=mh_pfedhn", "num_clients=2", "server.clients_per_round=2",
                         *overrides)


class _Proxy:
    def __init__(self, cid):
        self.cid = cid


def test_global_phase_steps_the_virtual_client_on_the_sample_weighted_delta():
    torch.manual_seed(0)
    sizes = [1000, 3000, 700]  # two clients, then the global model
    settings = mh_settings("algorithm=mh_pfedhngd", "server.optimizer=sgd",
                           "server.fused_sgd=false", f"server.lr={LR}",
                           f"server.momentum={MOMENTUM}", f"server.wd={WD}",
                           f"server.clip_norm={CLIP}")
    strategy = PFedHNStrategy(settings, PFedHNCore(MHHyper(
        sizes, chunk_size=256, embedding_dim=8, hidden_dim=16), settings.server))
    assert strategy.global_id == 2
    strategy.nodes.know(object(), {0: _Proxy("a"), 1: _Proxy("b")})
    assert next(strategy.round(1)).phase == "global"
    reference = copy.deepcopy(strategy.core.hnet)
    rng = np.random.default_rng(0)
    deltas = [rng.standard_normal(700).astype(np.float32) for _ in range(2)]
    examples = [30, 90]
    results = [(_Proxy(cid), FitRes(Status(Code.OK, ""), ndarrays_to_parameters([d]), n, {}))
               for cid, d, n in zip("ab", deltas, examples, strict=True)]
    recorded = []
    strategy.on_fit = lambda *args: recorded.append(args)
    strategy.aggregate_fit(1, results, [])
    weighted = (30 * deltas[0].astype(np.float64) + 90 * deltas[1]) / 120
    reference_step(reference, [2], [[torch.from_numpy(weighted.astype(np.float32))]],
                   [None] * len(list(reference.parameters())))
    for ours, ref in zip(strategy.core.hnet.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    assert recorded == []  # the round is recorded once, after the personal phase
    # a client sending a delta of its own model's size in the global phase is refused,
    # and so is the round (a redo would give the same delta): the hypernetwork stays
    before = copy.deepcopy(strategy.core.hnet.state_dict())
    own_size = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.ones(1000, np.float32)]),
                      30, {})
    with pytest.raises(RoundsFailingError, match=r"clients \[0\] \(theta has shape") as error:
        strategy.aggregate_fit(2, [(_Proxy("a"), own_size), results[1]], [])
    assert not error.value.redo  # client 0's delta would come back the same
    assert all(torch.equal(v, before[k]) for k, v in strategy.core.hnet.state_dict().items())


@pytest.mark.simulation
def test_three_architectures_learn_in_a_flower_simulation_and_export_their_models(tmp_path):
    """MH-pFedHNGD end to end: sizes reported, both phases, batch-norm state kept;
    each client's exported network (its own architecture) scores what the run recorded."""
    names = ["mh-cnn", "mh-vgg8", "mh-resnet10"]  # the authors' zoo; only the ResNet has BN
    cfg = compose_config(TINY_OVERRIDES + [
        "algorithm=mh_pfedhngd", "num_clients=3", f"model.architectures=[{','.join(names)}]",
        "num_rounds=8", "eval_every=8", "client.epochs=3", "server.lr=5e-4",
    ])
    results = run(cfg, tmp_path)
    first, last = results["evaluations"][0], results["evaluations"][-1]
    assert first["test_acc"] < 0.3
    # Learnt beyond each client's label mix: measured here 0.734 after 8 rounds against a
    # majority-class level of 0.593 (the authors' split of tiny MNIST, 3 clients).
    majority = results["split"]["majority_class_acc"]["test"]
    assert last["test_acc"] > majority + 0.1 and last["clients_evaluated"] == 3
    # One client per network: each network's pooled accuracy is its one client's.
    by_network = last["test_acc_by_network"]
    assert sorted(by_network) == sorted(names)
    assert min(by_network.values()) == last["test_acc_min"]
    assert max(by_network.values()) == last["test_acc_max"]
    sizes = [sum(p.numel() for p in make_client_model(n, **MNIST_ZOO).parameters())
             for n in names]
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["strategy"]["client_sizes"] == dict(enumerate(sizes))
    # Per round: the global theta to each client, then its own theta plus the teacher.
    def nbytes(*counts):
        return payload_bytes(ndarrays_to_parameters([np.zeros(k, np.float32) for k in counts]))
    global_size = sizes[0]  # the global model is the authors' CNN, as client 0's
    per_round = sum(nbytes(global_size) + nbytes(k, global_size) for k in sizes)
    assert results["communication"]["last_training_round_sent_bytes"] == per_round
    for partition in range(3):  # batch-norm statistics mirrored for resume (not the CNN's)
        kept = list((tmp_path / "client_state" / str(partition)).glob("*.pt"))
        assert bool(kept) == (names[partition] == "mh-resnet10")
    # Exported: each client's own architecture, the ResNet with its batch-norm statistics.
    settings = prepare(cfg)
    for which, server_round in (("best", results["best_round"]), ("last", 8)):
        export(tmp_path, which)
        index, accuracies = exported_test_accuracies(tmp_path, settings)
        assert accuracies == recorded(tmp_path, server_round)
        assert [index["clients"][str(i)]["network"]["name"] for i in range(3)] == names
    resnet = load_client_model(tmp_path, 2).network  # statistics of its training, not 1s
    assert not torch.equal(resnet.bn1.running_var, torch.ones_like(resnet.bn1.running_var))
    # The global model (no batch norm: one for everyone) is exported beside them.
    global_model = load_client_model(tmp_path, "global")
    data = federated_data(DATASETS["mnist"], str(TINY_MNIST), settings.split)
    assert global_model(data[0].test_x[:5].float() / 255).shape == (5, 10)


@pytest.mark.parametrize("override,key", [
    ("model.architectures=resnet50-16", "model.architectures"),
    ("model.architectures=[cnn,vgg8-16]", "model.architectures"),  # 2 names, 10 clients
    ("model.architectures=vgg8", "model.architectures"),  # no width
    ("model.global_model=vgg9-16", "model.global_model"),
    ("model.chunk_size=0", "model.chunk_size"),
    ("server.optimizer=rmsprop", "server.optimizer"),
    ("client.distill_alpha=1.5", "client.distill_alpha"),
    ("novel.dirichlet_alpha=0.5", "novel.dirichlet_alpha"),  # a redraw needs pFedHN split
])
def test_bad_mh_settings_name_the_key(override, key):
    cfg = compose_config(TINY_OVERRIDES + ["algorithm=mh_pfedhngd", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(cfg)


def test_an_input_the_zoo_cannot_take_is_refused_before_any_work(tmp_path):
    write_image_folder(tmp_path)  # 3 classes
    cfg = compose_config(["algorithm=mh_pfedhn", "dataset.data=folder", f"dataset.root={tmp_path}",
                          "dataset.image_size=64", "num_clients=3", "model.out_dim=3"])
    with pytest.raises(ConfigError, match=r"model\.architectures='mh-cnn'.*not 3 x 64 x 64"):
        load_settings(cfg)


def test_novel_clients_learn_their_embeddings_and_only_unseen_heads():
    torch.manual_seed(0)
    hnet = MHHyper([1000, 900, 3000, 1000], chunk_size=256, embedding_dim=8, hidden_dim=16)
    assert hnet.chunks == [4, 4, 12, 4]  # novel client 2: a size no training client has
    settings = mh_settings("num_clients=2", "novel.num_clients=2", "novel.rounds=3",
                           "novel.lr=1e-2", "novel.optimizer=sgd", "server.fused_sgd=false")
    strategy = PFedHNStrategy(settings, PFedHNCore(hnet, settings.server))
    strategy.learn_embeddings_only([2, 3], settings.novel, momentum=0.9)
    before = copy.deepcopy(hnet.state_dict())
    strategy.core.update([2, 3], [[np.ones(3000, np.float32)], [np.ones(1000, np.float32)]])
    after = hnet.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved == {"embeddings.2", "embeddings.3", "head_weights.12", "head_biases.12"}


def test_a_checkpoint_rebuilds_the_hypernetwork_from_the_reported_sizes():
    def make(sizes):
        torch.manual_seed(1)
        return MHHyper(sizes, chunk_size=256, embedding_dim=8, hidden_dim=16)

    settings = mh_settings()
    strategy, resumed = (PFedHNStrategy(settings, make_core=lambda sizes: PFedHNCore(
        make(sizes), settings.server, client_sizes=dict(enumerate(sizes)))) for _ in range(2))
    assert strategy.core is None  # nothing to build before the clients report
    strategy.load_model_state({"client_sizes": {0: 1000, 1: 3000},
                               "hnet": make([1000, 3000]).state_dict()})
    strategy.core.update([1], [[np.ones(3000, np.float32)]])
    state = strategy.state_dict(7)
    resumed.load_state_dict(state)
    assert resumed.core.hnet.sizes == [1000, 3000] and resumed.schedule.start_round == 7
    for ours, saved in zip(resumed.core.hnet.state_dict().values(), state["hnet"].values(),
                           strict=True):
        assert torch.equal(ours, saved)
    assert resumed.core.optimizer_state()["state"].keys() == \
        strategy.core.optimizer_state()["state"].keys()


def test_mh_pfedhngd_teacher_is_the_global_model_from_before_the_global_step():
    torch.manual_seed(0)
    settings = mh_settings("algorithm=mh_pfedhngd", "server.lr=1e-1",
                           "server.sequential=false")
    strategy = PFedHNStrategy(settings, PFedHNCore(MHHyper(
        [1000, 3000, 700], chunk_size=256, embedding_dim=8, hidden_dim=16), settings.server))
    nodes = object()  # partitions already discovered in this run
    strategy.nodes.know(nodes, {0: _Proxy("a"), 1: _Proxy("b")})
    exchanges = strategy.round(1)
    global_phase = next(exchanges)
    assert global_phase.phase == "global" and sorted(global_phase.partitions) == [0, 1]
    sent = strategy.configure_fit(1, None, nodes)
    before = parameters_to_ndarrays(sent[0][1].parameters)
    results = [(proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
        [np.full(700, 0.5, np.float32)]), 10, {})) for proxy, _ in sent]
    strategy.aggregate_fit(1, results, [])
    after = strategy.core.generate(2)
    assert not np.allclose(before[0], after[0])  # the global phase stepped it
    assert next(exchanges) == Exchange("personal", global_phase.partitions)
    for proxy, ins in strategy.configure_fit(1, None, nodes):
        own, teacher = parameters_to_ndarrays(ins.parameters)
        assert own.shape == (1000,) if proxy.cid == "a" else own.shape == (3000,)
        np.testing.assert_array_equal(teacher, before[0])


def test_sequential_round_equals_single_client_steps_in_order_by_plain_torch():
    """MH-pFedHN's round as the authors run it: each client in turn, one Adam step each."""
    torch.manual_seed(0)
    sizes = [1000, 3000, 1000, 700]
    hnet = MHHyper(sizes, chunk_size=256, embedding_dim=8, hidden_dim=16)
    reference = copy.deepcopy(hnet)
    settings = mh_settings("num_clients=4", "server.clients_per_round=4", "server.lr=1e-2",
                           "server.wd=0", f"server.clip_norm={CLIP}", "server.sequential=true",
                           "seed=7")
    strategy = PFedHNStrategy(settings, PFedHNCore(hnet, settings.server))
    nodes = object()
    strategy.nodes.know(nodes, {i: _Proxy(str(i)) for i in range(4)})

    def local_training(theta):  # a stand-in whose delta depends on the theta it got
        return (0.3 * np.tanh(theta) + 0.01).astype(np.float32)

    recorded = []
    strategy.on_fit = lambda r, clients, server: recorded.append((r, len(clients)))
    initial = copy.deepcopy(hnet)
    for server_round in (1, 2):
        visited = []
        for k, exchange in enumerate(strategy.round(server_round)):
            assert exchange.phase == "personal" and len(exchange.partitions) == 1
            clients = exchange.partitions
            visited += clients
            [(proxy, ins)] = strategy.configure_fit(server_round, None, nodes)
            [theta] = parameters_to_ndarrays(ins.parameters)
            # Generated by the hypernetwork as the previous client's step left it.
            fresh = initial(clients[0])["theta"].detach().numpy()
            assert np.allclose(theta, fresh) == (server_round == 1 and k == 0)
            delta = ndarrays_to_parameters([local_training(theta)])
            strategy.aggregate_fit(server_round, [(proxy, FitRes(Status(Code.OK, ""), delta, 10,
                                                                 {}))], [])
        assert sorted(visited) == [0, 1, 2, 3]
    assert recorded == [(1, 4), (2, 4)]  # one record per round, every client in it

    # Plain torch: a fresh random order each round, one clipped Adam step per client.
    order = np.random.default_rng(7)
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    params = list(reference.parameters())
    for _ in range(2):
        for client in order.choice(4, 4, replace=False):
            theta = reference(int(client))["theta"]
            delta = torch.from_numpy(local_training(theta.detach().numpy()))
            grads = torch.autograd.grad((theta * delta).sum(), params, allow_unused=True)
            norm = torch.sqrt(sum(g.square().sum() for g in grads if g is not None))
            for p, g in zip(params, grads, strict=True):
                p.grad = None if g is None else g * min(1.0, CLIP / (float(norm) + 1e-6))
            adam.step()
            adam.zero_grad(set_to_none=True)
    for ours, ref in zip(strategy.core.hnet.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_a_client_visit_steps_only_its_own_head_however_many_other_heads_exist():
    """The server's work per visit (gradients, clipping, Adam's state and step) covers the
    trunk, the client's embedding and its head only: the same with 1 or 4 heads."""
    def touched_by_one_visit(sizes):
        torch.manual_seed(0)
        hnet = MHHyper(sizes, chunk_size=256, embedding_dim=8, hidden_dim=16)
        core = PFedHNCore(hnet, mh_settings("server.lr=2e-4", "server.wd=0").server)
        before = copy.deepcopy(hnet.state_dict())
        core.update([0], [[np.ones(sizes[0], np.float32)]])
        names = {id(p): n for n, p in hnet.named_parameters()}
        stepped = sorted(names[id(p)] for p in core.optimizer.state)
        changed = sorted(n for n, t in hnet.state_dict().items() if not torch.equal(t, before[n]))
        return stepped, changed, sum(p.numel() for p in core.optimizer.state)

    alone = touched_by_one_visit([1000])
    crowded = touched_by_one_visit([1000, 3000, 6000, 9000])
    assert alone == crowded
    assert {n.split(".")[0] for n in alone[0]} == {"embeddings", "trunk", "head_weights",
                                                   "head_biases"}
    assert all(n.endswith(".4") for n in alone[0] if n.startswith("head"))  # 1000/256 -> 4
