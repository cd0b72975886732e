"""The README's results: tables and figures regenerated from committed run summaries.

``python -m pFedHN.results`` rewrites the README's table and the plots in
``_static/`` from ``_static/runs/``; ``--collect`` adds a finished run there.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from pFedHN.files import around_markers, replace_between, write_json_atomic  # noqa: E402
from pFedHN.recorder import plot_networks  # noqa: E402
from pFedHN.settings import Variant  # noqa: E402

log = logging.getLogger(__name__)

# The paper's test accuracy (%), by (dataset, variant, clients); REFERENCE section 3.
PAPER = {
    ("mnist", 0, 50): "99.28 ± 0.11",
    ("cifar10", 0, 50): "88.38 ± 0.29",
    ("cifar10", 1, 10): "92.47",
    ("cifar10", 1, 50): "90.08 ± 0.63",
    ("cifar10", 1, 100): "88.09",
    ("cifar100", 0, 50): "59.48 ± 0.67",
    ("cifar100", 1, 10): "68.15",
    ("cifar100", 1, 50): "60.17",
    ("cifar100", 1, 100): "53.24",
    ("omniglot", 1, 50): "81.89",
}
DATASET_NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
                 "cinic10": "CINIC-10", "omniglot": "Omniglot"}
NO_DATA_HERE = {"cifar100", "omniglot"}  # the machines this table is made on hold no copy of these


def preset_command(key: tuple[str, int, int]) -> str:
    """The command that runs one of the paper's settings, from the config presets."""
    dataset, variant, clients = key
    return (f"python -m pFedHN.main data={dataset} algorithm={Variant.of(variant).preset} "
            f"num_clients={clients}")


START, END = "<!-- results:start -->", "<!-- results:end -->"
# docs/results.md, "Each run": every run's own line, kept out of the README
RUNS_START, RUNS_END = "<!-- runs:start -->", "<!-- runs:end -->"


def load_summaries(runs_dir: Path) -> list[dict[str, Any]]:
    """Each run summary folder (config.yaml + results.json), sorted by name."""
    from omegaconf import OmegaConf  # only the table needs it

    summaries = []
    for folder in sorted(p for p in runs_dir.iterdir() if (p / "results.json").exists()):
        cfg = OmegaConf.load(folder / "config.yaml")
        results = json.loads((folder / "results.json").read_text())
        paper_dataset = cfg.dataset.get("paper_dataset") or cfg.dataset.data
        summaries.append({"name": folder.name, "cfg": cfg, "results": results,
                          "key": (paper_dataset, int(cfg.model.variant), int(cfg.num_clients))})
    return summaries


def _dataset_label(cfg) -> str:
    if cfg.dataset.data == "folder":
        like = DATASET_NAMES.get(cfg.dataset.get("paper_dataset"), "images")
        return f"{like} ({Path(cfg.dataset.root).name}, folder)"
    return DATASET_NAMES[cfg.dataset.data]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


SPLIT_NAMES = {"classes": "ours", "authors": "authors'", "dirichlet": "Dirichlet",
               "mh-authors": "MH authors'", "mh-dirichlet": "MH authors' Dirichlet"}


def _mean_std(values: list[float]) -> str:
    """Percent, mean ± sample standard deviation (the paper's spread over seeds)."""
    if len(values) == 1:
        return _pct(values[0])
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def setting_of(summary: dict[str, Any]) -> tuple:
    """What a row of the table holds fixed: everything but the seed."""
    cfg, res = summary["cfg"], summary["results"]
    done = res.get("rounds_completed", cfg.num_rounds)
    return (*summary["key"], _dataset_label(cfg), cfg.client.get("partition", "classes"),
            int(cfg.num_rounds), done == cfg.num_rounds) + \
        ((_networks(cfg),) if _multi_head(summary) else ())


def _networks(cfg) -> str:
    """MH-pFedHN: the clients' networks (``model.architectures``), in a few words."""
    choice = cfg.model.architectures
    if isinstance(choice, str):
        return {"blocks": "the authors' five, in blocks"}.get(choice, f"all {choice}")
    return f"{len(set(choice))} kinds, listed per client"


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f} MiB"


def mh_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table of MH-pFedHN(GD) runs: both accuracy figures, cost and memory.

    The MH-pFedHN authors report the best test accuracy over rounds (evaluated
    every round); this package's headline, test at the best-validation round,
    stands beside it.
    """
    lines = [
        "| dataset | clients | algorithm | networks | split | rounds | seeds "
        "| best test over rounds (the authors' measure) | test at best val | final test "
        "| round (median) | hypernetwork + Adam state | server peak memory | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, runs in _by_setting(s for s in summaries if _multi_head(s)):
        label, partition, num_rounds, finished, networks = setting[3:]
        group = _Group.of(runs, num_rounds, finished)
        round_s = statistics.median(r["timing"]["median_round_s"] for r in group.results)
        memory = group.results[0].get("server_memory", {})
        state = memory.get("hypernetwork_bytes")
        state_text = "–" if state is None else \
            f"{_mib(state)} + {_mib(memory.get('optimizer_state_bytes'))}"
        peak = memory.get("peak_rss_bytes")
        lines.append(
            f"| {label} | {group.cfg.num_clients} | {Variant.of(group.cfg.model.variant).name} "
            f"| {networks} | {SPLIT_NAMES.get(partition, partition)} | {group.rounds} "
            f"| {group.seeds} | {group.figure('best_test_acc', 'best_test_round')} "
            f"| {group.figure('test_acc_at_best_val', 'best_round')} "
            f"| {group.figure('final_test_acc')} | {round_s:.1f} s "
            f"| {state_text} | {'–' if peak is None else f'{peak / 2**30:.1f} GiB'} "
            f"| {group.names} |"
        )
    return "\n".join(lines)


def network_table(summary: dict[str, Any], every: int = 100) -> str:
    """A heterogeneous run's test accuracy per network, pooled over its clients.

    At every ``every``-th round, at the last evaluated round, and averaged over
    the last ``every`` rounds (an average says more than one noisy round).
    """
    evaluations = [e for e in summary["results"]["evaluations"] if "test_acc_by_network" in e]
    names = list(dict.fromkeys(n for e in evaluations for n in e["test_acc_by_network"]))
    last = evaluations[-1]["round"]
    recent = [e for e in evaluations if e["round"] > last - every]

    def mean(values: list[float]) -> float | None:
        return statistics.mean(values) if values else None

    rows = [(str(e["round"]), [e["test_acc_by_network"].get(n) for n in names], e["test_acc"])
            for e in evaluations if (e["round"] > 0 and e["round"] % every == 0)
            or e["round"] == last]
    rows.append((f"mean, rounds {recent[0]['round']}-{last}",
                 [mean([e["test_acc_by_network"][n] for e in recent
                        if n in e["test_acc_by_network"]]) for n in names],
                 mean([e["test_acc"] for e in recent])))
    return "\n".join([f"| round | {' | '.join(names)} | all |",
                      "|---" * (len(names) + 2) + "|",
                      *(f"| {label} | {' | '.join(map(_pct, by_network))} | {_pct(pooled)} |"
                        for label, by_network, pooled in rows)])


def _heterogeneous(summary: dict[str, Any]) -> bool:
    """A run whose clients own more than one kind of network."""
    return len({n for e in summary["results"]["evaluations"]
                for n in e.get("test_acc_by_network", {})}) > 1


def novel_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table of the runs with novel clients: one row per run.

    After training, the hypernetwork is frozen and only the novel clients'
    embeddings learn; their pooled test accuracy before that phase, at its last
    evaluated round and at its best round (the MH-pFedHN authors' measure).
    """
    lines = [
        "| dataset | algorithm | networks | clients: trained + novel | training rounds "
        "| novel rounds | seed | novel: best test over rounds (the authors' measure) "
        "| novel: before | novel: after | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        cfg, novel = s["cfg"], s["results"].get("novel_clients")
        if not novel:
            continue
        done = novel.get("rounds_completed", novel["rounds"])
        novel_rounds = f"{done}" if done == novel["rounds"] else f"{done} of {novel['rounds']}"
        networks = _networks(cfg) if _multi_head(s) else cfg.model.get("target", "cnn")
        lines.append(
            f"| {_dataset_label(cfg)} | {Variant.of(cfg.model.variant).name} | {networks} "
            f"| {cfg.num_clients} + {cfg.novel.num_clients} "
            f"| {s['results'].get('rounds_completed', cfg.num_rounds)} | {novel_rounds} "
            f"| {cfg.seed} | {_pct(novel['best_test_acc'])} (round {novel['best_test_round']}) "
            f"| {_pct(novel['test_acc_before'])} | {_pct(novel['test_acc_after'])} "
            f"| `{s['name']}` |")
    return "\n".join(lines)


def _multi_head(summary: dict[str, Any]) -> bool:
    return int(summary["cfg"].model.variant) in (2, 3)


def _by_setting(summaries) -> list[tuple[tuple, list[dict[str, Any]]]]:
    """The summaries grouped by ``setting_of`` (first seen first), each group by seed."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault(setting_of(s), []).append(s)
    return [(setting, sorted(runs, key=lambda r: r["cfg"].seed))
            for setting, runs in groups.items()]


@dataclass(frozen=True)
class _Group:
    """One table row's runs (a setting's seeds) and what every table shows of them."""

    cfg: Any
    results: list[dict[str, Any]]
    rounds: str  # "500", or "130 of 500" while the run is unfinished, with any failures
    seeds: str
    names: str

    @classmethod
    def of(cls, runs: list[dict[str, Any]], num_rounds: int, finished: bool) -> _Group:
        results = [r["results"] for r in runs]
        done = results[0].get("rounds_completed", num_rounds)
        rounds = f"{done}" if finished else f"{done} of {num_rounds}"
        # Never silent: rounds whose updates were lost change what "500 rounds" means;
        # with several seeds, say whose.
        losses = [(f"seed {run['cfg'].seed}: " if len(runs) > 1 else "",
                   len(r.get("failed_rounds", [])), len(r.get("client_failures", [])))
                  for run, r in zip(runs, results, strict=True)]
        if any(failed or lost for _, failed, lost in losses):
            rounds += " (" + "; ".join(f"{whose}{failed} failed, {lost} client results lost"
                                       for whose, failed, lost in losses if failed or lost) + ")"
        return cls(runs[0]["cfg"], results, rounds,
                   ", ".join(str(r["cfg"].seed) for r in runs),
                   ", ".join(f"`{r['name']}`" for r in runs))

    def figure(self, key: str, round_key: str | None = None) -> str:
        """Mean ± std of ``key`` over the seeds; one seed's value with its round."""
        text = _mean_std([r[key] for r in self.results])
        if round_key and len(self.results) == 1:
            text += f" (round {self.results[0][round_key]})"
        return text


def results_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table: one row per setting (its seeds pooled), then the paper's rows not run.

    A setting's figures are the mean ± standard deviation over its seeds; an
    unfinished run gets a row of its own. A row with no run shows the command
    that makes it.
    """
    lines = [
        "| dataset | clients | algorithm | split | rounds | seeds | paper "
        "| ours: test at best val | ours: final test | hardware | wall time per run | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, runs in _by_setting(s for s in summaries if not _multi_head(s)):
        key, label, partition, num_rounds, finished = setting[:3], *setting[3:]
        group = _Group.of(runs, num_rounds, finished)
        env = group.results[0].get("environment", {})
        minutes = statistics.median(r["wall_time_s"] for r in group.results) / 60
        lines.append(
            f"| {label} | {group.cfg.num_clients} | {Variant.of(group.cfg.model.variant).name} "
            f"| {SPLIT_NAMES.get(partition, partition)} | {group.rounds} | {group.seeds} "
            f"| {PAPER.get(key, '–')} | {group.figure('test_acc_at_best_val', 'best_round')} "
            f"| {group.figure('final_test_acc')} "
            f"| {env.get('cpu_cores', '?')} CPU cores ({env.get('cpu', '?')}) "
            f"| {minutes:.0f} min | {group.names} |"
        )
    done_keys = {s["key"] for s in summaries if not _multi_head(s)}
    for key in sorted(PAPER.keys() - done_keys):
        dataset, variant, clients = key
        why = "not run here (no copy of the data)" if dataset in NO_DATA_HERE else "not run yet"
        lines.append(
            f"| {DATASET_NAMES[dataset]} | {clients} | {Variant.of(variant).name} | | 5000 | "
            f"| {PAPER[key]} | {why} | | | | `{preset_command(key)}` |"
        )
    return "\n".join(lines)


def runs_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table: every run summary on its own line (each seed's figures)."""
    lines = ["| run | seed | split: mixed vehicle/animal clients, majority-class test acc. "
             "| test at best val (round) | final test |",
             "|---|---|---|---|---|"]
    for s in summaries:
        res, split = s["results"], s["results"].get("split")
        split_text = "–" if not split else (
            f"{split.get('mixed_group_clients', '–')}, "
            f"{_pct(split['majority_class_acc']['test'])}")
        lines.append(f"| `{s['name']}` | {s['cfg'].seed} | {split_text} "
                     f"| {_pct(res['test_acc_at_best_val'])} ({res['best_round']}) "
                     f"| {_pct(res['final_test_acc'])} |")
    return "\n".join(lines)


def plot_runs(summaries: list[dict[str, Any]], static_dir: Path) -> list[Path]:
    """One accuracy-vs-round plot per dataset: a line per run, the paper as reference."""
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:  # MH-pFedHN's 500 rounds apart from pFedHN's 5000 steps
        by_dataset.setdefault(s["key"][0] + ("_mh" if _multi_head(s) else ""), []).append(s)
    written = []
    for dataset, runs in sorted(by_dataset.items()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn: set[tuple] = set()  # the paper's line once per setting
        for s in runs:
            evaluations = s["results"]["evaluations"]
            label = (f"{Variant.of(s['cfg'].model.variant).name}, {s['cfg'].num_clients} clients, "
                     f"seed {s['cfg'].seed}")
            if _multi_head(s):
                label += f", {_networks(s['cfg'])}"
            line, = ax.plot([e["round"] for e in evaluations],
                            [100 * e["test_acc"] for e in evaluations], label=label)
            paper = PAPER.get(s["key"])
            if paper is not None and s["key"] not in drawn:
                drawn.add(s["key"])
                ax.axhline(float(paper.split()[0]), color=line.get_color(), linestyle="--",
                           linewidth=1, label=f"paper: {label} ({paper})")
        name = DATASET_NAMES.get(dataset.removesuffix("_mh"), dataset)
        ax.set_title(f"Test accuracy during training: {name}"
                     + (", MH-pFedHN" if dataset.endswith("_mh") else ""))
        ax.set_xlabel("round (a pass over the clients)" if dataset.endswith("_mh")
                      else "round (hypernetwork step)")
        ax.set_ylabel("test accuracy, pooled over clients (%)")
        written.append(_save_figure(fig, ax, static_dir / f"accuracy_{dataset}.png"))
    return written + [plot_by_network(s, static_dir) for s in summaries
                      if any("test_acc_by_network" in e for e in s["results"]["evaluations"])]


def plot_by_network(summary: dict[str, Any], static_dir: Path) -> Path:
    """A heterogeneous run's test accuracy per network, beside the pooled figure."""
    evaluations = summary["results"]["evaluations"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([e["round"] for e in evaluations], [100 * e["test_acc"] for e in evaluations],
            color="black", label="pooled over all clients")
    plot_networks(ax, evaluations, "", linewidth=1)
    cfg = summary["cfg"]
    ax.set_title(f"Test accuracy per network: {Variant.of(cfg.model.variant).name}, "
                 f"{cfg.num_clients} clients, seed {cfg.seed}")
    ax.set_xlabel("round (a pass over the clients)")
    ax.set_ylabel("test accuracy, pooled over the network's clients (%)")
    return _save_figure(fig, ax, static_dir / f"accuracy_{summary['name']}_by_network.png")


def _save_figure(fig: plt.Figure, ax: plt.Axes, path: Path) -> Path:
    """Grid, legend, and a PNG without the version stamp (regenerating changes nothing)."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path


def regenerate(runs_dir: Path, readme: Path, static_dir: Path, runs_page: Path) -> None:
    """Rewrite the README's tables, ``runs_page``'s table of each run, and the plots.

    Each file's part between its markers; both are checked before anything is written.
    """
    summaries = load_summaries(runs_dir)
    around_markers(readme, START, END)  # both pages checked before either is written
    around_markers(runs_page, RUNS_START, RUNS_END)
    plots = plot_runs(summaries, static_dir)
    page_link = Path(os.path.relpath(runs_page, readme.parent)).as_posix()
    body = "\n".join([
        "Regenerated by `python -m pFedHN.results` from the run summaries in "
        "`_static/runs/`. Headline: test accuracy at the round of best pooled validation "
        "accuracy; mean ± standard deviation over the seeds listed. Split: `ours` is this "
        "package's seeded split, `authors'` their code's split for the same seed "
        "(`client.partition=authors`). Rounds: a bracket counts the rounds in which no "
        "client's update reached the hypernetwork and the client results lost (each in "
        "the run's `results.json`), per seed where a row pools several. Each run's split "
        f"and figures: [{page_link}]({page_link}#each-run).",
        "",
        results_table(summaries),
        *(["", "MH-pFedHN and MH-pFedHNGD, on the MH-pFedHN authors' protocol (every client "
            "every round, one at a time; each client's data cut 75/25 into its own train "
            "and test):", "", mh_table(summaries)]
          if any(_multi_head(s) for s in summaries) else []),
        *(line for s in summaries if _heterogeneous(s) for line in (
            "", f"`{s['name']}`, test accuracy per network, pooled over its clients:", "",
            network_table(s))),
        *(["", "Novel clients: after training, the hypernetwork frozen, only the novel "
            "clients' embeddings learn (evaluated every round where the run says so):", "",
            novel_table(summaries)]
          if any(s["results"].get("novel_clients") for s in summaries) else []),
        "",
        *[f"![{p.stem}]({p.relative_to(readme.parent).as_posix()})" for p in plots],
    ])
    replace_between(readme, START, END, [body])
    replace_between(runs_page, RUNS_START, RUNS_END, [runs_table(summaries)])


def collect(run_dir: Path, runs_dir: Path, name: str) -> Path:
    """Copy a run's summary (config without machine paths, results.json) for committing."""
    from omegaconf import OmegaConf

    target = runs_dir / name
    target.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    results = json.loads((run_dir / "results.json").read_text())
    # No paths of this machine: only the last part of each.
    for key in ("dataset.root", "resume", "novel.from_run"):
        if OmegaConf.select(cfg, key) is not None:
            OmegaConf.update(cfg, key, Path(OmegaConf.select(cfg, key)).name)
    if results.get("novel_clients", {}).get("from_run"):
        results["novel_clients"]["from_run"] = Path(results["novel_clients"]["from_run"]).name
    (target / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    write_json_atomic(target / "results.json", results)
    return target


def add_split(summary_dir: Path, data_root: Path) -> None:
    """Add ``split`` to a run summary whose results.json predates it.

    The split is a function of the config and the data's labels, so it is
    recomputed from the summary's config with its data at ``data_root``.
    """
    from omegaconf import OmegaConf

    from pFedHN.config import compose_config, describe_split, load_settings  # the data
    from pFedHN.settings import flatten

    cfg = compose_config()
    saved = flatten(OmegaConf.to_container(OmegaConf.load(summary_dir / "config.yaml")))
    absent = object()
    for key, value in saved.items():  # older summaries may hold since-renamed keys
        if OmegaConf.select(cfg, key, default=absent) is not absent:
            OmegaConf.update(cfg, key, value)
    cfg.dataset.root = str(data_root)
    results = json.loads((summary_dir / "results.json").read_text())
    split = describe_split(load_settings(cfg))
    write_json_atomic(summary_dir / "results.json", results | {"split": split})


def main(argv: list[str] | None = None) -> None:
    """``python -m pFedHN.results [--collect RUN_DIR NAME] [--add-split NAME DATA_ROOT]``."""
    import argparse

    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description="Regenerate the README's results table.")
    parser.add_argument("--collect", nargs=2, metavar=("RUN_DIR", "NAME"), action="append",
                        default=[], help="first copy a run's summary into _static/runs/NAME")
    parser.add_argument("--add-split", nargs=2, metavar=("NAME", "DATA_ROOT"), action="append",
                        default=[], help="add the split summary to _static/runs/NAME, from "
                        "its data at DATA_ROOT (summaries made before results.json had one)")
    parser.add_argument("--readme", type=Path, default=repo / "README.md")
    parser.add_argument("--static", type=Path, default=repo / "_static")
    parser.add_argument("--runs-page", type=Path, default=None,
                        help="the page with each run's line (default: docs/results.md "
                        "beside the README)")
    args = parser.parse_args(argv)
    runs_dir = args.static / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    for run_dir, name in args.collect:
        collect(Path(run_dir), runs_dir, name)
    for name, data_root in args.add_split:
        add_split(runs_dir / name, Path(data_root).expanduser().resolve())
    regenerate(runs_dir, args.readme, args.static,
               args.runs_page or args.readme.parent / "docs" / "results.md")


if __name__ == "__main__":
    main()
