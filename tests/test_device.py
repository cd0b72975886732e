"""Device choice, client resources and determinism (the CUDA parts run where there is one)."""

import os

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from pFedHN.client import InnerLoop, LocalStore, PFedHNClient, Training
from pFedHN.config import ConfigError, client_resources, load_settings
from pFedHN.dataset import DATASETS, federated_data
from pFedHN.device import configure_torch, resolve_device
from pFedHN.experiment import prepare
from pFedHN.models import CNNTarget
from pFedHN.settings import Settings, SplitSettings
from tests.conftest import TINY_MNIST, TINY_OVERRIDES, compose_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def one_gpu(monkeypatch):
    """Pretend torch sees one GPU: only the config's arithmetic is tested with it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_auto_picks_cuda_only_when_torch_sees_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("name,message", [
    ("cuda", "torch sees no CUDA device"),
    ("cuda:0", "torch sees no CUDA device"),
    ("tpu", "choose auto, cpu, cuda"),
    ("gpu please", "choose auto, cpu, cuda"),
])
def test_unusable_devices_are_refused(no_gpu, name, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(name)


def test_a_gpu_index_past_the_last_gpu_is_refused(one_gpu):
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="1 CUDA device"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("override,key,gpu", [
    ("device=cuda", "device", False),
    ("device=metal", "device", False),
    ("simulation.num_gpus_per_client=0.5", "simulation.num_gpus_per_client", False),
    ("simulation.num_gpus_per_client=0", "simulation.num_gpus_per_client", True),
    ("simulation.num_gpus_per_client=1.5", "simulation.num_gpus_per_client", True),
    ("simulation.num_gpus_per_client=2", "simulation.num_gpus_per_client", True),
    ("simulation.num_cpus_per_client=100000", "simulation.num_cpus_per_client", False),
    ("simulation.ray_address=''", "simulation.ray_address", False),
    ("deterministic=maybe", "deterministic", False),
])
def test_bad_hardware_settings_name_the_key(monkeypatch, override, key, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(gpu))
    cfg = compose_config(TINY_OVERRIDES + [override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(cfg)


def test_resource_defaults_follow_the_device(one_gpu):
    assert client_resources(Settings.from_config(compose_config(["device=cpu"]))) == \
        {"num_cpus": os.cpu_count(), "num_gpus": 0.0}  # one client at a time, every core
    assert client_resources(Settings.from_config(compose_config(["device=cuda"]))) == \
        {"num_cpus": 1, "num_gpus": 0.25}  # four clients share the GPU
    attached = ["device=cpu", "simulation.ray_address=auto"]
    assert client_resources(Settings.from_config(compose_config(attached))) == \
        {"num_cpus": 1, "num_gpus": 0.0}  # cluster nodes may have fewer cores than this one
    explicit = ["device=cuda", "simulation.num_cpus_per_client=2",
                "simulation.num_gpus_per_client=0.5"]
    assert client_resources(Settings.from_config(compose_config(explicit))) == \
        {"num_cpus": 2, "num_gpus": 0.5}


def test_prepare_decides_the_device_once_for_server_and_clients(no_gpu):
    cfg = prepare(compose_config(TINY_OVERRIDES))
    assert cfg.device == "cpu"
    assert (cfg.simulation.num_cpus_per_client, cfg.simulation.num_gpus_per_client) == \
        (os.cpu_count(), 0.0)


def test_deterministic_mode_switches_torch_to_deterministic_kernels(restore_determinism):
    configure_torch(deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    configure_torch(deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()


def fit_once(device, partition_id=1):
    """One client fit (20 steps) from fixed weights; returns delta_theta."""
    data = federated_data(DATASETS["mnist"], str(TINY_MNIST),
                          SplitSettings(10, 2, 500, 0))[partition_id]
    torch.manual_seed(0)
    model = CNNTarget(1, 7, 10, 28)
    arrays = [p.detach().numpy().copy() for p in model.parameters()]
    client = PFedHNClient(partition_id, data, CNNTarget(1, 7, 10, 28),
                          Training(InnerLoop(steps=20, batch_size=16), seed=3, out_dim=10),
                          store=LocalStore(RecordDict()), device=device)
    return client.fit(arrays, {"server-round": 4})[0]


def test_a_deterministic_run_repeats_bit_for_bit(device, restore_determinism):
    configure_torch(deterministic=True)
    first, second = fit_once(device), fit_once(device)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@needs_cuda
def test_cuda_and_cpu_train_the_same_model_up_to_rounding():
    """Same batches (CPU generator) on both devices: only float rounding differs."""
    on_cpu, on_cuda = fit_once("cpu"), fit_once("cuda")
    for a, b in zip(on_cpu, on_cuda, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3)
    assert max(np.abs(a).max() for a in on_cpu) > 1e-3  # the comparison is not vacuous
