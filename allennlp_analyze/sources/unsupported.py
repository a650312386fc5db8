"""Weight formats that are recognised but not read, each named in one line with what to convert it
to (never "not a recognised weights file").

One :class:`Unsupported` entry per format, recognised by its name (suffix, or a folder's marker
file) and, for files whose name may not say, by its first bytes. An entry stays only until a
reader for its format is registered: a reader's registration takes the entry's ``key`` and
replaces it (:data:`UNSUPPORTED` lists the ones without a reader).
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from .. import limits
from ..errors import AnalyzeError

#: Bytes read from the start of a file to recognise a format by its content.
HEAD_BYTES = 8


@dataclass(frozen=True)
class Unsupported:
    """A format that is not read: ``key`` (the reader that would replace it), ``what`` it is,
    the ``advice`` (what to convert it to), file ``suffixes`` (lower case), the ``marker`` file
    of a folder in that format, and a content test on the first :data:`HEAD_BYTES` bytes."""

    key: str
    what: str
    advice: str
    suffixes: Tuple[str, ...] = ()
    marker: Optional[str] = None
    magic: Tuple[Tuple[int, bytes], ...] = ()  # (offset, bytes) that the head must hold

    def matches_head(self, head: bytes) -> bool:
        return any(head[at:at + len(m)] == m for at, m in self.magic)

    def message(self, path: Path) -> str:
        return f"{path} is {self.what}, which allennlp-analyze does not read: {self.advice}"


_TO_SAFETENSORS = "analyze the checkpoint it was made from (safetensors, PyTorch) instead"
UNSUPPORTED: Tuple[Unsupported, ...] = (
    Unsupported("tflite", "a TensorFlow Lite model",
                "save its weight tensors as .npz (numpy: tf.lite.Interpreter(...).get_tensor "
                f"of each) or {_TO_SAFETENSORS}", (".tflite",), magic=((4, b"TFL3"),)),
    Unsupported("saved_model", "a TensorFlow SavedModel",
                "save its variables as .npz (numpy: tf.train.load_checkpoint of "
                "DIR/variables/variables reads them without running the graph) or convert it "
                "to ONNX (python -m tf2onnx.convert --saved-model DIR)",
                ("saved_model.pb", "saved_model.pbtxt"), marker="saved_model.pb"),
    Unsupported("coreml", "a Core ML model",
                "save its weights as .npz with coremltools (numpy arrays of the spec's "
                f"layers) or {_TO_SAFETENSORS}", (".mlmodel", ".mlpackage"),
                marker="Manifest.json"),
    Unsupported("gguf", "a GGUF file",
                "convert it back with transformers (from_pretrained(..., gguf_file=...), then "
                f"save_pretrained: safetensors) or {_TO_SAFETENSORS}", (".gguf",),
                magic=((0, b"GGUF"),)),
    Unsupported("onnx", "an ONNX model",
                "save its initializers as .npz (onnx.numpy_helper.to_array of each) or "
                f"{_TO_SAFETENSORS}", (".onnx",)),
    Unsupported("keras", "a Keras / HDF5 weights file",
                "save its weight datasets as .npz (numpy: read each with h5py; a .keras file is "
                "a zip holding model.weights.h5) or convert it to ONNX (tf2onnx)",
                (".keras", ".h5", ".hdf5", ".weights.h5"),
                magic=((0, b"\x89HDF\r\n\x1a\n"),)),
)


def _by_name(path: Path, entries) -> Optional[Unsupported]:
    name = path.name.lower()
    return next((e for e in entries if name.endswith(e.suffixes)), None)


def unsupported_folder(folder: Path, entries=UNSUPPORTED) -> Optional[Unsupported]:
    """The unsupported format of a folder: by its name (``model.mlpackage``) or its marker
    file (``saved_model.pb``)."""
    found = _by_name(folder, entries)
    if found is not None:
        return found
    return next((e for e in entries if e.marker and (folder / e.marker).is_file()
                 and (e.key != "coreml" or (folder / "Data" / "com.apple.CoreML").is_dir())),
                None)


def unsupported_file(path: Path, entries=UNSUPPORTED, readable_suffix: bool = False
                     ) -> Optional[Unsupported]:
    """The unsupported format of a file, by its name, else by its first bytes (a GGUF or
    TFLite file saved as ``model.bin``); ``readable_suffix``: the name says a readable format,
    so only the content can say otherwise."""
    found = None if readable_suffix else _by_name(path, entries)
    if found is not None:
        return found
    try:
        with limits.open_regular(path) as f:
            head = f.read(HEAD_BYTES)
    except OSError:
        return None  # the reader that opens it reports the problem
    return next((e for e in entries if e.matches_head(head)), None)


def unsupported_in(folder: Path, entries=UNSUPPORTED) -> Optional[Path]:
    """A file or folder directly inside ``folder`` in an unsupported format (named by its
    suffix), for a folder that holds no weights that can be read; None if there is none."""
    for entry in entries:
        for suffix in entry.suffixes:
            found = sorted(folder.glob("*" + suffix))
            if found:
                return found[0]
    return None


def refuse(found: Optional[Unsupported], path: os.PathLike) -> None:
    """Raise the one-line :class:`AnalyzeError` for an unsupported format (``found`` not
    None)."""
    if found is not None:
        raise AnalyzeError(found.message(Path(path)))
