"""Data: built-in and user data sets, the synthetic confound set, and seed/target pairs."""

from invsim.data.base import TensorImageDataset, stratified_split
from invsim.data.datasets import load_dataset

__all__ = ["TensorImageDataset", "load_dataset", "stratified_split"]
