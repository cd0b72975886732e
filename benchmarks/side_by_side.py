"""The authors' trainer and ``python -m pFedHN.main``, side by side on one machine, alternated.

    python benchmarks/side_by_side.py --authors CHECKOUT --data DIR --setting NAME
        [--units N] [--repeats 2] [--seed 42] [--device cpu|cuda] [--note TEXT]
        [--out outputs/side_by_side] [--json FILE] [Hydra overrides for our side ...]
    python benchmarks/side_by_side.py --authors CHECKOUT --data DIR --setting NAME
        --against RUN_DIR [--units N] [--repeats 1] [--json FILE]
    python benchmarks/side_by_side.py --floor --json FILE [--out DIR]
    python benchmarks/side_by_side.py --render --json FILE

``CHECKOUT`` is a clone of the authors' code that you made yourself
(``git clone https://github.com/AvivSham/pFedHN`` for ``pfedhn`` and
``pfedhn_pc``, ``https://github.com/DangDang1895/MH-pFL`` for the ``mh_*``
settings; install its requirements into this environment). This package holds
none of their code and the benchmark edits none of their files: their trainer
runs through ``authors_shim.py``, which serves their CIFAR-10 from ``DIR`` (an
image-folder copy with ``train/`` and ``test/``, the one ``dataset.data=folder``
reads) and times their loop. ``python -m pFedHN.main`` runs on the same folder,
the same seed, the same number of steps (pFedHN: one client each) or rounds
(MH-pFedHN: every client each), and the same split: ``client.partition=authors``
for pFedHN, the MH presets' ``mh-authors`` for MH-pFedHN.

The two sides alternate, authors first (A B A B for ``--repeats 2``). For each
run it records the wall time, the median step or round, the evaluation, a
full-protocol estimate (pFedHN: 5000 steps and 168 evaluations; MH-pFedHN: 500
rounds, each evaluated) and the test-accuracy trajectory. ``--json FILE`` adds
the setting, with the machine and ``--note`` (what else was running), to FILE;
``--floor`` adds to each of FILE's settings the FLOPs of a step or round of
training (torch's ``FlopCounterMode``) and the GFLOP/s both sides reach, next
to a dense matmul's on the same machine (run it with the cores idle);
``--render --json FILE`` writes the README's side-by-side table, the compute
floor's table in ``docs/performance.md`` and one trajectory figure per setting
under ``_static/benchmarks/`` (nothing is run).

``--against RUN_DIR`` sets a long run of ours made earlier (its
``results.json``, with the same setting and seed) beside the authors' first
``--units`` rounds: only their side runs, and only the trajectories are
compared (the two sides' times come from different sittings: no ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pFedHN.files import replace_between

REPO = Path(__file__).resolve().parents[1]
SHIM = Path(__file__).resolve().with_name("authors_shim.py")
CIFAR10_NORMALISATION = ("dataset.mean=[0.4914,0.4822,0.4465]",
                         "dataset.std=[0.2023,0.1994,0.2010]")
PFEDHN, MH_PFL = "AvivSham/pFedHN", "DangDang1895/MH-pFL"
# Files that say which of the two checkouts a folder is.
CHECKOUT_FILES = {PFEDHN: ("experiments/pfedhn/trainer.py", "experiments/pfedhn_pc/trainer.py",
                           "experiments/dataset.py"),
                  MH_PFL: ("MH-pFedHN.py", "MH-pFedHNGD.py", "dataset.py", "display.py",
                           "config/defaults.yaml")}
# Both trainers log "Step: <steps done>, AVG Loss: <loss>,  AVG Acc: <pooled test accuracy>".
# MH-pFL's networks in its clients' block order (CNN, VGG8, ResNet10/12/18), named as ours.
FIVE_NETWORKS = ("mh-cnn", "mh-vgg8", "mh-resnet10", "mh-resnet12", "mh-resnet18")
STEP_LINE = re.compile(r"Step: (\d+), AVG Loss: [-\d.naif]+,\s+AVG Acc: ([\d.]+)")


@dataclass(frozen=True)
class Setting:
    """One setting: their script and arguments, our overrides, and the protocol's size."""

    repository: str
    script: str
    authors_args: tuple[str, ...]
    ours: tuple[str, ...]
    every_client: bool         # a unit is a round of every client (MH) or one client's step
    default_units: int
    eval_every: int
    protocol_units: int        # the paper's full protocol
    protocol_evaluations: int
    networks: tuple[str, ...] = ()  # MH-pFL's networks, in its block order (five-network run)

    @property
    def unit(self) -> str:
        """What one of the protocol's units is called."""
        return "round" if self.every_client else "step"


def _pfedhn(script: str, ours: tuple[str, ...]) -> Setting:
    """AvivSham/pFedHN's CIFAR-10 run at its defaults (50 clients, evaluation every 30)."""
    return Setting(PFEDHN, script, ("--data-name", "cifar10", "--num-nodes", "50"),
                   ("num_clients=50", "client.partition=authors", *ours),
                   every_client=False, default_units=300, eval_every=30,
                   protocol_units=5000, protocol_evaluations=168)


def _mh(script: str, only_cnn: bool, ours: tuple[str, ...], units: int) -> Setting:
    """MH-pFL's CIFAR-10 run, as its README gives it, on CPU or GPU."""
    return Setting(MH_PFL, script, ("--data-name", "cifar10", "--num-nodes", "50",
                                    "--optim", "adam", "--lr", "2e-4",
                                    "--only-cnn", str(only_cnn)),
                   ("num_clients=50", *ours), every_client=True, default_units=units,
                   eval_every=1, protocol_units=500, protocol_evaluations=500,
                   networks=() if only_cnn else FIVE_NETWORKS)


SETTINGS = {
    "pfedhn": _pfedhn("experiments/pfedhn/trainer.py", ("algorithm=pfedhn",)),
    "pfedhn_pc": _pfedhn("experiments/pfedhn_pc/trainer.py", ("algorithm=pfedhn_pc",)),
    "mh_pfedhn_cnn": _mh("MH-pFedHN.py", True,
                         ("algorithm=mh_pfedhn", "model.architectures=mh-cnn"), 5),
    "mh_pfedhngd_cnn": _mh("MH-pFedHNGD.py", True,
                           ("algorithm=mh_pfedhngd", "model.architectures=mh-cnn"), 5),
    "mh_pfedhn_five": _mh("MH-pFedHN.py", False, ("algorithm=mh_pfedhn",), 3),
}


class CheckoutError(ValueError):
    """--authors or --data is not what the setting needs."""


def check_inputs(setting_name: str, checkout: Path, data: Path) -> Setting:
    """The setting, once the checkout and the data folder are what it needs (one line if not)."""
    if setting_name not in SETTINGS:
        raise CheckoutError(f"--setting {setting_name}: expected one of {', '.join(SETTINGS)}")
    setting = SETTINGS[setting_name]
    expected = CHECKOUT_FILES[setting.repository]
    missing = [f for f in expected if not (checkout / f).is_file()]
    if missing:
        raise CheckoutError(
            f"--authors {checkout}: --setting {setting_name} needs a clone of "
            f"https://github.com/{setting.repository} (with {', '.join(expected)}); "
            f"missing {', '.join(missing)}")
    for split in ("train", "test"):
        if not (data / split).is_dir():
            raise CheckoutError(f"--data {data}: expected an image-folder copy of CIFAR-10 "
                                f"with {split}/<class>/<image> (train/ and test/)")
    return setting


def authors_command(setting: Setting, checkout: Path, data: Path, units: int, seed: int,
                    device: str, out: Path) -> tuple[list[str], dict[str, str]]:
    """Their trainer through the shim, and the environment it runs in."""
    env = dict(os.environ)
    if setting.repository == PFEDHN:  # it takes CUDA whenever torch sees it
        extra = ["--num-steps", str(units), "--eval-every", str(setting.eval_every),
                 "--data-path", str(data), "--save-path", str(out / "authors_output")]
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        extra = ["--num-steps", str(units), "--data-path", str(data),
                 "--save-dir", str(out / "authors_output"),
                 "--cuda", "-1" if device == "cpu" else "0"]
    command = [sys.executable, str(SHIM), "--record", str(out / "record.json"),
               "--data", str(data), setting.script, *setting.authors_args, *extra,
               "--seed", str(seed)]
    return command, env


def our_command(setting: Setting, data_overrides: list[str], units: int, seed: int,
                device: str, out: Path, extra: list[str]) -> list[str]:
    """``python -m pFedHN.main`` on the same data, steps or rounds and seed."""
    return [sys.executable, "-m", "pFedHN.main", *setting.ours, *data_overrides,
            f"num_rounds={units}", f"eval_every={setting.eval_every}", f"seed={seed}",
            f"device={device}", *extra, f"hydra.run.dir={out}"]


def folder_overrides(data: Path) -> list[str]:
    """Our overrides for an image-folder copy of CIFAR-10."""
    return ["dataset.data=folder", f"dataset.root={data}", "dataset.paper_dataset=cifar10",
            *CIFAR10_NORMALISATION]


def estimate(setting: Setting, unit_s: float, evaluation_s: float) -> float:
    """Seconds for the full protocol: its units, plus its evaluations where they are apart."""
    if setting.every_client:  # a round's time holds its evaluation
        return setting.protocol_units * unit_s
    return setting.protocol_units * unit_s + setting.protocol_evaluations * evaluation_s


def authors_figures(setting: Setting, record: dict, log: str) -> dict:
    """Figures from the shim's record of their loop and from their log."""
    iterations = record["iterations"]
    if not iterations or record["ended"] is None or any(s is None for _, s in iterations):
        raise ValueError("the authors' run ended before its loop did (see its log)")
    starts = [start for start, _ in iterations]
    ends = starts[1:] + [record["ended"]]
    whole = [end - start for start, end in zip(starts, ends, strict=True)]
    after_last_step = [end - step for (_, step), end in zip(iterations, ends, strict=True)]
    if setting.every_client:  # every round evaluates, after its last optimizer step
        unit_s = statistics.median(whole)
        evaluation_s = statistics.median(after_last_step)
    else:  # evaluations at steps 0, eval_every, ...: the others are plain steps
        evaluated = [i % setting.eval_every == 0 for i in range(len(whole))]
        unit_s = statistics.median(w for w, e in zip(whole, evaluated, strict=True) if not e)
        evaluation_s = statistics.median(w for w, e in zip(whole, evaluated, strict=True) if e) \
            - unit_s
    trajectory = [[int(step), float(acc)] for step, acc in STEP_LINE.findall(log)]
    figures = {"units": len(iterations), "median_unit_s": unit_s,
               "median_evaluation_s": evaluation_s,
               "full_protocol_estimate_s": estimate(setting, unit_s, evaluation_s),
               "setup_s": starts[0], "trajectory": trajectory}
    if setting.networks and record["client_acc"]:
        figures["trajectory_by_network"] = by_network(record["client_acc"], setting.networks)
    return figures


def by_network(client_acc: list[list[float]],
               networks: tuple[str, ...]) -> dict[str, list[list[float]]]:
    """Mean client accuracy per network and round (from 1), over MH-pFL's equal blocks.

    Their clients hold the networks in blocks, in ``networks``' order, the first
    ``clients % len(networks)`` blocks one client larger.
    """
    clients, kinds = len(client_acc[0]), len(networks)
    sizes = [clients // kinds + (i < clients % kinds) for i in range(kinds)]
    bounds = [sum(sizes[:i]) for i in range(kinds + 1)]
    return {name: [[r + 1, statistics.fmean(accs[lo:hi])] for r, accs in enumerate(client_acc)]
            for name, lo, hi in zip(networks, bounds, bounds[1:], strict=False)}


def our_figures(setting: Setting, results: dict) -> dict:
    """Figures from our run's results.json."""
    evaluations = results["evaluations"]
    unit_s = results["timing"]["median_round_s"]  # from one round's end to the next's
    evaluation_s = statistics.median(e["evaluation_time_s"] for e in evaluations)
    figures = {"units": results["rounds_completed"], "median_unit_s": unit_s,
               "median_evaluation_s": evaluation_s,
               "full_protocol_estimate_s": estimate(setting, unit_s, evaluation_s),
               "setup_s": evaluations[0]["wall_time_s"] - evaluations[0]["evaluation_time_s"],
               "trajectory": [[e["round"], e["test_acc"]] for e in evaluations]}
    networks = dict.fromkeys(n for e in evaluations for n in e.get("test_acc_by_network", {}))
    if networks:
        figures["trajectory_by_network"] = {
            name: [[e["round"], e["test_acc_by_network"][name]] for e in evaluations
                   if name in e.get("test_acc_by_network", {})] for name in networks}
    return figures


def run_side(side: str, command: list[str], env: dict[str, str], cwd: Path, out: Path) -> float:
    """Run one side to its end, its output in out/log.txt; its wall time."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        code = subprocess.run(command, cwd=cwd, env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if code != 0:
        tail = (out / "log.txt").read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"{side} run failed (exit {code}), {out / 'log.txt'}: "
                           + " | ".join(tail))
    return wall


def run_authors(setting: Setting, checkout: Path, data: Path, units: int, seed: int,
                device: str, out: Path) -> dict:
    """One run of their trainer; its figures."""
    command, env = authors_command(setting, checkout, data, units, seed, device, out)
    wall = run_side("authors", command, env, checkout, out)
    return {"wall_s": wall, **authors_figures(setting,
                                              json.loads((out / "record.json").read_text()),
                                              (out / "log.txt").read_text())}


def run_ours(setting: Setting, data_overrides: list[str], units: int, seed: int, device: str,
             out: Path, extra: list[str]) -> dict:
    """One run of ``python -m pFedHN.main``; its figures."""
    command = our_command(setting, data_overrides, units, seed, device, out, extra)
    wall = run_side("ours", command, dict(os.environ), REPO, out)
    return {"wall_s": wall,
            **our_figures(setting, json.loads((out / "results.json").read_text()))}


def compare(name: str, setting: Setting, checkout: Path, data: Path, units: int, repeats: int,
            seed: int = 42, device: str = "cpu", out: Path = REPO / "outputs" / "side_by_side",
            data_overrides: list[str] | None = None, extra: Sequence[str] = ()) -> dict:
    """Alternate the two sides, authors first, ``repeats`` times each; all their figures.

    ``data_overrides`` (default: ``folder_overrides(data)``) point our side at the
    data; ``extra`` overrides come last.
    """
    data_overrides = folder_overrides(data) if data_overrides is None else data_overrides
    runs: dict[str, list[dict]] = {"authors": [], "ours": []}
    order = []
    for repeat in range(repeats):
        for side in ("authors", "ours"):
            side_out = (out / name / f"{side}_{repeat}").resolve()
            if side == "authors":
                figures = run_authors(setting, checkout, data, units, seed, device, side_out)
            else:
                figures = run_ours(setting, data_overrides, units, seed, device, side_out,
                                   list(extra))
            runs[side].append(figures)
            order.append(side)
            print(f"{name} {side} {repeat}: wall {figures['wall_s']:.1f} s, median "
                  f"{setting.unit} {figures['median_unit_s']:.3f} s, evaluation "
                  f"{figures['median_evaluation_s']:.3f} s, full protocol "
                  f"{figures['full_protocol_estimate_s']:.0f} s", flush=True)
    # the commands as a reader reruns them: no paths of this machine
    folder, run_dir = Path("<data>"), Path("<out>")
    shown_data = folder_overrides(folder) if data_overrides == folder_overrides(data) \
        else data_overrides
    ours_command = our_command(setting, shown_data, units, seed, device, run_dir, list(extra))
    return {"setting": name, "unit": setting.unit, "units": units, "seed": seed,
            "device": device, "order": order, "authors_checkout": checkout_id(checkout, setting),
            "commands": {
                "authors": shown_authors_command(setting, units, seed, device),
                "ours": " ".join(readable(part, "") for part in ours_command)},
            "runs": runs, "ratios": ratios(runs)}


# What a run of ours must share with a setting to stand beside the authors' run.
AGAINST_KEYS = ("seed", "num_clients", "model.variant", "model.architectures",
                "client.partition", "client.epochs", "server.optimizer", "server.lr",
                "dataset.paper_dataset")


def check_against(setting: Setting, run_dir: Path, seed: int,
                  data_overrides: Sequence[str] | None = None) -> dict:
    """``run_dir``'s results, once its config is the setting's with this seed (one line if not).

    ``data_overrides``: what our side's data would be (default: the image folder's).
    """
    from omegaconf import OmegaConf

    from pFedHN.config import compose_config

    if not (run_dir / "results.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise CheckoutError(f"--against {run_dir}: expected a run directory of "
                            "python -m pFedHN.main (with results.json and config.yaml)")
    ran = OmegaConf.load(run_dir / "config.yaml")
    data_overrides = folder_overrides(Path("data")) if data_overrides is None else data_overrides
    expected = compose_config([*setting.ours, *data_overrides, f"seed={seed}"])
    for key in AGAINST_KEYS:
        if OmegaConf.select(ran, key) != OmegaConf.select(expected, key):
            raise CheckoutError(
                f"--against {run_dir}: its {key} is {OmegaConf.select(ran, key)}, the setting "
                f"with --seed {seed} has {OmegaConf.select(expected, key)}")
    return json.loads((run_dir / "results.json").read_text())


def against(name: str, setting: Setting, checkout: Path, data: Path, units: int, repeats: int,
            run_dir: Path, seed: int = 42, device: str = "cpu",
            out: Path = REPO / "outputs" / "side_by_side",
            data_overrides: Sequence[str] | None = None) -> dict:
    """The authors' first ``units`` steps or rounds, ``repeats`` times, beside our ``run_dir``."""
    results = check_against(setting, run_dir, seed, data_overrides)
    ours = {"wall_s": results["wall_time_s"], **our_figures(setting, results)}
    runs = {"authors": [run_authors(setting, checkout, data, units, seed, device,
                                    (out / name / f"authors_{repeat}").resolve())
                        for repeat in range(repeats)], "ours": [ours]}
    return {"setting": name, "unit": setting.unit, "units": units, "seed": seed,
            "device": device, "order": ["authors"] * repeats, "against_run": run_dir.name,
            "authors_checkout": checkout_id(checkout, setting),
            "commands": {"authors": shown_authors_command(setting, units, seed, device)},
            "runs": runs}


def shown_authors_command(setting: Setting, units: int, seed: int, device: str) -> str:
    """Their command as a reader reruns it: no paths of this machine."""
    command = authors_command(setting, Path("<authors>"), Path("<data>"), units, seed, device,
                              Path("<out>"))[0]
    return "cd <authors> && " + " ".join(readable(part, "<pFedHN>/") for part in command)


def readable(part: str, repository: str) -> str:
    """A command's part with ``repository`` for this machine's clone, and plain python."""
    return "python" if part == sys.executable else part.replace(f"{REPO}/", repository)


def checkout_id(checkout: Path, setting: Setting) -> dict:
    """Which of their commits ran (where the checkout is a git clone)."""
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"],
                            capture_output=True, text=True)
    return {"repository": setting.repository,
            "commit": commit.stdout.strip() if commit.returncode == 0 else None}


def side_median(runs: dict[str, list[dict]], side: str, key: str) -> float:
    """One side's median of a figure over its runs."""
    return statistics.median(run[key] for run in runs[side])


def ratios(runs: dict[str, list[dict]]) -> dict[str, float]:
    """Ours over theirs, medians over the repeats."""
    return {key: side_median(runs, "ours", key) / side_median(runs, "authors", key)
            for key in ("median_unit_s", "median_evaluation_s", "full_protocol_estimate_s",
                        "wall_s")}


def training_flops(run_dir: Path) -> float:
    """FLOPs of one step or round of client training in our run ``run_dir`` (forward + backward).

    Counted by torch's ``FlopCounterMode`` on each client's network, per sample,
    times the samples a unit trains: pFedHN ``inner_steps x batch_size`` (every
    client the same network), MH-pFedHN each client's training set per epoch.
    """
    import torch
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode

    from pFedHN.config import load_settings
    from pFedHN.networks import client_network, image_size

    settings = load_settings(OmegaConf.load(run_dir / "config.yaml"), on_disk=False)
    clients = json.loads((run_dir / "results.json").read_text())["split"]["clients"]
    batch = settings.client.batch_size
    images = torch.randn(batch, settings.model.in_channels, *2 * [image_size(settings)])
    labels = torch.randint(settings.model.out_dim, (batch,))
    per_sample: dict[str, float] = {}

    def flops_per_sample(partition: int) -> float:
        network = client_network(settings, partition)
        if network.name not in per_sample:
            model = network.build()
            with FlopCounterMode(display=False) as counter:
                torch.nn.functional.cross_entropy(model(images), labels).backward()
            per_sample[network.name] = counter.get_total_flops() / batch
        return per_sample[network.name]

    if not settings.variant.multi_head:
        return flops_per_sample(0) * settings.client.inner_steps * batch
    return sum(flops_per_sample(i) * client["train"] * settings.client.epochs
               for i, client in enumerate(clients))


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """What this machine's torch reaches on a dense float32 matrix product: a practical peak."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def floor(comparison: dict, run_dir: Path) -> dict:
    """How close our training is to the compute floor, and what else a unit holds.

    ``run_dir``: one of the comparison's own runs of ours (its config, split and
    timing). The parts are that run's medians over its rounds, each on its own:
    on a noisy machine they need not add up to the median unit.
    """
    flops = training_flops(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    timing = results["timing"]
    parts = {"unit_s": timing["median_round_s"], "clients_s": timing["median_client_s"],
             "server_s": timing["median_server_s"], "evaluation_s": statistics.median(
                 e["evaluation_time_s"] for e in results["evaluations"])}
    return {"training_gflop_per_unit": flops / 1e9,
            "ours_client_gflops": flops / 1e9 / parts["clients_s"],
            "authors_unit_gflops": flops / 1e9 / side_median(comparison["runs"], "authors",
                                                              "median_unit_s"),
            "matmul_gflops": matmul_gflops(), "ours_parts_s": parts}


def machine() -> dict:
    """What both sides ran on."""
    import torch

    from pFedHN.recorder import environment

    found = environment()
    found["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
    return found


def add_to_json(path: Path, comparison: dict, note: str) -> None:
    """Keep one entry per setting in ``path``, with the machine and what else ran.

    Comparisons with an earlier run of ours (``against``) go under ``against_runs``.
    """
    store = json.loads(path.read_text()) if path.exists() else {"settings": {}}
    section = "against_runs" if "against_run" in comparison else "settings"
    store.setdefault(section, {})[comparison["setting"]] = {
        **comparison, "machine": machine(), "while_running": note}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(store, indent=1) + "\n")


START, END = "<!-- side_by_side:start -->", "<!-- side_by_side:end -->"
FLOOR_START, FLOOR_END = "<!-- side_by_side_floor:start -->", "<!-- side_by_side_floor:end -->"
AGAINST_START = "<!-- side_by_side_against:start -->"
AGAINST_END = "<!-- side_by_side_against:end -->"


def against_rows(store: dict) -> list[str]:
    """Test accuracy (per network too), authors / ours, at four points of the authors' run."""
    rows = []
    for name, entry in store.get("against_runs", {}).items():
        authors, ours = entry["runs"]["authors"][0], entry["runs"]["ours"][0]
        every = max(1, entry["units"] // 4)
        done = [r for r, _ in authors["trajectory"] if r % every == 0]
        rows += [f"`{name}` beside our run `{entry['against_run']}` (test accuracy %, "
                 "authors / ours):", "",
                 "| network | " + " | ".join(f"round {r}" for r in done) + " |",
                 "|---|" + "---|" * len(done)]
        curves = {"all clients (pooled)": ("trajectory", None),
                  **{n: ("trajectory_by_network", n)
                     for n in ours.get("trajectory_by_network", {})}}
        for label, (key, network) in curves.items():
            def at(run: dict, r: int, key: str = key, network: str | None = network) -> str:
                points = dict(map(tuple, run[key] if network is None
                                  else run.get(key, {}).get(network, [])))
                return f"{100 * points[r]:.1f}" if r in points else "-"
            rows.append(f"| {label} | " + " | ".join(f"{at(authors, r)} / {at(ours, r)}"
                                                     for r in done) + " |")
    return rows


def in_order(store: dict) -> list[tuple[str, dict]]:
    """The stored settings in SETTINGS' order."""
    return sorted(store["settings"].items(), key=lambda item: list(SETTINGS).index(item[0]))


def floor_rows(store: dict) -> list[str]:
    """The compute-floor table: our clients' GFLOP/s against a dense matmul's, and the rest."""
    rows = ["| setting | training a step or round | our clients | the authors' whole step "
            "or round | dense matmul, same machine | our step or round / its clients / "
            "server / evaluation |", "|---|---|---|---|---|---|"]
    for name, entry in in_order(store):
        f = entry.get("floor")
        if f is None:
            continue
        parts = " / ".join(f"{f['ours_parts_s'][k]:.3f}"
                           for k in ("unit_s", "clients_s", "server_s", "evaluation_s"))
        rows.append(
            f"| `{name}` | {f['training_gflop_per_unit']:.1f} GFLOP | "
            f"{f['ours_client_gflops']:.0f} GFLOP/s | {f['authors_unit_gflops']:.0f} GFLOP/s | "
            f"{f['matmul_gflops']:.0f} GFLOP/s | {parts} s |")
    return rows


def render(path: Path, page: Path, figures_dir: Path, floor_page: Path | None = None) -> None:
    """Rewrite ``page``'s side-by-side table from ``path``; a trajectory figure per setting.

    ``floor_page``: also rewrite its compute-floor table.
    """
    store = json.loads(path.read_text())
    rows = ["| setting | runs | median step or round: authors / ours | evaluation: authors "
            "/ ours | full protocol, estimated: authors / ours | ours / authors |",
            "|---|---|---|---|---|---|"]
    machines: dict[str, list[str]] = {}  # where each ran, and what else ran meanwhile
    for name, entry in in_order(store):
        def median(side: str, key: str, runs: dict = entry["runs"]) -> float:
            return side_median(runs, side, key)

        m = entry["machine"]
        machines.setdefault(f"{m['cpu']}, {m['cpu_cores']} cores"
                            f"{', ' + m['gpu'] if m.get('gpu') else ''} "
                            f"({entry['while_running']})", []).append(f"`{name}`")
        rows.append(
            f"| `{name}` ({entry['units']} {entry['unit']}s) | "
            f"{' '.join(s[0].upper() for s in entry['order'])} | "
            f"{median('authors', 'median_unit_s'):.3f} / {median('ours', 'median_unit_s'):.3f}"
            f" s | {median('authors', 'median_evaluation_s'):.2f} / "
            f"{median('ours', 'median_evaluation_s'):.2f} s | "
            f"{median('authors', 'full_protocol_estimate_s'):,.0f} / "
            f"{median('ours', 'full_protocol_estimate_s'):,.0f} s | "
            f"**{entry['ratios']['full_protocol_estimate_s']:.2f}x** |")
        plot_trajectories(name, entry, figures_dir / f"side_by_side_{name}.png")
    rows += ["", *(f"{', '.join(names)}: {where}." for where, names in machines.items())]
    replace_between(page, START, END, rows)
    for name, entry in store.get("against_runs", {}).items():
        plot_trajectories(name, entry, figures_dir / f"side_by_side_{name}_against_run.png",
                          last=entry["units"])
    if floor_page is not None:
        replace_between(floor_page, FLOOR_START, FLOOR_END, floor_rows(store))
        if AGAINST_START in floor_page.read_text():
            replace_between(floor_page, AGAINST_START, AGAINST_END, against_rows(store))


def plot_trajectories(name: str, entry: dict, png: Path, last: int | None = None) -> None:
    """Test accuracy against steps or rounds done, both sides, every run; per network if any.

    ``last``: show steps or rounds up to this one only.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"all clients (pooled)": "trajectory"}
    networks = entry["runs"]["ours"][0].get("trajectory_by_network", {})
    panels.update({f"{n} (authors: mean over its clients)": n for n in networks})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, key) in zip(axes[0], panels.items(), strict=True):
        for side, style in (("authors", "--"), ("ours", "-")):
            for i, run in enumerate(entry["runs"][side]):
                points = run["trajectory"] if key == "trajectory" else \
                    run.get("trajectory_by_network", {}).get(key, [])
                points = [p for p in points if last is None or p[0] <= last]
                if points:
                    x, y = zip(*points, strict=True)
                    ax.plot(x, [100 * v for v in y], style, color="C0" if side == "ours" else "C1",
                            alpha=1.0 if i == 0 else 0.5,
                            label=f"{'authors' if side == 'authors' else 'pFedHN.main'} {i}")
        ax.set(title=title, xlabel=f"{entry['unit']}s done", ylabel="test accuracy (%)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{name}: the authors' code and python -m pFedHN.main, same data and seed")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main() -> None:
    """Run a setting (or only render), print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--authors", type=Path, help="your clone of the authors' repository")
    parser.add_argument("--data", type=Path, help="image-folder copy of CIFAR-10")
    parser.add_argument("--setting", choices=SETTINGS)
    parser.add_argument("--units", type=int, help="steps (pFedHN) or rounds (MH); default "
                        "300 steps, 5 rounds, 3 for the five networks")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--note", default="nothing else", help="what else ran meanwhile")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "side_by_side")
    parser.add_argument("--json", type=Path, help="add the figures to this file")
    parser.add_argument("--against", type=Path, metavar="RUN_DIR",
                        help="an earlier run of ours to set beside the authors' (only "
                             "theirs runs; trajectories only)")
    parser.add_argument("--floor", action="store_true",
                        help="only add the compute floor to --json's settings (or --setting's) "
                             "from --out's runs")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the README table and figures from --json")
    parser.add_argument("--into", type=Path, default=REPO / "README.md")
    parser.add_argument("--floor-into", type=Path, default=REPO / "docs" / "performance.md")
    parser.add_argument("--figures", type=Path, default=REPO / "_static" / "benchmarks")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for our side")
    args = parser.parse_args()
    if args.render:
        if args.json is None:
            parser.error("--render needs --json FILE")
        render(args.json, args.into, args.figures, args.floor_into)
        return
    if args.floor:
        store = json.loads(args.json.read_text())
        names = [args.setting] if args.setting else list(store["settings"])
        runs = {name: args.out.resolve() / name / "ours_0" for name in names}
        missing = [f"{name} ({run})" for name, run in runs.items()
                   if name not in store["settings"] or not (run / "results.json").is_file()]
        if missing:
            parser.error(f"--floor: no run of ours in --out, or no entry in --json, for "
                         f"{', '.join(missing)}; name the setting that ran with --setting")
        for name, run in runs.items():
            store["settings"][name]["floor"] = floor(store["settings"][name], run)
        args.json.write_text(json.dumps(store, indent=1) + "\n")
        return
    if args.authors is None or args.data is None or args.setting is None:
        parser.error("--authors, --data and --setting are needed (or --render --json FILE)")
    checkout, data = args.authors.resolve(), args.data.resolve()
    try:
        setting = check_inputs(args.setting, checkout, data)
    except CheckoutError as error:
        sys.exit(f"side_by_side: {error}")
    units = args.units or setting.default_units
    if args.against is not None:
        try:  # the run is checked before theirs starts
            comparison = against(args.setting, setting, checkout, data, units, args.repeats,
                                 args.against.resolve(), args.seed, args.device, args.out)
        except CheckoutError as error:
            sys.exit(f"side_by_side: {error}")
    else:
        comparison = compare(args.setting, setting, checkout, data, units, args.repeats,
                             args.seed, args.device, args.out, extra=args.overrides)
        for key, ratio in comparison["ratios"].items():
            print(f"ours / authors, {key}: {ratio:.2f}")
    if args.json:
        add_to_json(args.json, comparison, args.note)


if __name__ == "__main__":
    main()
