"""Datasets, partitions, per-agent batch streams and augmentation."""
from crossgrad.data import augment
from crossgrad.data.augment import Augment, dataset_stats, normalize
from crossgrad.data.datasets import (
    DATASETS,
    DataError,
    Dataset,
    available_datasets,
    load_dataset,
    make_synthetic,
    read_cifar_jpeg_tar,
    read_idx,
)
from crossgrad.data.partition import PARTITIONS, PartitionError, class_histogram, format_histogram, partition
from crossgrad.data.streams import BatchStreams, normalized

__all__ = [
    "Augment", "BatchStreams", "DATASETS", "DataError", "Dataset", "PARTITIONS", "PartitionError", "augment",
    "available_datasets", "class_histogram", "dataset_stats", "format_histogram", "load_dataset", "make_synthetic",
    "normalize", "normalized", "partition", "read_cifar_jpeg_tar", "read_idx",
]
