"""What a checkpoint's config says about its tensors, where it names the layer.

Two kinds of ``config.json`` are read (as plain JSON data; nothing in them is run or imported):

* an **AllenNLP** config (``{"model": {"type": ...}}``, in an archive or serialization
  directory): each section with a ``"type"`` sits at the module of the same name (``encoder`` ->
  ``encoder`` or ``_encoder``; ``token_embedders.tokens`` -> ``token_embedder_tokens``; wrapper
  ``_module`` components are looked through), and these registered types name their layers:
  ``embedding`` (its ``weight`` is an embedding table), ``character_encoding`` (``_embedding``),
  ``cnn`` / ``cnn-highway`` (``conv_layer_N`` / ``char_conv_N``: convolutions), the recurrent
  encoders (``lstm``, ``gru``, ``rnn``, ``lstm_cell``: gates stacked), and AllenNLP's fused
  self-attention ``_combined_projection`` (rows: q and k of the attention size, then v of the
  values size) in ``multi_head_self_attention``, ``stacked_self_attention`` and
  ``qanet_encoder`` (whose ``_conv_layers`` are convolutions), the sinusoidal
  ``_position.positional_encoding`` buffer of ``bidirectional_language_model_transformer``, and
  the layers some models build without a config section of their own: ``dialog_qa``'s marker
  embeddings (``_question_num_marker``, ``_prev_ans_marker``), ``language_model``'s output
  softmax (``softmax_w``: a Linear, even where it is held in an ``nn.Embedding`` for sparse
  gradients; ``softmax_b``: its bias, a vector), ``crf_tagger``'s CRF ``transitions``, the
  ``_weight_matrix`` of a ``bilinear`` attention and of ``biaffine_parser``'s arc attention
  (matrices, with their module type);
* a **Hugging Face** config (``model_type`` / ``architectures``): its table sizes
  (``vocab_size``, ``max_position_embeddings``, ``type_vocab_size``, ...) name the embedding
  tables: a 2-D ``weight`` without a bias whose shape is such a size by a width of the config
  (``hidden_size``, ``embedding_size``, ``d_model``...) is one, unless its name says it is a
  layer (an untied ``lm_head`` has the input embedding's shape: :func:`~.kinds.names_layer`) or
  it sits in a numbered block (``layers.0.``: a vocabulary or position table is one per
  model). The rule looks at the tensor alone, never at the others, so a shard read on its own
  gets the kinds it gets in the whole checkpoint.

Anything else (or a config that does not match the tensors) gives no evidence.
"""

import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from . import limits
from .errors import AnalyzeError
from .kinds import RNN_GATES, names_layer
from .tensors import TensorInfo

Parts = Tuple[Tuple[str, int], ...]
#: What the config says of one tensor: its kind, the parts of a fused weight, and the type of
#: the module that holds it where the config implies one (else None).
Configured = Tuple[str, Parts, Optional[str]]
#: config.json files larger than this are not read (real ones are a few KiB).
MAX_CONFIG_BYTES = 10_000_000

_RECURRENT_PARAM = r"(?:[^.]+\.)*weight_(?:ih|hh)(?:_l\d+)?(?:_reverse)?"
_GATES = {"lstm": RNN_GATES[4], "lstm_cell": RNN_GATES[4], "gru": RNN_GATES[3], "rnn": ()}
_HF_TABLES = ("vocab_size", "max_position_embeddings", "n_positions", "type_vocab_size")
_HF_WIDTHS = ("hidden_size", "embedding_size", "d_model", "n_embd", "dim")
_HF_HEADS = ("num_attention_heads", "num_heads", "n_head")


def parse_config(data: bytes) -> Optional[dict]:
    """``config.json`` bytes as a dict, or None where they are not a readable JSON object (the
    config is extra evidence: a bad one is ignored, never an error)."""
    if len(data) > MAX_CONFIG_BYTES:
        return None
    try:
        config = limits.parse_json(data.decode("utf-8"))  # nested too deep: ValueError
    except (UnicodeDecodeError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def load_config(path: Path) -> Optional[dict]:
    """:func:`parse_config` of the file at ``path``; None where there is none (or it is too
    large, unreadable or not a regular file)."""
    try:
        return parse_config(limits.read_regular(path, MAX_CONFIG_BYTES))
    except (OSError, AnalyzeError):
        return None


def config_kinds(config: Optional[Mapping], tensors: Sequence[TensorInfo]) -> Dict[str, Configured]:
    """``{tensor name: (kind, parts, module type or None)}`` for the tensors ``config``
    names."""
    if not isinstance(config, Mapping):
        return {}
    model = config.get("model")
    if isinstance(model, Mapping) and isinstance(model.get("type"), str):
        return _AllenNLP(tensors).walk(model, "")
    if "model_type" in config or "architectures" in config:
        return _hugging_face(config, tensors)
    return {}


# -- AllenNLP --------------------------------------------------------------------------------


class _AllenNLP:
    def __init__(self, tensors: Sequence[TensorInfo]):
        self.shapes = {t.name: t.shape for t in tensors}
        # names with the wrapper components (TimeDistributed's / encoder wrappers' ``_module``)
        # taken out, as the config knows them
        self.plain = {
            ".".join(p for p in t.name.split(".") if p != "_module"): t.name for t in tensors
        }
        self.found: Dict[str, Configured] = {}

    def walk(self, node: Mapping, prefix: str) -> Dict[str, Configured]:
        kind = node.get("type")
        if isinstance(kind, str):
            self._layers(kind, node, prefix)
        for key, value in node.items():
            if not isinstance(value, Mapping) or not isinstance(key, str):
                continue
            if key == "token_embedders":  # a dict of embedders: token_embedder_<key> each
                self.walk(value, prefix)
                continue
            child = self._module(prefix, key)
            if child is not None:
                self.walk(value, child)
        return self.found

    def _module(self, prefix: str, key: str) -> Optional[str]:
        """The module a config key builds: ``_key``, ``key`` or ``token_embedder_key``."""
        for name in (f"_{key}", key, f"token_embedder_{key}"):
            path = f"{prefix}.{name}" if prefix else name
            if any(p.startswith(path + ".") for p in self.plain):
                return path
        return None

    def _mark(
        self, pattern: str, kind: str, parts_of=lambda rows: (), module_type: Optional[str] = None
    ) -> None:
        regex = re.compile(pattern)
        for plain, name in self.plain.items():
            if regex.fullmatch(plain) and len(self.shapes[name]) >= 2:
                parts = parts_of(self.shapes[name][0])
                self.found[name] = (kind, parts, module_type)

    def _layers(self, kind: str, node: Mapping, prefix: str) -> None:
        p = re.escape(prefix + "." if prefix else "")
        if kind == "embedding":
            self._mark(p + r"weight", "embedding")
        elif kind == "character_encoding":
            self._mark(p + r"_embedding\.weight", "embedding")
        elif kind == "cnn":
            self._mark(p + r"conv_layer_\d+\.weight", "conv")
        elif kind == "cnn-highway":
            self._mark(p + r"char_conv_\d+\.weight", "conv")
        elif kind in _GATES:
            gates = _GATES[kind]
            self._mark(
                p + _RECURRENT_PARAM,
                "recurrent",
                lambda rows: _split(rows, [(g, rows // len(gates)) for g in gates]),
            )
        elif kind == "multi_head_self_attention":
            self._attention(
                p + r"_combined_projection\.weight",
                node.get("attention_dim"),
                node.get("values_dim"),
            )
        elif kind == "stacked_self_attention":
            dim = node.get("projection_dim")
            self._attention(p + r"self_attention_\d+\._combined_projection\.weight", dim, dim)
        elif kind == "bidirectional_language_model_transformer":  # a registered buffer
            self._mark(p + r"_position\.positional_encoding", "buffer")
        elif kind == "qanet_encoder":
            dim = node.get("attention_projection_dim")
            blocks = p + r"_encoder_blocks\.\d+\."
            self._attention(blocks + r"attention_layer\._combined_projection\.weight", dim, dim)
            self._mark(blocks + r"_conv_layers\.\d+\.\d+\.weight", "conv")
        elif kind == "dialog_qa":
            self._mark(p + r"_(question_num|prev_ans)_marker\.weight", "embedding")
        elif kind == "language_model":
            self._mark(p + r"_softmax_loss\.softmax_w(\.weight)?", "linear")
            self._mark(p + r"_softmax_loss\.softmax_b(\.weight)?", "vector")
        elif kind == "crf_tagger":
            self._mark(p + r"crf\.transitions", "matrix", module_type="ConditionalRandomField")
        elif kind == "bilinear":
            self._mark(p + r"_weight_matrix", "matrix", module_type="BilinearAttention")
        elif kind == "biaffine_parser":
            self._mark(
                p + r"arc_attention\._weight_matrix",
                "matrix",
                module_type="BilinearMatrixAttention",
            )

    def _attention(self, pattern: str, attention_dim, values_dim) -> None:
        if not (isinstance(attention_dim, int) and isinstance(values_dim, int)):
            return
        self._mark(
            pattern,
            "attention",
            lambda rows: _split(
                rows, [("q", attention_dim), ("k", attention_dim), ("v", values_dim)]
            ),
        )


def _split(rows: int, parts: List[Tuple[str, int]]) -> Parts:
    """``parts`` where they add up to ``rows`` (and are not empty), else none."""
    if parts and all(n > 0 for _, n in parts) and sum(n for _, n in parts) == rows:
        return tuple(parts)
    return ()


# -- Hugging Face ----------------------------------------------------------------------------


def _sizes(config: Mapping, keys: Sequence[str]) -> set:
    return {config[k] for k in keys if isinstance(config.get(k), int) and config[k] > 0}


def _hugging_face(config: Mapping, tensors: Sequence[TensorInfo]) -> Dict[str, Configured]:
    widths = _sizes(config, _HF_WIDTHS)
    tables = {(s, w) for s in _sizes(config, _HF_TABLES) for w in widths}
    heads = _sizes(config, _HF_HEADS)
    buckets = {(s, h) for s in _sizes(config, ("relative_attention_num_buckets",)) for h in heads}
    names = {t.name for t in tensors}
    found: Dict[str, Configured] = {}
    for t in tensors:
        prefix, _, param = t.name.rpartition(".")
        bias = f"{prefix}.bias" if prefix else "bias"
        if param != "weight" or bias in names or names_layer(t.name):
            continue
        per_model = not any(part.isdigit() for part in t.name.split("."))
        if t.shape in buckets or (t.shape in tables and per_model):
            found[t.name] = ("embedding", (), None)
    return found
