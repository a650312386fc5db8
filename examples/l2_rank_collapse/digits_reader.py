"""The ``digits`` dataset reader: scikit-learn's bundled 8x8 digit images (1,797 samples, no
download), split once into a fixed, stratified train / validation partition."""
from typing import Iterable, Tuple

import numpy as np
import torch
from allennlp.data import DatasetReader, Instance
from allennlp.data.fields import LabelField, TensorField

#: Validation fraction and seed of the fixed split: 1,347 training and 450 validation images.
VALIDATION_FRACTION = 0.25
SPLIT_SEED = 0


def digits_split(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Pixels (float32, scaled from 0..16 to 0..1, shape n x 64) and labels (0..9) of ``split``:
    "train", "validation" or "all"."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    if split == "all":
        return X, y
    X_tr, X_va, y_tr, y_va = train_test_split(
        X, y, test_size=VALIDATION_FRACTION, stratify=y, random_state=SPLIT_SEED)
    if split == "train":
        return X_tr, y_tr
    if split == "validation":
        return X_va, y_va
    raise ValueError(f"digits split must be 'train', 'validation' or 'all', got {split!r}")


@DatasetReader.register("digits")
class DigitsReader(DatasetReader):
    """Reads the split named by the "file path" ("train", "validation" or "all"; no file is
    opened). Each instance: ``pixels`` (a 64-vector) and ``label`` (an integer, not indexed)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(manual_distributed_sharding=True, manual_multiprocess_sharding=True,
                         **kwargs)

    def _read(self, file_path: str) -> Iterable[Instance]:
        X, y = digits_split(str(file_path))
        for i in self.shard_iterable(range(len(y))):
            yield self.text_to_instance(X[i], int(y[i]))

    def text_to_instance(self, pixels: np.ndarray, label: int = None) -> Instance:  # type: ignore
        fields = {"pixels": TensorField(torch.as_tensor(pixels, dtype=torch.float32))}
        if label is not None:
            fields["label"] = LabelField(label, skip_indexing=True)
        return Instance(fields)
