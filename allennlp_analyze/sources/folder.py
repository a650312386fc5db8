"""Model folders: an AllenNLP serialization directory or a Hugging Face model folder.

Resolution order: a PEFT LoRA adapter (``adapter_config.json`` with its weights,
:mod:`.lora`); AllenNLP weights (``best.th``, ``weights.th``, ``model_state_*.th``); the
Hugging Face names (``model.safetensors.index.json``, ``model.safetensors``,
``pytorch_model.bin.index.json``, ``pytorch_model.bin``; safetensors preferred); then a single
file of a known kind (one ``*.safetensors``, one ``*.th``/``*.pt``/..., one ``*.tar.gz``, one
``*.npz`` or one ``*.npy``).
Several candidates of the same kind are refused rather than guessed between.
"""
from pathlib import Path
from typing import Optional

from ..errors import AnalyzeError
from .archive import ArchiveSource, SerializationDirSource, find_serialization_weights
from .lora import LoraAdapter, is_adapter_folder
from .numpy_file import NpySource, NpzSource
from .safetensors_file import SafetensorsSource, ShardedSafetensorsSource
from .torch_file import ShardedTorchSource, TorchFileSource

HF_NAMES = (
    ("model.safetensors.index.json", ShardedSafetensorsSource),
    ("model.safetensors", SafetensorsSource),
    ("pytorch_model.bin.index.json", ShardedTorchSource),
    ("pytorch_model.bin", TorchFileSource),
)
GENERIC = (
    (("*.safetensors.index.json",), ShardedSafetensorsSource),
    (("*.safetensors",), SafetensorsSource),
    (("*.bin.index.json", "*.pt.index.json", "*.pth.index.json"), ShardedTorchSource),
    (("*.th", "*.pt", "*.pth", "*.bin", "*.ckpt"), TorchFileSource),
    (("*.tar.gz", "*.tgz"), ArchiveSource),
    (("*.npz",), NpzSource),
    (("*.npy",), NpySource),
)


def open_folder(folder: Path, label: Optional[str] = None, checkpoint_key: Optional[str] = None):
    folder = Path(folder)
    label = label or folder.resolve().name
    if is_adapter_folder(folder):
        return LoraAdapter(folder, label=label)
    if find_serialization_weights(folder) is not None:
        return SerializationDirSource(folder, label=label, checkpoint_key=checkpoint_key)

    def open_as(cls, path: Path):
        if cls in (TorchFileSource, ArchiveSource):  # the pickled kinds: checkpoints
            return cls(path, label=label, checkpoint_key=checkpoint_key)
        return cls(path, label=label)

    for name, cls in HF_NAMES:
        if (folder / name).is_file():
            return open_as(cls, folder / name)
    for patterns, cls in GENERIC:
        found = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
        if len(found) == 1:
            return open_as(cls, found[0])
        if len(found) > 1:
            names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
            raise AnalyzeError(f"{folder} holds several weight files ({names}); name the one to analyze")
    raise AnalyzeError(
        f"{folder} holds no model weights (looked for best.th, weights.th, model_state_*.th, "
        "*.safetensors, pytorch_model.bin, *.th/*.pt/*.pth/*.bin, *.tar.gz, *.npz, *.npy)"
    )
