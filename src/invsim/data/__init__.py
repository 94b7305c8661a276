"""Data: built-in and user data sets, the synthetic confound set, and seed/target pairs."""

from invsim.data.datasets import TensorImageDataset, load_dataset, stratified_split

__all__ = ["TensorImageDataset", "load_dataset", "stratified_split"]
