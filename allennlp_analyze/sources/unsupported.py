"""Weight formats that are recognised but not read, each named in one line with what to convert it
to (never "not a recognised weights file").

One :class:`Unsupported` entry per format: its file suffixes, the files that make a folder one
of it (``saved_model.pb``; a Core ML package's ``Data/com.apple.CoreML/*.mlmodel``) and the
magic bytes of its files. :mod:`.registry` turns each into a format entry whose opener refuses
the file (:func:`refuse`), after every readable format. A format that gains a reader leaves this
list (GGUF, ONNX and Keras did): its reader's entry is the registry's only one of that name.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Optional, Tuple

from ..errors import AnalyzeError

_TO_CHECKPOINT = "analyze the checkpoint it was made from (safetensors, PyTorch) instead"


@dataclass(frozen=True)
class Unsupported:
    """A format that is not read: ``key`` (its registry entry's name), ``what`` it is, the
    ``advice`` (what to convert it to), file ``suffixes`` (lower case), ``folder_globs`` (files
    that make a folder one of it) and ``magic``: ``(offset, bytes)`` that a file's first bytes
    hold."""

    key: str
    what: str
    advice: str
    suffixes: Tuple[str, ...] = ()
    folder_globs: Tuple[str, ...] = ()
    magic: Optional[Tuple[int, bytes]] = None

    def matches_head(self, head: bytes) -> bool:
        """Whether a file's first bytes carry the format's magic number."""
        if self.magic is None:
            return False
        at, magic = self.magic
        return head[at : at + len(magic)] == magic

    def message(self, subject: str) -> str:
        """The one line for ``subject`` (a path, a hub id)."""
        return f"{subject} is {self.what}, which allennlp-analyze does not read: {self.advice}"


UNSUPPORTED: Tuple[Unsupported, ...] = (
    Unsupported(
        "tflite",
        "a TensorFlow Lite model",
        "save its weight tensors as .npz (numpy: tf.lite.Interpreter(...).get_tensor "
        f"of each) or {_TO_CHECKPOINT}",
        (".tflite",),
        ("*.tflite",),
        (4, b"TFL3"),
    ),
    Unsupported(
        "saved_model",
        "a TensorFlow SavedModel",
        "save its variables as .npz (numpy: tf.train.load_checkpoint of "
        "DIR/variables/variables reads them without running the graph) or convert it "
        "to ONNX (python -m tf2onnx.convert --saved-model DIR)",
        ("saved_model.pb", "saved_model.pbtxt"),
        ("saved_model.pb", "saved_model.pbtxt"),
    ),
    Unsupported(
        "coreml",
        "a Core ML model",
        "save its weights as .npz with coremltools (numpy arrays of the spec's "
        f"layers) or {_TO_CHECKPOINT}",
        (".mlmodel", ".mlpackage"),
        ("*.mlmodel", "Data/com.apple.CoreML/*.mlmodel"),
    ),
)


def subject(path: Path) -> Path:
    """What a refused file stands for: the SavedModel folder of its ``saved_model.pb``, the
    ``.mlpackage`` a Core ML package's model lies in, else the file itself."""
    if path.name.lower() in ("saved_model.pb", "saved_model.pbtxt"):
        return path.parent
    return next((p for p in path.parents if p.name.lower().endswith(".mlpackage")), path)


def refuse(entry: Unsupported, path: Path) -> NoReturn:
    """The one-line :class:`AnalyzeError` for ``path``, a file (or folder) of ``entry``."""
    raise AnalyzeError(entry.message(str(subject(Path(path)))))


def by_magic(head: bytes) -> Optional[Unsupported]:
    """The unsupported format whose magic number ``head`` (a file's first bytes) carries: a
    TFLite file saved as ``model.bin`` is no pickle."""
    return next((e for e in UNSUPPORTED if e.matches_head(head)), None)
