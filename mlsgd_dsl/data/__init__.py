"""Data: sources (synthetic, IDX, CIFAR-10, user tensors), coarsening, splits, augmentation."""

from .augment import augment_batch, crop_padding
from .coarsen import AVGPOOL, coarsen, coarsen_shape
from .prepare import Splits, prepare

__all__ = ["AVGPOOL", "Splits", "augment_batch", "coarsen", "coarsen_shape", "crop_padding",
           "prepare"]
