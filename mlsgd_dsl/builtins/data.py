"""Built-in data sources and coarsenings, registered like any third-party plugin."""

from __future__ import annotations

from ..api import Coarsening, DataSource
from ..data.cifar import CIFAR10
from ..data.coarsen import AVGPOOL
from ..data.idx import FASHION_MNIST, MNIST
from ..data.imagefolder import IMAGEFOLDER
from ..data.more import CIFAR100, EMNIST, KMNIST
from ..data.synthetic import SYNTHETIC
from ..data.tensors import TENSORS
from ..hookspecs import hookimpl

MLSGD_DSL_API = ">=1.0"


@hookimpl
def mlsgd_data_sources() -> list[DataSource]:
    return [SYNTHETIC, FASHION_MNIST, MNIST, CIFAR10, TENSORS, IMAGEFOLDER, CIFAR100, KMNIST,
            EMNIST]


@hookimpl
def mlsgd_coarsenings() -> list[Coarsening]:
    return [AVGPOOL]
