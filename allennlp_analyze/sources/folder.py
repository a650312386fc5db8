"""Model folders: an AllenNLP serialization directory or a Hugging Face model folder.

Resolution order: a PEFT LoRA adapter (``adapter_config.json`` with its weights,
:mod:`.lora`); AllenNLP weights (``best.th``, ``weights.th``, ``model_state_*.th``); the
Hugging Face names (``model.safetensors.index.json``, ``model.safetensors``,
``pytorch_model.bin.index.json``, ``pytorch_model.bin``; safetensors preferred); then a single
file picked by a format's folder globs, formats in the registry's order
(:data:`~.registry.FORMATS`: one ``*.safetensors``, one ``*.th``/``*.pt``/..., one
``*.tar.gz``, one ``*.npz`` or one ``*.npy``...).
Several candidates of the same format are refused rather than guessed between.
"""

from pathlib import Path
from typing import Optional

from ..errors import AnalyzeError
from ..tensors import WeightSource
from . import registry
from .archive import SerializationDirSource, find_serialization_weights
from .lora import LoraAdapter, is_adapter_folder

#: The Hugging Face file names, in preference order, and the formats they are read as.
HF_NAMES = (
    ("model.safetensors.index.json", "sharded-safetensors"),
    ("model.safetensors", "safetensors"),
    ("pytorch_model.bin.index.json", "sharded-torch"),
    ("pytorch_model.bin", "torch"),
)


def open_folder(
    folder: Path, label: Optional[str] = None, checkpoint_key: Optional[str] = None
) -> WeightSource:
    folder = Path(folder)
    label = label or folder.resolve().name
    if is_adapter_folder(folder):
        return LoraAdapter(folder, label=label)
    if find_serialization_weights(folder) is not None:
        return SerializationDirSource(folder, label=label, checkpoint_key=checkpoint_key)
    for name, format_name in HF_NAMES:
        if (folder / name).is_file():
            return registry.get(format_name).opener(folder / name, label, checkpoint_key)
    for fmt in registry.FORMATS:
        found = sorted(
            {p for pattern in fmt.folder_globs for p in folder.glob(pattern) if p.is_file()}
        )
        if len(found) == 1:
            return fmt.opener(found[0], label, checkpoint_key)
        if len(found) > 1:
            names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
            raise AnalyzeError(
                f"{folder} holds several weight files ({names}); name the one to analyze"
            )
    looked = ", ".join(["best.th", "weights.th", "model_state_*.th"] + registry.folder_globs())
    raise AnalyzeError(f"{folder} holds no model weights (looked for {looked})")
