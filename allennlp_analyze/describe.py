"""``--describe``: every tensor of a model with its shape, dtype, kind (and on what evidence) and
what the analysis would do with it, from the tensor list alone: no tensor is loaded and nothing is
computed.

    >>> from allennlp_analyze import describe
    >>> d = describe("model.safetensors", include=("embeddings",))
    >>> d.tensors[0].kind, d.tensors[0].decision, d.counts("kind_from")

Reading "headers only" means what each source can list without its data: a safetensors file's
header; a pickled state dict (an archive's ``weights.th``, a ``.th``/``.bin`` file) is unpickled
to list it (memory-mapped where the format allows), and the AllenNLP subcommand builds the model
(its module types are the best evidence), but no tensor is converted or analyzed. A tensor's
values are not looked at, so the check the analysis makes on every tensor it reads (a 0/1 mask or
a constant is left out: :func:`allennlp_analyze.kinds.value_kind`) cannot be made here.
"""
import csv
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import IO, Callable, Dict, List, Optional, Tuple

from .api import for_each_source, options_from
from .errors import escape
from .options import AnalysisOptions
from .selection import Decision, plan
from .tensors import WeightSource

NOTE = ("Values were not read: a planned tensor whose values are all 0/1 (a mask) or all equal "
        "is left out when analyzed.")


@dataclass
class TensorDescription:
    """One tensor: ``kind`` / ``kind_from`` as in :mod:`allennlp_analyze.kinds`; ``matrices``:
    how many matrices the analysis would make of it (parts, slices); ``skipped``: its left-out
    parts (or the whole tensor) by reason; ``decision``: both in one line."""

    model: str
    name: str
    shape: Tuple[int, ...]
    dtype: str
    module_type: Optional[str]
    kind: str
    kind_from: str
    matrices: int
    skipped: Dict[str, int]
    decision: str

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class Description:
    """Every tensor of every model described, in order; ``errors``: sources that could not be
    read."""

    tensors: List[TensorDescription]
    models: List[str]
    options: AnalysisOptions
    errors: List[str] = field(default_factory=list)

    @property
    def matrices(self) -> int:
        """Matrices the analysis would make (before the value check)."""
        return sum(t.matrices for t in self.tensors)

    def counts(self, by: str) -> Dict[str, int]:
        """Tensors counted by ``"kind"`` or ``"kind_from"``, most first."""
        return dict(Counter(getattr(t, by) for t in self.tensors).most_common())

    def summary(self) -> Dict[str, object]:
        return {"models": list(self.models), "tensors": len(self.tensors),
                "matrices": self.matrices, "kind": self.counts("kind"),
                "kind_from": self.counts("kind_from"), "errors": list(self.errors),
                "complete": not self.errors}


def describe_source(source: WeightSource, options: AnalysisOptions,
                    label: Optional[str] = None) -> List[TensorDescription]:
    """The description of one source's tensors (``source.load`` is never called)."""
    label = label or source.label
    selection = plan(source.tensors(), options, getattr(source, "config", None),
                     getattr(source, "context", None))
    return [_describe(label, d) for d in selection.decisions]


def describe(*sources, options: Optional[AnalysisOptions] = None, on_error: str = "raise",
             cache_dir: Optional[str] = None, progress: Optional[bool] = False,
             opener: Optional[Callable[..., WeightSource]] = None,
             checkpoint_key: Optional[str] = None, **option_kwargs) -> Description:
    """Describe one or more models, opened as :func:`allennlp_analyze.analyze` opens them (same
    sources, options, ``on_error``, ``opener`` and model labels), without analyzing them."""
    options = options_from(options, option_kwargs)
    tensors: List[TensorDescription] = []

    def one(source: WeightSource, label: str) -> None:
        tensors.extend(describe_source(source, options, label))

    labels, errors, _ = for_each_source(sources, one, opener=opener, on_error=on_error,
                                        cache_dir=cache_dir, progress=progress,
                                        checkpoint_key=checkpoint_key)
    return Description(tensors=tensors, models=labels, options=options, errors=errors)


def _describe(label: str, d: Decision) -> TensorDescription:
    t = d.info
    return TensorDescription(model=label, name=t.name, shape=tuple(t.shape), dtype=t.dtype,
                             module_type=d.kind.module_type, kind=d.kind.kind,
                             kind_from=d.kind.kind_from, matrices=len(d.plans),
                             skipped=dict(d.skipped), decision=decision_text(d))


def decision_text(d: Decision) -> str:
    """``analyzed as 1536 x 384``, ``analyzed as 3 matrices of 64 x 64 [q, k, v]``,
    ``skipped: embedding table (add --include embeddings)``, or both for a tensor of which
    some parts are kept."""
    said = []
    if d.plans:
        shapes = {p.shape for p in d.plans}
        size = " x ".join(map(str, next(iter(shapes))))
        if len(d.plans) == 1 and d.plans[0].part is None:
            said.append(f"analyzed as {size}")
        elif d.plans[0].position is not None:
            said.append(f"analyzed as {len(d.plans)} slices of {size} (kernel positions)")
        elif len(shapes) == 1:
            parts = ", ".join(p.part or "" for p in d.plans)
            said.append(f"analyzed as {len(d.plans)} matrices of {size} [{parts}]")
        else:
            said.append("analyzed as " + ", ".join(
                f"{p.part} {p.shape[0]} x {p.shape[1]}" for p in d.plans))
    for reason, n in d.skipped.items():
        said.append(f"skipped: {reason}" + (f" ({n} parts)" if n > 1 else ""))
    return "; ".join(said)


# -- writers ---------------------------------------------------------------------------------

def write_description(description: Description, fmt: str, out: IO[str]) -> None:
    """Write ``description`` as "table" (one line per tensor, then counts), "json" or "csv"."""
    if fmt == "json":
        doc = {"tensors": [t.to_dict() for t in description.tensors],
               "summary": description.summary(), "options": vars(description.options)}
        json.dump(doc, out, indent=1, default=list)
        out.write("\n")
    elif fmt == "csv":
        names = [f for f in TensorDescription.__dataclass_fields__ if f != "skipped"]
        writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for t in description.tensors:
            row = t.to_dict()
            row["shape"] = "x".join(map(str, t.shape))
            writer.writerow({k: "" if v is None else escape(v) if isinstance(v, str) else v
                             for k, v in row.items()})
    else:
        _write_table(description, out)


def _write_table(description: Description, out: IO[str]) -> None:
    multi = len(description.models) > 1
    header = (["model"] if multi else []) + ["name", "shape", "dtype", "kind", "from",
                                             "decision"]
    rows = [[escape(c) for c in ([t.model] if multi else []) + [
        t.name, "x".join(map(str, t.shape)) or "scalar", t.dtype, t.kind, t.kind_from, t.decision]]
            for t in description.tensors]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    if rows:
        for row in [header, ["-" * w for w in widths]] + rows:
            out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
        out.write("\n")
    s = description.summary()
    models = f"{len(description.models)} model{'s' if len(description.models) != 1 else ''}"
    out.write(f"Described: {s['tensors']} tensors in {models}; {s['matrices']} matrices would be "
              "analyzed\n")
    for by in ("kind", "kind_from"):
        counts = ", ".join(f"{k} {n}" for k, n in description.counts(by).items())
        out.write(f"  tensors by {by}: {counts}\n")
    for err in description.errors:
        out.write(f"  ERROR: {escape(err)}\n")
    out.write(f"  {NOTE}\n")
