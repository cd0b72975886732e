"""What a pFedHN round costs: plain PyTorch in one process vs the real Flower simulation.

    python benchmarks/round_cost.py [--rounds N] [--plain-only] [--profile]
        [--json FILE] [Hydra overrides ...]

e.g. on the CIFAR-10 JPEG copy extracted to <cifar10-jpeg>:

    python benchmarks/round_cost.py --rounds 60 dataset.data=folder \
        dataset.root=<cifar10-jpeg> dataset.mean=[0.4914,0.4822,0.4465] \
        dataset.std=[0.2023,0.1994,0.2010]

Both parts run the same code (the core's ``generate``/``update`` and the
client's ``fit``/``evaluate``); the plain part calls them directly, the Flower
part runs ``pFedHN.experiment.run`` on Flower's simulation engine. Prints medians,
their ratio, the median evaluation round, peak memory of the whole process tree
(driver, Ray and its workers; proportional set size) and the full-protocol
estimates.

GPU mode: add ``device=cuda`` (``device=auto`` picks it where there is one).
``--plain-only`` skips the Flower part, for machines without Flower's
simulation extra (Ray). ``--profile`` first prints where a plain round's time
goes (torch's profiler: the inner step by operation, the hypernetwork's
generate, VJP and optimizer step). ``--json FILE`` also writes the figures,
the settings and the machine; ``--render FILE ... --into docs/performance.md``
rewrites the table between that page's markers from such files (nothing else
is run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import RecordDict
from omegaconf import open_dict

from pFedHN.client import LocalStore, PFedHNClient, Training
from pFedHN.config import compose_config, data_spec
from pFedHN.dataset import federated_data
from pFedHN.device import configure_torch
from pFedHN.experiment import prepare, run
from pFedHN.files import replace_between
from pFedHN.models import make_target
from pFedHN.networks import target_kwargs
from pFedHN.server import build_hypernetwork, build_strategy
from pFedHN.settings import Settings


def tree_memory_bytes(root_pid: int, descendants: bool = True) -> int:
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
        if descendants:
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
        self.peak_server = 0  # the driver process alone: the ServerApp and its hypernetwork
        self.stopped = threading.Event()

    def run(self) -> None:  # noqa: D102
        while not self.stopped.wait(5.0):
            self.peak = max(self.peak, tree_memory_bytes(os.getpid()))
            self.peak_server = max(self.peak_server, tree_memory_bytes(os.getpid(), False))


def clock(device: torch.device) -> float:
    """Wall time once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def plain_rounds(settings: Settings, rounds: int,
                 evaluate: bool = True) -> tuple[dict[str, list[float]], torch.Tensor]:
    """The same step without Flower: generate, client fit, VJP update.

    Also times two plain evaluation rounds (every client) at the end. Returns the
    times and the final hypernetwork weights: two calls do the same computation,
    so comparing their weights shows whether a run repeats bit for bit.
    """
    threads = settings.simulation.num_threads or settings.simulation.num_cpus_per_client
    configure_torch(settings.deterministic, threads)
    device = torch.device(settings.device)
    core = build_strategy(settings).core
    clients = federated_data(data_spec(settings), settings.dataset.root, settings.split,
                             device=settings.device)
    training = Training.from_settings(settings)
    states = [RecordDict() for _ in clients]

    def client(i: int) -> PFedHNClient:
        return PFedHNClient(i, clients[i], make_target(**target_kwargs(settings)), training,
                            LocalStore(states[i]), device)

    rng = np.random.default_rng(settings.seed)
    times: dict[str, list[float]] = {"round": [], "client": [], "server": [], "evaluation": []}
    for server_round in range(1, rounds + 1):
        i = int(rng.integers(settings.num_clients))
        t0 = clock(device)
        theta = core.generate(i)
        t1 = clock(device)
        delta_theta, _, _ = client(i).fit(theta, {"server-round": server_round})
        t2 = clock(device)
        core.update([i], [delta_theta])
        t3 = clock(device)
        times["round"].append(t3 - t0)
        times["client"].append(t2 - t1)
        times["server"].append((t1 - t0) + (t3 - t2))
    for _ in range(2 if evaluate else 0):  # the first warms up (e.g. cuDNN's kernel choice)
        t0 = clock(device)
        for i, theta in enumerate(core.generate_many(list(range(settings.num_clients)))):
            client(i).evaluate(theta, {})
        times["evaluation"].append(clock(device) - t0)
    weights = torch.cat([p.detach().flatten() for p in core.hnet.parameters()]).cpu()
    return times, weights


def profile_plain_rounds(settings: Settings, rounds: int, top: int = 25) -> None:
    """Print torch's profile of ``rounds`` plain rounds: self time per operation."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + \
        ([ProfilerActivity.CUDA] if torch.device(settings.device).type == "cuda" else [])
    plain_rounds(settings, 1, evaluate=False)  # the data's decoding stays out of the profile
    with profile(activities=activities) as prof, record_function("plain rounds"):
        plain_rounds(settings, rounds, evaluate=False)
    sort = "self_cuda_time_total" if len(activities) > 1 else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=top))


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    import flwr

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "flwr": flwr.__version__,
            "python": platform.python_version()}


START, END = "<!-- round_cost:start -->", "<!-- round_cost:end -->"


def render(json_files: list[Path], page: Path) -> None:
    """Rewrite the table between ``page``'s markers from ``--json`` files, one row each."""
    rows = ["| run | machine | plain round | Flower round | Flower / plain | evaluation "
            "round | full protocol, estimated |", "|---|---|---|---|---|---|---|"]
    def null(value: object) -> object:  # the config's spelling of None
        return "null" if value is None else value

    def cell(figures: dict, key: str, fmt: str) -> str:
        return format(figures[key], fmt) if key in figures else "not run"

    for path in json_files:
        r = json.loads(path.read_text())
        m, s = r["machine"], r["settings"]
        rows.append(
            f"| `{path.name}` ({s['num_clients']} clients, {s['rounds']} rounds, "
            f"poll_interval {null(s['poll_interval'])}, inline_bytes "
            f"{null(s.get('inline_bytes'))}) | {m['cpu']}, "
            f"{m['cores']} cores, torch {m['torch']}, "
            f"flwr {m['flwr']} | {cell(r, 'plain_round_s', '.3f')} s | "
            f"{cell(r, 'flower_round_s', '.3f')} s | {cell(r, 'flower_over_plain', '.2f')} | "
            f"{cell(r, 'evaluation_round_s', '.2f')} s | "
            f"{cell(r, 'full_protocol_estimate_s', '.0f')} s |")
    replace_between(page, START, END, rows)


def main() -> None:
    """Run both parts and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--plain-only", action="store_true",
                        help="skip the Flower part (no Ray on this machine)")
    parser.add_argument("--profile", action="store_true",
                        help="first print torch's profile of 20 plain rounds")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                        help="only rewrite --into's table from these --json files")
    parser.add_argument("--into", type=Path, default=Path("docs/performance.md"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.render:
        render(args.render, args.into)
        return
    composed = compose_config(args.overrides)
    with open_dict(composed):
        composed.num_rounds = args.rounds
        composed.eval_every = max(args.rounds // 3, 1)
    settings = prepare(composed)
    device = torch.device(settings.device)
    n_evals = len(range(0, 5000, 30)) + 1
    skip = min(5, args.rounds // 10)  # warm-up rounds

    def minutes(round_s: float, evaluation_s: float) -> str:
        return f"{(5000 * round_s + n_evals * evaluation_s) / 60:.1f} min"

    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" \
        else f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    hnet_size = sum(p.numel() for p in build_hypernetwork(settings).parameters())
    print(f"setting: {settings.dataset.data} ({settings.dataset.root}), "
          f"{settings.num_clients} clients, {args.rounds} rounds, device {settings.device} "
          f"({hardware}), torch {torch.__version__}; "
          f"hypernetwork {hnet_size / 1e6:.2f} M parameters ({4 * hnet_size / 2**20:.0f} MiB)")

    if args.profile:
        profile_plain_rounds(settings, 20)
    # Plain rounds before and after the Flower run, so that a drift in the
    # machine's speed shows up instead of biasing the ratio.
    before, weights_before = plain_rounds(settings, args.rounds // 2)
    results, memory = None, PeakMemory()
    if not args.plain_only:
        federated_data.cache_clear()  # measure the Flower run's memory alone
        memory.start()
        with tempfile.TemporaryDirectory() as run_dir:
            run(composed, run_dir)
            results = json.loads((Path(run_dir) / "results.json").read_text())
        memory.stopped.set()
        memory.join()
    after, weights_after = plain_rounds(settings, args.rounds // 2)

    plain = {k: before[k][skip:] + after[k][skip:] for k in ("round", "client", "server")}
    plain_round = statistics.median(plain["round"])
    plain_client = statistics.median(plain["client"])
    plain_eval = statistics.median(before["evaluation"][1:] + after["evaluation"][1:])
    print(f"plain PyTorch round, median:  {plain_round:.3f} s "
          f"(client {plain_client:.3f} s = {1000 * plain_client / settings.client.inner_steps:.1f} "
          f"ms per inner step, server {statistics.median(plain['server']):.3f} s; "
          f"before/after {statistics.median(before['round'][skip:]):.3f}"
          f"/{statistics.median(after['round'][skip:]):.3f} s)")
    print(f"plain evaluation round ({settings.num_clients} clients): {plain_eval:.2f} s")
    print(f"plain full protocol estimate (5000 rounds, {n_evals} evaluations): "
          f"{minutes(plain_round, plain_eval)}")
    print(f"plain runs before/after repeat bit for bit: "
          f"{torch.equal(weights_before, weights_after)} (max |difference| of the "
          f"hypernetwork's weights {(weights_before - weights_after).abs().max():.3g}, "
          f"deterministic={settings.deterministic})")
    if device.type == "cuda":
        print(f"peak GPU memory (plain part): {torch.cuda.max_memory_allocated(device) / 2**20:.0f}"
              " MiB allocated by torch")
    figures = {
        "plain_round_s": plain_round, "plain_client_s": plain_client,
        "plain_server_s": statistics.median(plain["server"]),
        "plain_evaluation_round_s": plain_eval,
        "plain_full_protocol_estimate_s": 5000 * plain_round + n_evals * plain_eval,
        "plain_repeats_bit_for_bit": bool(torch.equal(weights_before, weights_after)),
    }
    # The data's folder by name only: a results file names no paths of the machine.
    overrides = [f"dataset.root=<{Path(o.split('=', 1)[1]).name}>"
                 if o.startswith("dataset.root=") else o for o in args.overrides]
    run_settings = {"overrides": overrides, "rounds": args.rounds,
                    "num_clients": settings.num_clients, "device": settings.device,
                    "poll_interval": settings.simulation.poll_interval,
                    "inline_bytes": settings.simulation.inline_bytes,
                    "hypernetwork_parameters": hnet_size, "warm_up_rounds_skipped": skip}

    def write_json() -> None:
        if args.json:
            args.json.write_text(json.dumps({"settings": run_settings, "machine": machine(),
                                             **figures}, indent=2) + "\n")
            print(f"wrote {args.json}")

    if results is None:
        write_json()
        return
    flower = results["timing"]
    rest = flower["median_round_s"] - flower["median_client_s"] - flower["median_server_s"]
    eval_median = statistics.median(e["evaluation_time_s"] for e in results["evaluations"][1:])
    print(f"Flower round, median:         {flower['median_round_s']:.3f} s "
          f"(client {flower['median_client_s']:.3f} s, server {flower['median_server_s']:.3f} s, "
          f"rest {rest:.3f} s)")
    print(f"ratio Flower / plain:         {flower['median_round_s'] / plain_round:.2f}")
    print(f"evaluation round ({settings.num_clients} clients), median: {eval_median:.2f} s")
    print(f"peak memory of the Flower run (process tree, PSS): {memory.peak / 2**30:.2f} GiB; "
          f"server process alone: {memory.peak_server / 2**30:.2f} GiB")
    print(f"full protocol estimate (5000 rounds, {n_evals} evaluations): "
          f"{minutes(flower['median_round_s'], eval_median)}")
    figures |= {
        "flower_round_s": flower["median_round_s"], "flower_client_s": flower["median_client_s"],
        "flower_server_s": flower["median_server_s"], "flower_rest_s": rest,
        "flower_over_plain": flower["median_round_s"] / plain_round,
        "evaluation_round_s": eval_median,
        "full_protocol_estimate_s": 5000 * flower["median_round_s"] + n_evals * eval_median,
        "peak_memory_tree_bytes": memory.peak, "peak_memory_server_bytes": memory.peak_server,
    }
    write_json()


if __name__ == "__main__":
    main()
