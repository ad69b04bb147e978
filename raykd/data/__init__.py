"""Dataset registry: every dataset yields train / val / test splits and its shape.

The validation split is carved out of the training data (or an image folder's own val/); the test
split is only used for the final results row, never for choosing anything.
"""
from raykd.data import builtin as _builtin  # noqa: F401  (registers the datasets)
from raykd.data import folder as _folder  # noqa: F401  (imagefolder)
from raykd.data.load import check_dataset_name, data_identity, load_dataset
from raykd.data.registry import DatasetSplits, dataset_names, register_dataset

__all__ = ["DatasetSplits", "check_dataset_name", "data_identity", "dataset_names",
           "load_dataset", "register_dataset"]
