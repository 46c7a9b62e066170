"""Reference zoo, offline datasets and training."""

from edgepipe.models.data import Dataset, load_dataset
from edgepipe.models.training import TrainConfig, load_checkpoint, save_checkpoint, train
from edgepipe.models.zoo import ZOO

__all__ = ["ZOO", "Dataset", "TrainConfig", "load_checkpoint", "load_dataset", "save_checkpoint", "train"]
