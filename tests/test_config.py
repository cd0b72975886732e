"""The seed README's commands compose, and bad input fails fast and clearly."""

import dataclasses
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from pFedHN.config import ConfigError, load_settings, ray_init_args
from pFedHN.dataset import DataNotFoundError
from pFedHN.experiment import prepare
from pFedHN.models import make_target, parameter_shapes
from pFedHN.networks import target_kwargs
from pFedHN.results import PAPER, preset_command
from pFedHN.server import build_strategy
from pFedHN.settings import Settings
from pFedHN.zoo import make_client_model
from tests.conftest import REPO, TINY_OVERRIDES, compose_config

SEED_COMMANDS = {
    "defaults": [],
    "cifar100": ['dataset.data="cifar100"', "model.out_dim=100", "client.num_classes_per_node=10"],
    "mnist": ['dataset.data="mnist"', "model.n_kernels=7", "model.in_channels=1",
              "model.n_hidden=1"],
    "pc": ["model.local=True", "model.variant=1", "server.lr=5e-2"],
    "cifar100-pc": ['dataset.data="cifar100"', "model.out_dim=100",
                    "client.num_classes_per_node=10", "model.local=True", "model.variant=1",
                    "server.lr=5e-2"],
}


@pytest.mark.parametrize("name", SEED_COMMANDS)
def test_seed_readme_commands_compose_and_validate(name):
    overrides = SEED_COMMANDS[name]
    result = subprocess.run(
        [sys.executable, "-m", "pFedHN.main", *overrides, "--cfg", "job"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    load_settings(cfg)
    for override in overrides:
        key, value = override.split("=")
        assert OmegaConf.select(cfg, key) == OmegaConf.create(f"v: {value}").v


@pytest.mark.parametrize("preset,long_form", [
    (["data=mnist"], "mnist"),
    (["algorithm=pfedhn_pc"], "pc"),
    (["data=cifar100"], "cifar100"),
    (["data=cifar100", "algorithm=pfedhn_pc"], "cifar100-pc"),
])
def test_presets_equal_the_seed_readme_commands(preset, long_form):
    assert compose_config(preset) == compose_config(SEED_COMMANDS[long_form])


def test_pfedhn_pc_on_mnist_takes_its_own_outer_lr_unless_overridden():
    # CIFAR's 5e-2 collapses pFedHN-PC on MNIST (measured; see conf/tuned/).
    assert compose_config(["data=mnist", "algorithm=pfedhn_pc"]).server.lr == 1e-2
    assert compose_config(["data=mnist", "algorithm=pfedhn_pc", "server.lr=5e-2"]).server.lr \
        == 5e-2
    assert compose_config(["data=mnist", *SEED_COMMANDS["pc"]]).server.lr == 5e-2
    for data in ("cifar10", "cifar100", "cinic10", "omniglot"):
        assert compose_config([f"data={data}", "algorithm=pfedhn_pc"]).server.lr == 5e-2


def test_every_paper_row_without_a_run_has_a_command_for_its_setting():
    for key in PAPER:
        overrides = preset_command(key).split()[3:]
        cfg = compose_config(overrides)
        load_settings(cfg)
        assert (cfg.dataset.data, cfg.model.variant, cfg.num_clients) == key


def test_defaults_are_the_authors_cifar10_setting():
    cfg = compose_config([])
    assert (cfg.dataset.data, cfg.num_clients, cfg.num_rounds, cfg.eval_every) == \
        ("cifar10", 50, 5000, 30)
    assert (cfg.model.variant, cfg.model.local, cfg.model.n_kernels, cfg.model.n_hidden) == \
        (0, False, 16, 3)
    assert (cfg.client.inner_steps, cfg.client.batch_size, cfg.client.inner_lr,
            cfg.client.inner_wd) == (50, 64, 5e-3, 5e-5)
    assert (cfg.server.lr, cfg.server.momentum, cfg.server.wd, cfg.server.clip_norm) == \
        (1e-2, 0.9, 1e-3, 50.0)


@pytest.mark.parametrize("override,key", [
    ("dataset.data=svhn", "dataset.data"),
    ("client.num_classes_per_node=11", "client.num_classes_per_node"),
    ("model.variant=7", "model.variant"),
    ("model.local=True", "model.local"),  # PC needs model.variant=1 too
    ("model.in_channels=3", "model.in_channels"),
    ("model.out_dim=100", "model.out_dim"),
    ("num_rounds=0", "num_rounds"),
    ("server.lr=-1", "server.lr"),
    ("client.batch_size=0", "client.batch_size"),
    ("eval_every=1000", "eval_every"),
    ("server.node_timeout=0", "server.node_timeout"),
    ("server.max_failed_rounds=0", "server.max_failed_rounds"),
    ("server.max_failed_rounds=1.5", "server.max_failed_rounds"),
    ("server.fused_adam=maybe", "server.fused_adam"),
    ("server.fused_sgd=maybe", "server.fused_sgd"),
    ("server.visit_retries=-1", "server.visit_retries"),
    ("server.visit_retries=true", "server.visit_retries"),
    ("server.accept_lost_visits=sometimes", "server.accept_lost_visits"),
    ("simulation.poll_interval=-0.1", "simulation.poll_interval"),
    ("simulation.inline_bytes=0.5", "simulation.inline_bytes"),
    ("simulation.max_restarts=-1", "simulation.max_restarts"),
    ("simulation.max_restarts=1.5", "simulation.max_restarts"),
    ("simulation.max_restarts=true", "simulation.max_restarts"),
    ("simulation.restart_backoff_s=-5", "simulation.restart_backoff_s"),
    ("simulation.restart_backoff_s=soon", "simulation.restart_backoff_s"),
])
def test_bad_values_name_the_key(override, key):
    cfg = compose_config(TINY_OVERRIDES + ["num_rounds=100", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(cfg)


@pytest.mark.parametrize("optimizer", ["server.optimizer=sgd", "novel.optimizer=sgd"])
def test_mh_pfedhn_with_sgd_asks_for_the_default_sgd_kernel(optimizer):
    """torch's fused SGD fails on MH-pFedHN's per-client parameters: refused up front."""
    mh = TINY_OVERRIDES + ["algorithm=mh_pfedhn", "num_clients=2", optimizer]
    with pytest.raises(ConfigError, match=r"server\.fused_sgd.*false for MH-pFedHN with SGD"):
        load_settings(compose_config(mh))
    assert load_settings(compose_config([*mh, "server.fused_sgd=false"])).server.fused_sgd is False
    assert load_settings(compose_config(mh[:-1])).server.fused_sgd  # Adam: fused SGD unused


@pytest.mark.parametrize("overrides,system_config", [
    ([], {"max_direct_call_object_size": 4 * 2**20}),
    (["simulation.inline_bytes=123456"], {"max_direct_call_object_size": 123456}),
    (["simulation.inline_bytes=null"], None),  # Ray's own threshold
    (["simulation.ray_address=auto"], None),  # a running cluster keeps its settings
])
def test_ray_passes_messages_inline_up_to_inline_bytes_on_its_own_instance(overrides,
                                                                           system_config):
    # A misspelt Ray key would stop Ray from starting: the simulation tests use the default.
    args = ray_init_args(load_settings(compose_config(TINY_OVERRIDES + overrides)))
    assert args.get("_system_config") == system_config
    assert args["include_dashboard"] is False
    assert args.get("address") == ("auto" if "simulation.ray_address=auto" in overrides else None)


@pytest.mark.parametrize("override,message", [
    ("num_clients=400", "would get no val samples"),
    ("dataset.val_size=2500", "dataset.val_size=2500 is not valid"),
])
def test_more_clients_than_the_data_can_serve_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        prepare(compose_config(TINY_OVERRIDES + [override]))


def test_missing_data_offline_fails_before_any_work(tmp_path):
    cfg = compose_config(TINY_OVERRIDES + [f"dataset.root={tmp_path}"])
    with pytest.raises(DataNotFoundError, match="MNIST/raw"):
        prepare(cfg)


def test_bad_input_exits_with_one_clear_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pFedHN.main", "dataset.data=imagenet",
         f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "dataset.data='imagenet' is not valid" in result.stderr
    assert "Traceback" not in result.stderr


MH_PROTOCOL = ["num_rounds=500", "model.variant=2", "model.architectures=blocks",
               "model.embed_dim=64", "model.hidden_dim=128", "model.n_hidden=2",
               "client.epochs=1", "client.inner_wd=5e-4", "server.optimizer=adam",
               "server.lr=2e-4", "server.wd=0.0", "server.clients_per_round=50",
               "dataset.local_test_share=0.25", "client.partition=mh-authors", "eval_every=1",
               "server.sequential=true", "server.fused_adam=true",
               # run_test.py's novel clients: Adam 2e-4, evaluated every round
               "novel.optimizer=adam", "novel.lr=2e-4", "novel.eval_every=1"]


@pytest.mark.parametrize("preset,long_form", [
    (["algorithm=mh_pfedhn"], MH_PROTOCOL),
    (["algorithm=mh_pfedhngd"], [*MH_PROTOCOL, "model.variant=3"]),
])
def test_mh_presets_set_the_papers_protocol(preset, long_form):
    """REFERENCE section 6: all clients, Adam 2e-4, one local pass, 500 rounds, 75/25."""
    cfg = compose_config(preset)
    load_settings(cfg)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    assert resolved == compose_config(long_form)


@pytest.mark.parametrize("overrides", [
    ["dataset.data=folder", "dataset.image_size=28"],
    ["data=cinic10"],
    ["dataset.data=folder", "algorithm=mh_pfedhngd", "num_clients=5"],
])
def test_a_server_without_the_images_builds_its_hypernetwork_from_the_config(
    tmp_path, overrides
):
    """A deployed server (prepare(check_data=False)) never lists image folders."""
    cfg = compose_config([*overrides, f"dataset.root={tmp_path / 'only_on_the_nodes'}",
                          "device=cpu"])
    with pytest.raises(DataNotFoundError):  # where the data is needed, its absence shows
        prepare(cfg)
    server_cfg = prepare(cfg, check_data=False)
    strategy = build_strategy(server_cfg)
    size = server_cfg.dataset.image_size if "dataset.data=folder" in overrides else 32
    if strategy.make_core is None:
        target = make_target(**target_kwargs(server_cfg))
        assert strategy.core.hnet.shapes(0) == parameter_shapes(target)
        assert target_kwargs(server_cfg)["input_size"] == size
    else:  # MH-pFedHNGD: the global model's size, from its architecture and the config
        global_model = make_client_model("mh-cnn", 3, 10, size)
        expected = sum(p.numel() for p in global_model.parameters())
        hnet = strategy.make_core([1000] * server_cfg.num_clients).hnet
        assert list(hnet.shapes(server_cfg.num_clients)["theta"]) == [expected]


def test_mh_preset_with_novel_clients_takes_the_authors_novel_phase():
    cfg = compose_config(["algorithm=mh_pfedhn", "num_clients=80", "novel.num_clients=20",
                          "model.architectures=mh-cnn"])
    load_settings(cfg)  # the authors' split and its 75/25 cut, novel clients included
    assert (cfg.novel.optimizer, cfg.novel.lr, cfg.novel.eval_every) == ("adam", 2e-4, 1)
    assert cfg.server.clients_per_round == 80  # every novel client each round (at most 80)
    with pytest.raises(ConfigError, match=r"novel\.dirichlet_alpha"):
        load_settings(compose_config(["algorithm=mh_pfedhn", "num_clients=80",
                                 "novel.num_clients=20", "novel.dirichlet_alpha=0.5"]))


@pytest.mark.parametrize("algorithm,name,flags", [
    ("pfedhn", "pFedHN", (False, False, False)),
    ("pfedhn_pc", "pFedHN-PC", (True, False, False)),
    ("mh_pfedhn", "MH-pFedHN", (False, True, False)),
    ("mh_pfedhngd", "MH-pFedHNGD", (False, True, True)),
])
def test_each_algorithm_preset_is_one_variant(algorithm, name, flags):
    variant = load_settings(compose_config([f"algorithm={algorithm}"])).variant
    assert variant.name == name
    assert (variant.personal_head, variant.multi_head, variant.global_model) == flags
    assert variant.keeps_client_state == any(flags)


def test_settings_are_the_config_read_once_read_only_with_the_variant_derived():
    cfg = compose_config(["algorithm=pfedhn_pc", "dataset.mean=[0.5,0.5,0.5]",
                          "novel.num_clients=3"])
    settings = load_settings(cfg, on_disk=False)
    # Every key of the config, with its value (tuples for lists): nothing lost or added.
    assert settings.as_dict() == OmegaConf.to_container(cfg, resolve=True)
    assert settings.dataset.mean == (0.5, 0.5, 0.5)
    assert settings.variant.name == "pFedHN-PC" and settings.variant.personal_head
    assert settings.partitions == 53 and settings.split.novel == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.server.lr = 1.0
    moved = settings.replace(**{"server.lr": 0.5, "dataset.root": "/elsewhere"})
    assert (moved.server.lr, moved.dataset.root, settings.server.lr) == (0.5, "/elsewhere", 5e-2)


@pytest.mark.parametrize("change,named", [
    (lambda c: c.server.__setitem__("learning_rate", 0.1), "server.learning_rate"),
    (lambda c: c.client.__delitem__("inner_lr"), "client.inner_lr"),
])
def test_settings_refuse_a_config_with_a_key_more_or_less(change, named):
    """A preset with a misspelt or missing key fails at once, naming it."""
    cfg = compose_config([])
    OmegaConf.set_struct(cfg, False)
    change(cfg)
    with pytest.raises(ConfigError, match=re.escape(named)):
        Settings.from_config(cfg)
