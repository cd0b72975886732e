"""What a pFedHN round costs: plain PyTorch in one process vs the real Flower simulation.

    python benchmarks/round_cost.py [--rounds N] [Hydra overrides ...]

e.g. on the CIFAR-10 JPEG copy extracted to /tmp/cifar10-jpeg:

    python benchmarks/round_cost.py --rounds 60 dataset.data=folder \
        dataset.root=/tmp/cifar10-jpeg dataset.mean=[0.4914,0.4822,0.4465] \
        dataset.std=[0.2023,0.1994,0.2010]

Both parts run the same code (the strategy's ``generate``/``update`` and the
client's ``fit``); the plain part calls them directly, the Flower part runs
``pFedHN.main.run`` on Flower's simulation engine. Prints medians, their ratio,
the median evaluation round, peak memory of the whole process tree (driver, Ray
and its workers; proportional set size) and the full-protocol estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import RecordDict
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from pFedHN.client import HeadStore, InnerLoop, PFedHNClient
from pFedHN.config import data_spec, target_kwargs
from pFedHN.dataset import federated_data
from pFedHN.main import prepare, run
from pFedHN.models import CNNTarget
from pFedHN.server import build_strategy

CONF = Path(__file__).resolve().parents[1] / "conf"


def tree_memory_bytes(root_pid: int) -> int:
    """Memory of a process and all its descendants (Linux /proc).

    Proportional set size: pages shared between processes (torch's libraries in
    the driver and every Ray worker, say) are split between them, so the sum is
    what the whole run occupies, not a multiple count.
    """
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            rollup = Path(f"/proc/{entry}/smaps_rollup").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                rss[int(entry)] = int(line.split()[1]) * 1024
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class PeakMemory(threading.Thread):
    """Samples the process tree's memory every 5 s.

    Reading smaps_rollup locks each process's memory map for a moment; sampled
    every 0.2 s it slowed the Flower clients measurably (by about a third).
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:  # noqa: D102
        while not self.stopped.wait(5.0):
            self.peak = max(self.peak, tree_memory_bytes(os.getpid()))


def plain_rounds(cfg, rounds: int) -> dict[str, list[float]]:
    """The same step without Flower: generate, client fit, VJP update."""
    threads = cfg.simulation.num_threads or cfg.simulation.num_cpus_per_client
    torch.set_num_threads(int(threads))
    strategy = build_strategy(cfg)
    clients = federated_data(data_spec(cfg), cfg.dataset.root, cfg.num_clients,
                             cfg.client.num_classes_per_node, cfg.dataset.val_size, cfg.seed)
    loop = InnerLoop.from_config(cfg)
    states = [RecordDict() for _ in clients]
    rng = np.random.default_rng(cfg.seed)
    times: dict[str, list[float]] = {"round": [], "client": [], "server": []}
    for server_round in range(1, rounds + 1):
        i = int(rng.integers(cfg.num_clients))
        t0 = time.perf_counter()
        theta = strategy.generate(i)
        t1 = time.perf_counter()
        client = PFedHNClient(i, clients[i], CNNTarget(**target_kwargs(cfg)), loop, cfg.seed,
                              cfg.model.out_dim, HeadStore(states[i]))
        delta_theta, _, _ = client.fit(theta, {"server-round": server_round})
        t2 = time.perf_counter()
        strategy.update([i], [delta_theta])
        t3 = time.perf_counter()
        times["round"].append(t3 - t0)
        times["client"].append(t2 - t1)
        times["server"].append((t1 - t0) + (t3 - t2))
    return times


def main() -> None:
    """Run both parts and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    with open_dict(cfg):
        cfg.num_rounds = args.rounds
        cfg.eval_every = max(args.rounds // 3, 1)
    cfg = prepare(cfg)

    # Plain rounds before and after the Flower run, so that a drift in the
    # machine's speed shows up instead of biasing the ratio.
    before = plain_rounds(cfg, args.rounds // 2)
    federated_data.cache_clear()  # measure the Flower run's memory alone
    memory = PeakMemory()
    memory.start()
    with tempfile.TemporaryDirectory() as run_dir:
        results = run(cfg, run_dir)
        results = json.loads((Path(run_dir) / "results.json").read_text())
    memory.stopped.set()
    memory.join()
    after = plain_rounds(cfg, args.rounds // 2)

    skip = min(5, args.rounds // 10)  # warm-up rounds
    plain = {k: before[k][skip:] + after[k][skip:] for k in before}
    plain_round = statistics.median(plain["round"])
    flower = results["timing"]
    rest = flower["median_round_s"] - flower["median_client_s"] - flower["median_server_s"]
    evaluations = [e["evaluation_time_s"] for e in results["evaluations"][1:]]
    eval_median = statistics.median(evaluations)
    n_evals = len(range(0, 5000, 30)) + 1
    print(f"setting: {cfg.dataset.data} ({cfg.dataset.root}), {cfg.num_clients} clients, "
          f"{args.rounds} rounds, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cores")
    print(f"plain PyTorch round, median:  {plain_round:.3f} s "
          f"(client {statistics.median(plain['client']):.3f} s, "
          f"server {statistics.median(plain['server']):.3f} s; "
          f"before/after Flower {statistics.median(before['round'][skip:]):.3f}"
          f"/{statistics.median(after['round'][skip:]):.3f} s)")
    print(f"Flower round, median:         {flower['median_round_s']:.3f} s "
          f"(client {flower['median_client_s']:.3f} s, server {flower['median_server_s']:.3f} s, "
          f"rest {rest:.3f} s)")
    print(f"ratio Flower / plain:         {flower['median_round_s'] / plain_round:.2f}")
    print(f"evaluation round ({cfg.num_clients} clients), median: {eval_median:.2f} s")
    print(f"peak memory of the Flower run (process tree, PSS): {memory.peak / 2**30:.2f} GiB")
    print(f"full protocol estimate (5000 rounds, {n_evals} evaluations): "
          f"{(5000 * flower['median_round_s'] + n_evals * eval_median) / 60:.1f} min")


if __name__ == "__main__":
    main()
