"""Datasets and the authors' "classes per client" split.

Images are kept as uint8 tensors, one set per client, and normalised a batch at
a time: the inner loop never touches PIL images or per-sample transforms.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import random
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image

from pFedHN.catalog import DATASETS, DatasetSpec
from pFedHN.files import write_atomic
from pFedHN.settings import SplitSettings

OMNIGLOT_SHARES = (14, 2, 4)  # drawings per character for train, val, test
DOWNLOAD_HINTS = {
    "cinic10": "Download CINIC-10.tar.gz from https://datashare.ed.ac.uk/handle/10283/3192 "
               "and extract it into dataset.root. ",
}


class DataNotFoundError(FileNotFoundError):
    """The dataset is not under dataset.root and could not be downloaded."""


def dataset_spec(
    name: str,
    root: str | Path,
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> DatasetSpec:
    """The spec of ``name``; for an image folder, with its classes read off disk."""
    spec = DATASETS[name]
    if spec.torchvision_name is not None:
        return spec
    root = Path(root).expanduser().resolve()
    classes = {}
    for split in (*spec.train_folders, "test"):
        folder = root / split
        if not folder.is_dir():
            raise DataNotFoundError(
                f"dataset.data={name}: {folder} is not a directory. "
                + DOWNLOAD_HINTS.get(name, "")
                + f"Expected layout under dataset.root={root}: {spec.layout}"
            )
        classes[split] = sorted(d.name for d in folder.iterdir() if d.is_dir())
    listed = " and ".join(f"{root}/{split} {names}" for split, names in classes.items())
    if not classes["test"] or any(names != classes["test"] for names in classes.values()):
        raise DataNotFoundError(
            f"dataset.data={name}: the class folders of {listed} must be the same, "
            "non-empty list"
        )
    if spec.num_classes and len(classes["test"]) != spec.num_classes:
        raise DataNotFoundError(f"dataset.data={name}: expected {spec.num_classes} class "
                                f"folders, found {len(classes['test'])} in {root}/test")
    if name != "folder":  # a known dataset: its own size and normalisation
        return spec
    return replace(spec, num_classes=len(classes["train"]),
                   image_size=image_size or spec.image_size, mean=mean, std=std)


def _open(spec: DatasetSpec, root: Path, download: bool) -> list:
    """The torchvision dataset objects of both halves of ``spec``'s data."""
    if spec.split == "alphabets":
        omniglot = _extracted_omniglot_class()
        return [omniglot(str(root), background=b, download=download) for b in (True, False)]
    dataset_class = getattr(torchvision_datasets(), spec.torchvision_name)
    return [dataset_class(str(root), train=t, download=download) for t in (True, False)]


def ensure_available(name: str, root: str | Path, download: bool) -> None:
    """Check (or download) the dataset before any long work starts."""
    spec = DATASETS[name]
    if spec.torchvision_name is None:
        dataset_spec(name, root)  # raises when the folder layout is not there
        return
    root = Path(root).expanduser().resolve()
    try:
        _open(spec, root, download=False)
        return
    except RuntimeError as missing:
        reason = str(missing)
    if download:
        try:
            _open(spec, root, download=True)
            return
        except Exception as error:  # noqa: BLE001 - any network/IO failure
            reason = f"download failed: {error}"
    raise DataNotFoundError(
        f"dataset.data={name}: no usable data under dataset.root={root} "
        f"({reason}). Expected layout: {spec.layout}. "
        + ("" if download else "Set dataset.download=true to fetch it, or ")
        + "point dataset.root at a folder holding that layout."
    )


def load_images(
    spec: DatasetSpec, root: str | Path, train: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole split as (uint8 images N x C x H x W, int64 labels)."""
    if spec.torchvision_name is None:
        parts = [_load_folder(Path(root) / folder, spec.image_size)
                 for folder in (spec.train_folders if train else ("test",))]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
    if spec.split == "alphabets":  # one pool of drawings; the split picks train and test
        return _load_omniglot(str(root), spec.image_size)
    ds = getattr(torchvision_datasets(), spec.torchvision_name)(str(root), train=train,
                                                                 download=False)
    images = torch.as_tensor(np.asarray(ds.data))
    if images.ndim == 3:  # MNIST: N x H x W
        images = images.unsqueeze(1)
    else:  # CIFAR: N x H x W x C
        images = images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)


def _load_folder(folder: Path, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image of an ImageFolder once, to RGB at image_size x image_size."""
    # torchvision's layout, file filter and loader
    listing = torchvision_datasets().ImageFolder(str(folder))
    images = np.empty((len(listing.samples), image_size, image_size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(listing.samples):
        image = listing.loader(path)  # PIL, converted to RGB
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BILINEAR)
        images[i] = np.asarray(image)
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(listing.targets, dtype=torch.long))


def torchvision_datasets() -> ModuleType:
    """``torchvision.datasets``, imported where data is read, not with this module.

    Importing torchvision (its models and ops too) takes about a second, which a
    SuperNode's per-message process reading its cached partition can skip.
    """
    return importlib.import_module("torchvision.datasets")


@functools.lru_cache(maxsize=1)
def _extracted_omniglot_class() -> type:
    """The Omniglot of torchvision, accepting the extracted folders without their zips."""

    class ExtractedOmniglot(torchvision_datasets().Omniglot):
        def _check_integrity(self) -> bool:
            return Path(self.root, self._get_target_folder()).is_dir() \
                or super()._check_integrity()

    return ExtractedOmniglot


@functools.lru_cache(maxsize=2)
def omniglot_listing(root: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every drawing's path and character, and every character's alphabet.

    Characters are numbered across both halves (background, then evaluation),
    alphabets likewise.
    """
    paths, labels, alphabet_of = [], [], []
    alphabets: dict[str, int] = {}
    for half in _open(DATASETS["omniglot"], Path(root), download=False):
        first = len(alphabet_of)
        for character in half._characters:  # "<alphabet>/<character>"
            name = f"{half.background}/{character.split('/')[0]}"
            alphabet_of.append(alphabets.setdefault(name, len(alphabets)))
        for image, character in half._flat_character_images:
            paths.append(str(Path(half.target_folder, half._characters[character], image)))
            labels.append(first + character)
    return paths, np.asarray(labels), np.asarray(alphabet_of)


@functools.lru_cache(maxsize=1)
def _load_omniglot(root: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All drawings, decoded once, as uint8 1 x size x size, with their characters."""
    paths, labels, _ = omniglot_listing(root)
    images = np.empty((len(paths), 1, image_size, image_size), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            images[i, 0] = np.asarray(image.convert("L").resize((image_size, image_size),
                                                                Image.BILINEAR))
    return torch.from_numpy(images), torch.from_numpy(labels)


def alphabet_indices(
    labels: np.ndarray, alphabet_of: np.ndarray, num_clients: int, seed: int
) -> dict[str, list[np.ndarray]]:
    """Omniglot's split: whole alphabets per client.

    Each character's drawings are shared 14/2/4 among train, val and test
    (indices into the one pool of drawings).
    """
    rng = np.random.default_rng(seed)
    owner = np.empty(alphabet_of.max() + 1, dtype=int)
    owner[rng.permutation(len(owner))] = np.arange(len(owner)) % num_clients
    split: dict[str, list[list[np.ndarray]]] = {n: [[] for _ in range(num_clients)]
                                                for n in ("train", "val", "test")}
    ends = np.cumsum(OMNIGLOT_SHARES)
    for character in range(len(alphabet_of)):
        drawings = rng.permutation(np.flatnonzero(labels == character))
        scale = len(drawings) / ends[-1]  # 20 drawings as published; any count works
        cuts = np.round(ends[:-1] * scale).astype(int)
        client = owner[alphabet_of[character]]
        for name, part in zip(split, np.split(drawings, cuts), strict=True):
            split[name][client].append(part)
    return {name: [np.concatenate(parts) if parts else np.array([], dtype=int)
                   for parts in per_client]
            for name, per_client in split.items()}


@dataclass(frozen=True)
class ClientClasses:
    """The classes a client holds and the share of each class it takes."""

    classes: tuple[int, ...]
    proportions: tuple[float, ...]


def assign_classes(
    num_clients: int,
    num_classes: int,
    classes_per_client: int,
    rng: np.random.Generator | np.random.RandomState,
    distinct: bool = True,
) -> list[ClientClasses]:
    """The authors' assignment of classes and U(0.4, 0.6) proportions to clients.

    Each class gets ``classes_per_client * num_clients // num_classes + 1``
    normalised proportions (the ``+1`` leaves part of every class unused).
    Clients pick, one class at a time, among the classes with the most
    proportions left (random tie-break). ``distinct``: a client never picks the
    same class twice; the authors' code allows it (``distinct=False``). When
    classes_per_client divides num_classes (every setting in the paper) both
    give the same draws.
    """
    count = classes_per_client * num_clients // num_classes + 1
    proportions: list[list[float]] = []
    for _ in range(num_classes):
        p = rng.uniform(0.4, 0.6, size=count)
        proportions.append((p / p.sum()).tolist())
    remaining = np.full(num_classes, count)

    assignment = []
    for _ in range(num_clients):
        chosen: list[int] = []
        for _ in range(classes_per_client):
            open_counts = remaining.copy()
            if distinct:
                open_counts[chosen] = 0
            best = np.flatnonzero((open_counts == open_counts.max()) & (open_counts > 0))
            chosen.append(int(rng.choice(best)))
            remaining[chosen[-1]] -= 1
        assignment.append(
            ClientClasses(tuple(chosen), tuple(proportions[c].pop() for c in chosen))
        )
    return assignment


def split_by_assignment(
    labels: np.ndarray,
    assignment: list[ClientClasses],
    num_classes: int,
    shuffle: Callable[[np.ndarray], np.ndarray],
) -> list[np.ndarray]:
    """Disjoint sample indices per client: int(n_c * p) samples of each class c.

    ``shuffle`` orders each class's samples (classes in label order) before
    they are dealt out.
    """
    pools = [shuffle(np.flatnonzero(labels == c)) for c in range(num_classes)]
    class_sizes = [len(pool) for pool in pools]
    indices = []
    for client in assignment:
        mine = []
        for c, p in zip(client.classes, client.proportions, strict=True):
            take = int(class_sizes[c] * p)
            mine.append(pools[c][:take])
            pools[c] = pools[c][take:]
        indices.append(np.concatenate(mine))
    return indices


def python_shuffle(generator: random.Random) -> Callable[[np.ndarray], np.ndarray]:
    """A shuffle by Python's ``random`` (as the authors' code shuffles each class)."""
    def shuffle(indices: np.ndarray) -> np.ndarray:
        order = indices.tolist()
        generator.shuffle(order)
        return np.asarray(order, dtype=np.int64)
    return shuffle


@dataclass
class ClientData:
    """One client's train, val and test sets as uint8 images and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor  # C x 1 x 1
    std: torch.Tensor

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """ToTensor + Normalize, on a whole batch at once."""
        return (images.float().div_(255.0) - self.mean) / self.std

    def to(self, device: str | torch.device) -> ClientData:
        """The same data on ``device`` (itself when it is there already)."""
        return ClientData(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def client_indices(
    train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int, split: SplitSettings
) -> dict[str, list[np.ndarray]]:
    """The whole split from labels alone: per split, each client's sample indices.

    pFedHN's protocol: "train" and "val" index the official training set (val:
    ``val_size`` random samples of it), "test" the official test set, each
    divided among the clients the same way. ``partition``: "classes" (the
    authors' ``classes_per_client`` split, drawn from this package's own seeded
    generator), "authors" (the same split drawn exactly as the authors' code
    draws it, see ``authors_generators``), "mh-authors" (the MH-pFedHN authors'
    split, see ``mh_authors_indices``) or "dirichlet" (class proportions per
    client ~ Dir(``dirichlet_alpha``), redrawn until every client has
    ``min_samples`` training samples). MH-pFedHN's protocol
    (``local_test_share``, e.g. 0.25): train and test sets pooled (indices run
    over train then test), val cut from the pool, and each client's share split
    into its own train and test. The last ``novel`` clients are held out from
    training; with ``novel_alpha`` their data is redrawn (see ``redraw_dirichlet``).
    """
    num_clients, classes_per_client, val_size, seed = (
        split.partitions, split.classes_per_client, split.val_size, split.seed)
    partition, local_test_share = split.partition, split.local_test_share
    if partition == "mh-authors":
        return mh_authors_indices(train_labels, test_labels, num_classes, num_clients,
                                  classes_per_client, local_test_share, seed)
    if partition == "mh-dirichlet":
        return mh_dirichlet_indices(train_labels, test_labels, num_classes, num_clients,
                                    split.dirichlet_alpha, split.min_samples, local_test_share,
                                    seed)
    rng = np.random.default_rng(seed)
    pooled = local_test_share is not None
    source = np.concatenate([train_labels, test_labels]) if pooled else train_labels
    if partition == "authors":  # their generators, in their order (see authors_generators)
        order, assigner, shuffle = authors_generators(seed, len(source))
        pools = {"train": order[: len(source) - val_size], "val": order[len(source) - val_size:]}
    else:
        order = rng.permutation(len(source))
        pools = {"val": order[:val_size], "train": order[val_size:]}
        assigner, shuffle = rng, rng.permutation
    labels = {"train": source, "val": source, "test": source if pooled else test_labels}
    if not pooled:
        pools["test"] = np.arange(len(test_labels))
    if partition in ("classes", "authors"):
        assignment = assign_classes(num_clients, num_classes, classes_per_client, assigner,
                                    distinct=partition == "classes")

        def divide(name: str) -> list[np.ndarray]:
            return split_by_assignment(labels[name][pools[name]], assignment, num_classes,
                                       shuffle)
    else:
        proportions = dirichlet_proportions(labels["train"][pools["train"]], num_clients,
                                            num_classes, split.dirichlet_alpha,
                                            split.min_samples, rng)

        def divide(name: str) -> list[np.ndarray]:
            return split_by_proportions(labels[name][pools[name]], proportions, rng)
    indices = {}
    for name in ("train", "val", "test"):  # the authors' order
        if name in pools:
            indices[name] = [pools[name][i] for i in divide(name)]
    if pooled:  # each client's own data: a share of it is its test set
        cut = [rng.permutation(idx) for idx in indices["train"]]
        sizes = [round(len(idx) * local_test_share) for idx in cut]
        indices["test"] = [idx[:k] for idx, k in zip(cut, sizes, strict=True)]
        indices["train"] = [idx[k:] for idx, k in zip(cut, sizes, strict=True)]
    if split.novel and split.novel_alpha is not None:
        redraw_dirichlet(indices, pools, labels, num_classes, num_clients - split.novel,
                         split.novel_alpha,
                         np.random.default_rng([seed, 1]))  # own stream: training data unchanged
    return indices


def authors_generators(
    seed: int, num_samples: int
) -> tuple[np.ndarray, np.random.RandomState, Callable[[np.ndarray], np.ndarray]]:
    """The random sources of the authors' pFedHN split, seeded as their trainer seeds them.

    Their trainer seeds torch, numpy's global generator and Python's ``random``
    with the seed, then: torch's ``random_split`` (one ``randperm`` of the
    training set: the first part trains, the rest validates), numpy's generator
    for the class assignment and its proportions, Python's ``random`` to shuffle
    each class before it is dealt out (train, then val, then test). Returns that
    permutation, the numpy generator and the shuffle. Private generators in the
    same states stand in for the global ones, so nothing global is touched.
    """
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).numpy()
    return order, np.random.RandomState(seed), python_shuffle(random.Random(seed))


def mh_authors_indices(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    num_clients: int,
    classes_per_client: int,
    test_share: float,
    seed: int,
) -> dict[str, list[np.ndarray]]:
    """The MH-pFedHN authors' split, drawn as their code draws it, plus a validation set.

    On the training set alone: each client draws its classes uniformly without
    replacement, then one weight U(0.4, 0.6) per (client, class) (numpy's legacy
    generator); weights are normalised per class over the clients holding it,
    each client takes int(weight x class size) samples, and the first client
    holding a class also takes what rounding left, so every sample of a held
    class is dealt out (classes shuffled by Python's ``random``, dealt in client
    order). Each client's share is then cut by torch's ``random_split`` into
    ``int(share x n)`` test samples and the rest for training (one generator, in
    client order). All three generators are seeded with ``seed``, as their
    ``set_seed`` does.

    Their protocol has no validation set; this package's best-validation figure
    takes one from the official test set, which their split leaves untouched:
    each client's validation samples follow its own class weights.

    Indices run over the training set, then the test set (``local_test_share``'s
    pooled convention).
    """
    legacy, python = np.random.RandomState(seed), random.Random(seed)
    classes = [legacy.choice(num_classes, classes_per_client, replace=False).tolist()
               for _ in range(num_clients)]
    weights = [[legacy.uniform(0.4, 0.6) for _ in held] for held in classes]
    totals = [0.0] * num_classes
    for held, ws in zip(classes, weights, strict=True):
        for c, w in zip(held, ws, strict=True):
            totals[c] += w

    def deal(labels: np.ndarray, shuffle: Callable[[np.ndarray], np.ndarray]) -> list[list[int]]:
        sizes = np.bincount(labels, minlength=num_classes)
        counts = [[int(w / totals[c] * int(sizes[c])) for c, w in zip(held, ws, strict=True)]
                  for held, ws in zip(classes, weights, strict=True)]
        dealt = [0] * num_classes
        for held, n in zip(classes, counts, strict=True):
            for c, k in zip(held, n, strict=True):
                dealt[c] += k
        for c in range(num_classes):  # rounding's remainder: the first client holding c
            if dealt[c] not in (0, sizes[c]):
                first = next(i for i, held in enumerate(classes) if c in held)
                counts[first][classes[first].index(c)] += int(sizes[c]) - dealt[c]
        pools = [shuffle(np.flatnonzero(labels == c)).tolist() for c in range(num_classes)]
        taken = [0] * num_classes
        per_client = []
        for held, n in zip(classes, counts, strict=True):
            mine = []
            for c, k in zip(held, n, strict=True):
                mine += pools[c][taken[c]:taken[c] + k]
                taken[c] += k
            per_client.append(mine)
        return per_client

    generator = torch.Generator().manual_seed(seed)
    split: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for mine in deal(train_labels, python_shuffle(python)):
        order = torch.randperm(len(mine), generator=generator).tolist()
        n_train = len(mine) - int(len(mine) * test_share)
        split["train"].append(np.asarray([mine[i] for i in order[:n_train]], dtype=np.int64))
        split["test"].append(np.asarray([mine[i] for i in order[n_train:]], dtype=np.int64))
    own = np.random.default_rng([seed, 2])  # not theirs: their streams stay untouched
    split["val"] = [np.asarray(mine, dtype=np.int64) + len(train_labels)
                    for mine in deal(test_labels, own.permutation)]
    return split


def mh_dirichlet_indices(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    num_clients: int,
    alpha: float,
    least: int,
    test_share: float,
    seed: int,
) -> dict[str, list[np.ndarray]]:
    """The MH-pFedHN authors' Dirichlet split, drawn as their code draws it, plus validation.

    On the training set alone: per class, client shares ~ Dir(alpha) (numpy's
    legacy generator); each class's samples, in index order, are cut at the
    cumulated shares; the whole draw is repeated until the smallest client holds
    more than ``least`` samples (their ``least_nums``). Each client's samples are
    then cut by torch's ``random_split`` into ``int(share x n)`` test samples
    and the rest for training. Validation, as for ``mh_authors_indices``: the
    official test set, dealt with the same shares (this package's own stream).
    Indices run over the training set, then the test set.
    """
    legacy = np.random.RandomState(seed)
    by_class = [np.flatnonzero(train_labels == c) for c in range(num_classes)]

    def deal(pools: list[np.ndarray], shares: np.ndarray) -> list[np.ndarray]:
        per_client: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for pool, fractions in zip(pools, shares, strict=True):
            cuts = (np.cumsum(fractions)[:-1] * len(pool)).astype(int)
            for i, part in enumerate(np.split(pool, cuts)):
                per_client[i].append(part)
        return [np.concatenate(parts) for parts in per_client]

    smallest = 0
    while smallest <= least:  # theirs: redraw while least_nums >= the smallest client
        shares = legacy.dirichlet([alpha] * num_clients, num_classes)
        clients = deal(by_class, shares)
        smallest = min(len(mine) for mine in clients)
    generator = torch.Generator().manual_seed(seed)
    split: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for mine in clients:
        order = torch.randperm(len(mine), generator=generator).numpy()
        n_train = len(mine) - int(len(mine) * test_share)
        split["train"].append(mine[order[:n_train]])
        split["test"].append(mine[order[n_train:]])
    own = np.random.default_rng([seed, 2])  # not theirs: their streams stay untouched
    test_pools = [own.permutation(np.flatnonzero(test_labels == c)) for c in range(num_classes)]
    split["val"] = [mine + len(train_labels) for mine in deal(test_pools, shares)]
    return split


def dirichlet_proportions(
    labels: np.ndarray,
    num_clients: int,
    num_classes: int,
    alpha: float,
    min_samples: int,
    rng: np.random.Generator,
    tries: int = 1000,
) -> np.ndarray:
    """q[c, i]: the share of class c that client i gets, q[c] ~ Dir(alpha).

    Redrawn until every client gets at least ``min_samples`` of ``labels``
    (the usual way to keep a Dirichlet split from leaving clients empty).
    """
    counts = np.bincount(labels, minlength=num_classes)
    for _ in range(tries):
        q = rng.dirichlet(np.full(num_clients, alpha), size=num_classes)
        cuts = np.floor(np.cumsum(q, axis=1) * counts[:, None]).astype(int)
        per_client = np.diff(np.concatenate([np.zeros((num_classes, 1), int), cuts], 1), axis=1)
        if per_client.sum(0).min() >= min_samples:
            return q
    raise ValueError(f"no Dirichlet({alpha}) split in {tries} draws gives each of "
                     f"{num_clients} clients {min_samples} training samples; use a larger "
                     "alpha, fewer clients or fewer samples")


def split_by_proportions(
    labels: np.ndarray, proportions: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Disjoint sample indices per client: class c's samples cut in ``proportions[c]``."""
    parts: list[list[np.ndarray]] = [[] for _ in range(proportions.shape[1])]
    for c, q in enumerate(proportions):
        pool = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.floor(np.cumsum(q)[:-1] * len(pool)).astype(int)
        for i, piece in enumerate(np.split(pool, cuts)):
            parts[i].append(piece)
    return [np.concatenate(p) for p in parts]


def redraw_dirichlet(
    split: dict[str, list[np.ndarray]],
    pools: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    num_classes: int,
    first_novel: int,
    alpha: float,
    rng: np.random.Generator,
) -> None:
    """Give each novel client (index >= ``first_novel``) class proportions p ~ Dir(alpha).

    Its samples come from what the training clients do not use, as many per split
    as a novel client had before, ``Multinomial(n, p)`` per class (capped by what
    is there). Small alpha: few classes, far from the training mix; large alpha:
    close to uniform. Novel clients are evaluated one by one and never train the
    hypernetwork, so two of them may share samples; none shares with training.
    """
    proportions = [rng.dirichlet(np.full(num_classes, alpha))
                   for _ in range(first_novel, len(split["train"]))]
    for name, per_client in split.items():
        free = np.setdiff1d(pools[name], np.concatenate(per_client[:first_novel]))
        by_class = [free[labels[name][free] == c] for c in range(num_classes)]
        size = round(np.mean([len(i) for i in per_client[first_novel:]]))
        for j, p in enumerate(proportions, start=first_novel):
            counts = rng.multinomial(size, p)
            per_client[j] = np.concatenate([
                rng.choice(by_class[c], min(n, len(by_class[c])), replace=False)
                for c, n in enumerate(counts)
            ])


def load_labels(spec: DatasetSpec, root: str | Path, train: bool) -> np.ndarray:
    """A split's labels, without decoding an image folder's images."""
    if spec.split == "alphabets":
        return omniglot_listing(str(root))[1]
    if spec.torchvision_name is None:
        return np.concatenate([
            np.asarray(torchvision_datasets().ImageFolder(str(Path(root) / folder)).targets)
            for folder in (spec.train_folders if train else ("test",))
        ])
    dataset_class = getattr(torchvision_datasets(), spec.torchvision_name)
    return np.asarray(dataset_class(str(root), train=train, download=False).targets)


def split_indices(
    spec: DatasetSpec,
    root: str | Path,
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    split: SplitSettings,
) -> dict[str, list[np.ndarray]]:
    """Each client's sample indices per split, for any dataset (from labels already read)."""
    if spec.split == "alphabets":  # one pool of drawings: train_labels
        return alphabet_indices(train_labels, omniglot_listing(str(root))[2],
                                split.partitions, split.seed)
    return client_indices(train_labels, test_labels, spec.num_classes, split)


@functools.lru_cache(maxsize=1)
def federated_data(
    spec: DatasetSpec,
    root: str,
    split: SplitSettings,
    device: str = "cpu",
) -> tuple[ClientData, ...]:
    """Every client's data, built once per process (cached) from one seed, on ``device``.

    With Omniglot's split, each client's characters are relabelled 0..C-1.
    """
    train_x, train_y = load_images(spec, root, train=True)
    test_x, test_y = load_images(spec, root, train=False)
    indices = split_indices(spec, root, train_y.numpy(), test_y.numpy(), split)
    if spec.mean is None or spec.std is None:  # measured on the training images
        pixels = train_x.float().div_(255.0).transpose(0, 1).flatten(1)
        mean, std = pixels.mean(1), pixels.std(1)
    else:
        mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    mean, std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
    sources = {"train": (train_x, train_y), "val": (train_x, train_y), "test": (test_x, test_y)}
    if split.local_test_share is not None:  # indices run over the training set, then the test set
        pooled = (torch.cat([train_x, test_x]), torch.cat([train_y, test_y]))
        sources = dict.fromkeys(sources, pooled)
    clients = []
    for i in range(split.partitions):
        parts = {}
        for name, (x, y) in sources.items():
            idx = torch.from_numpy(indices[name][i])
            parts[f"{name}_x"] = x[idx].contiguous()
            parts[f"{name}_y"] = y[idx].contiguous()
        if spec.split == "alphabets":  # local labels: the client's own characters, in order
            characters = parts["train_y"].unique()
            for name in ("train", "val", "test"):
                parts[f"{name}_y"] = torch.searchsorted(characters, parts[f"{name}_y"])
        clients.append(ClientData(**parts, mean=mean, std=std).to(device))
    return tuple(clients)


def cached_partition(
    cache_dir: str | Path, spec: DatasetSpec, root: str | Path, partition_id: int,
    split: SplitSettings,
) -> ClientData:
    """One partition's data (on the CPU), decoded and split once per machine.

    flwr 1.42's SuperNode starts a new ClientApp process for every message,
    which would otherwise decode and split the whole dataset again each time.
    The file's name hashes what defines the partition: the dataset's spec, its
    root and the modification times of the root's entries, the split settings
    and the partition. Delete ``cache_dir`` to rebuild.
    """
    root = Path(root).expanduser().resolve()
    stamp = sorted((entry.name, entry.stat().st_mtime_ns) for entry in root.iterdir())
    key = hashlib.sha256(repr((spec, str(root), stamp, split, partition_id))
                         .encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"partition{partition_id}-{key}.pt"
    if path.exists():
        return ClientData(**torch.load(path))
    data = federated_data(spec, str(root), split)[partition_id]
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f.name: getattr(data, f.name) for f in fields(data)}
    write_atomic(path, lambda tmp: torch.save(tensors, tmp))
    return data


# CIFAR-10's classes (also CINIC-10's, in the same order) in two coarse groups: a client
# holding one of each has an easier task than one holding, say, cat and dog.
CIFAR10_VEHICLES = frozenset({0, 1, 8, 9})  # airplane, automobile, ship, truck


def split_summary(
    split: dict[str, list[np.ndarray]],
    labels: dict[str, np.ndarray],
    num_classes: int,
    coarse_groups: tuple[frozenset[int], ...] | None = None,
) -> dict[str, Any]:
    """What each client holds, and how hard the split is, from labels alone.

    ``labels[name]`` are the labels ``split[name]`` indexes. Per client: its
    training classes and sample counts. ``majority_class_acc``: the pooled
    accuracy of predicting each client's most frequent training class, the level
    a personalised model must beat to have learnt anything beyond its label mix.
    With ``coarse_groups`` (e.g. CIFAR-10's vehicles), ``mixed_group_clients``
    counts the clients whose classes are not all in one group: splits with more
    of them are easier.
    """
    clients, hits = [], dict.fromkeys(split, 0)
    for i in range(len(split["train"])):
        counts = {name: np.bincount(labels[name][split[name][i]], minlength=num_classes)
                  for name in split}
        majority = int(np.argmax(counts["train"]))
        for name in split:
            hits[name] += int(counts[name][majority])
        clients.append({"classes": np.flatnonzero(counts["train"]).tolist(),
                        **{name: int(c.sum()) for name, c in counts.items()}})
    totals = {name: sum(c[name] for c in clients) for name in split}
    summary: dict[str, Any] = {
        "totals": totals,
        "majority_class_acc": {name: hits[name] / max(totals[name], 1) for name in split},
        "clients": clients,
    }
    if coarse_groups:
        summary["mixed_group_clients"] = sum(
            not any(set(c["classes"]) <= group for group in coarse_groups) for c in clients)
    return summary


def describe_summary(summary: dict[str, Any]) -> str:
    """One log line for ``split_summary``."""
    totals, majority = summary["totals"], summary["majority_class_acc"]
    classes = sorted({len(c["classes"]) for c in summary["clients"]})
    text = (f"split: {len(summary['clients'])} clients holding {'/'.join(map(str, classes))} "
            f"classes; samples " + ", ".join(f"{k} {v}" for k, v in totals.items())
            + f"; majority-class accuracy val {majority['val']:.4f}, test {majority['test']:.4f}")
    if "mixed_group_clients" in summary:
        text += f"; {summary['mixed_group_clients']} clients mix coarse groups"
    return text
