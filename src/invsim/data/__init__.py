"""Data: built-in and user data sets, the synthetic confound set, and seed/target pairs."""

from invsim.data.base import TensorImageDataset, dataset_images, dataset_labels, stratified_split
from invsim.data.datasets import load_dataset

__all__ = [
    "TensorImageDataset",
    "dataset_images",
    "dataset_labels",
    "load_dataset",
    "stratified_split",
]
