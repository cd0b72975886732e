"""What the code knows of each dataset before reading any of it.

Metadata only, no data code: the server, which may hold no data, sizes its
networks from it (``pFedHN.networks``); ``pFedHN.dataset`` reads the files.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    """What the code needs to know about a dataset before reading it."""

    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...] | None  # None: measured on the training images
    std: tuple[float, ...] | None
    layout: str  # the files expected under dataset.root
    torchvision_name: str | None = None  # a class of torchvision.datasets; None: image folders
    train_folders: tuple[str, ...] = ("train",)  # image folders: pooled into the training set
    split: str = "classes"  # "classes": the authors' split; "alphabets": Omniglot's


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        10, 1, 28, (0.1307,), (0.3081,),
        "<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
        "MNIST",
    ),
    "cifar10": DatasetSpec(
        10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
        "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
        "CIFAR10",
    ),
    "cifar100": DatasetSpec(
        100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        "<root>/cifar-100-python/{train,test,meta}",
        "CIFAR100",
    ),
    # Your own images in torchvision's ImageFolder layout; classes are read off disk.
    "folder": DatasetSpec(
        0, 3, 32, None, None, "<root>/{train,test}/<class>/<image>.{jpg,png,...}"
    ),
    # CINIC-10 as distributed (CINIC-10.tar.gz): its train and valid sets (90,000
    # images each) form the training set the val split is cut from; test is test.
    "cinic10": DatasetSpec(
        10, 3, 32, (0.47889522, 0.47227842, 0.43047404), (0.24205776, 0.23828046, 0.25874835),
        "<root>/{train,valid,test}/<class>/<image>.png", train_folders=("train", "valid"),
    ),
}
# Omniglot (torchvision): 1,623 characters of 50 alphabets, 20 drawings each, 105x105
# resized to 28x28. Split by alphabet: client i holds the alphabets i, i+N, ... (in a
# seeded random order; one each with the paper's 50 clients), with its characters
# relabelled 0..C-1; each character's 20 drawings go 14/2/4 to train/val/test.
DATASETS["omniglot"] = DatasetSpec(
    0, 1, 28, None, None,
    "<root>/omniglot-py/images_{background,evaluation}/<alphabet>/<character>/<image>.png",
    "Omniglot", split="alphabets",
)
