"""Dataset readers: Fashion-MNIST (IDX files) and class-per-folder images, as in-memory tensors.

Ray-free on purpose; the Ray Data view lives in ``natra_ray.distributed.data``.
"""
from natra_ray.data.datasets import DatasetError, ImageDataset, check_dataset, load_dataset, split_indices
from natra_ray.data.fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASSES

__all__ = ["DatasetError", "ImageDataset", "check_dataset", "load_dataset", "split_indices", "FASHION_MNIST_CLASSES"]
