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

from .api import for_each_source, open_one, options_from
from .compare import MatrixKey, pair_records
from .errors import escape
from .options import AnalysisOptions
from .selection import Decision, MatrixPlan, plan
from .sources.lora import RECORD_PREFIX, LoraAdapter, MergedSource, adapter_of
from .tensors import WeightSource

NOTE = (
    "Values were not read: a planned tensor whose values are all 0/1 (a mask) or all equal "
    "is left out when analyzed."
)


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
    base: Optional[str] = None

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if self.base is None:  # described without a base model
            del d["base"]
        return d


@dataclass
class Description:
    """Every tensor of every model described, in order; ``errors``: sources that could not be
    read. With a base model, each tensor's ``base`` says what its matrices pair with (the base
    matrix's name, "unmatched", or "ambiguous: candidates") and ``base_label`` names it."""

    tensors: List[TensorDescription]
    models: List[str]
    options: AnalysisOptions
    errors: List[str] = field(default_factory=list)
    base_label: Optional[str] = None

    @property
    def matrices(self) -> int:
        """Matrices the analysis would make (before the value check)."""
        return sum(t.matrices for t in self.tensors)

    def counts(self, by: str) -> Dict[str, int]:
        """Tensors counted by ``"kind"`` or ``"kind_from"``, most first."""
        return dict(Counter(getattr(t, by) for t in self.tensors).most_common())

    def summary(self) -> Dict[str, object]:
        return {
            "models": list(self.models),
            "tensors": len(self.tensors),
            "matrices": self.matrices,
            "kind": self.counts("kind"),
            "kind_from": self.counts("kind_from"),
            "errors": list(self.errors),
            "complete": not self.errors,
            "base": self.base_label,
        }


def describe_source(
    source: WeightSource, options: AnalysisOptions, label: Optional[str] = None
) -> List[TensorDescription]:
    """The description of one source's tensors (``source.load`` is never called), and of a
    LoRA adapter's modules (:mod:`allennlp_analyze.sources.lora`)."""
    label = label or source.label
    selection = plan(
        source.tensors(), options, getattr(source, "config", None), getattr(source, "context", None)
    )
    described = [_describe(label, d) for d in selection.decisions]
    adapter = adapter_of(source)
    for m in adapter.modules if adapter is not None else ():
        described.append(
            TensorDescription(
                model=label,
                name=RECORD_PREFIX + m.name,
                shape=m.shape,
                dtype=m.dtype,
                module_type="LoRA",
                kind="lora",
                kind_from="adapter",
                matrices=1,
                skipped={},
                decision=f"LoRA r = {m.r}, scale {m.scale:.4g}"
                f"{', DoRA' if m.magnitude else ''}: the r singular values of "
                f"s B A ({m.shape[0]} x {m.shape[1]})",
            )
        )
    return described


def describe(
    *sources,
    options: Optional[AnalysisOptions] = None,
    on_error: str = "raise",
    cache_dir: Optional[str] = None,
    progress: Optional[bool] = False,
    opener: Optional[Callable[..., WeightSource]] = None,
    checkpoint_key: Optional[str] = None,
    base=None,
    **option_kwargs,
) -> Description:
    """Describe one or more models, opened as :func:`allennlp_analyze.analyze` opens them (same
    sources, options, ``on_error``, ``opener`` and model labels), without analyzing them;
    ``base``: a base model whose planned matrices each model's are paired with (from the
    tensor lists, as ``--base`` pairs them)."""
    options = options_from(options, option_kwargs)
    tensors: List[TensorDescription] = []
    base_keys: Optional[List[MatrixKey]] = None
    base_label = None
    if base is not None:
        from .sources import open_source

        base_source = open_one(
            base,
            opener or open_source,
            cache_dir=cache_dir,
            progress=progress,
            checkpoint_key=checkpoint_key,
        )
        base_label = base_source.label
        base_keys = _keys(
            plan(
                base_source.tensors(),
                options,
                getattr(base_source, "config", None),
                getattr(base_source, "context", None),
            ).plans
        )

    def one(source: WeightSource, label: str) -> None:
        if base_keys is not None and isinstance(source, LoraAdapter):
            source = MergedSource(base_source, source)  # checks the adapter against the base
        described = describe_source(source, options, label)
        if base_keys is not None:
            _pair(described, source, options, base_keys)
        tensors.extend(described)

    labels, errors, _ = for_each_source(
        sources,
        one,
        opener=opener,
        on_error=on_error,
        cache_dir=cache_dir,
        progress=progress,
        checkpoint_key=checkpoint_key,
    )
    return Description(
        tensors=tensors, models=labels, options=options, errors=errors, base_label=base_label
    )


def _keys(plans: List[MatrixPlan]) -> List[MatrixKey]:
    return [MatrixKey(p.name, p.shape, p.part) for p in plans]


def _pair(
    described: List[TensorDescription],
    source: WeightSource,
    options: AnalysisOptions,
    base_keys: List[MatrixKey],
) -> None:
    """Fill each tensor's ``base``: its planned matrices' partners in the base (or why none)."""
    plans = plan(
        source.tensors(), options, getattr(source, "config", None), getattr(source, "context", None)
    ).plans
    keys = _keys(plans)
    pairing = pair_records(keys, base_keys)
    said: Dict[str, str] = {
        keys[i].name: base_keys[j].name + (" (transposed)" if t else "")
        for i, j, t in pairing.pairs
    }
    said.update({k: "unmatched" for k in pairing.unmatched})
    said.update({k: "ambiguous: " + ", ".join(v) for k, v in pairing.ambiguous.items()})
    by_param: Dict[str, List[str]] = {}
    for p in plans:
        by_param.setdefault(p.param, []).append(said[p.name])
    for t in described:
        if t.name in by_param:
            t.base = "; ".join(by_param[t.name])


def _describe(label: str, d: Decision) -> TensorDescription:
    t = d.info
    return TensorDescription(
        model=label,
        name=t.name,
        shape=tuple(t.shape),
        dtype=t.dtype,
        module_type=d.kind.module_type,
        kind=d.kind.kind,
        kind_from=d.kind.kind_from,
        matrices=len(d.plans),
        skipped=dict(d.skipped),
        decision=decision_text(d),
    )


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
            said.append(
                "analyzed as " + ", ".join(f"{p.part} {p.shape[0]} x {p.shape[1]}" for p in d.plans)
            )
    for reason, n in d.skipped.items():
        said.append(f"skipped: {reason}" + (f" ({n} parts)" if n > 1 else ""))
    return "; ".join(said)


# -- writers ---------------------------------------------------------------------------------


def write_description(description: Description, fmt: str, out: IO[str]) -> None:
    """Write ``description`` as "table" (one line per tensor, then counts), "json" or "csv"."""
    if fmt == "json":
        doc = {
            "tensors": [t.to_dict() for t in description.tensors],
            "summary": description.summary(),
            "options": vars(description.options),
        }
        json.dump(doc, out, indent=1, default=list)
        out.write("\n")
    elif fmt == "csv":
        left_out = ("skipped",) if description.base_label is not None else ("skipped", "base")
        names = [f for f in TensorDescription.__dataclass_fields__ if f not in left_out]
        writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for t in description.tensors:
            row = t.to_dict()
            row["shape"] = "x".join(map(str, t.shape))
            writer.writerow(
                {
                    k: "" if v is None else escape(v) if isinstance(v, str) else v
                    for k, v in row.items()
                }
            )
    else:
        _write_table(description, out)


def _write_table(description: Description, out: IO[str]) -> None:
    multi = len(description.models) > 1
    paired = description.base_label is not None
    header = (
        (["model"] if multi else [])
        + ["name", "shape", "dtype", "kind", "from", "decision"]
        + (["base"] if paired else [])
    )
    rows = [
        [
            escape(c)
            for c in ([t.model] if multi else [])
            + [
                t.name,
                "x".join(map(str, t.shape)) or "scalar",
                t.dtype,
                t.kind,
                t.kind_from,
                t.decision,
            ]
            + ([t.base or "-"] if paired else [])
        ]
        for t in description.tensors
    ]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    if rows:
        for row in [header, ["-" * w for w in widths]] + rows:
            out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
        out.write("\n")
    s = description.summary()
    models = f"{len(description.models)} model{'s' if len(description.models) != 1 else ''}"
    out.write(
        f"Described: {s['tensors']} tensors in {models}; {s['matrices']} matrices would be "
        "analyzed\n"
    )
    for by in ("kind", "kind_from"):
        counts = ", ".join(f"{k} {n}" for k, n in description.counts(by).items())
        out.write(f"  tensors by {by}: {counts}\n")
    for err in description.errors:
        out.write(f"  ERROR: {escape(err)}\n")
    out.write(f"  {NOTE}\n")
