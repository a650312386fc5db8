"""Writes ``selection_baseline.json``: which matrices the selection of main at f2bea44 (before
issue 17's classification by kind) made of the 26 AllenNLP 0.9 test archives (raw weights), the
three fixture archives and the two 0.9 archives that AllenNLP 2.10 builds
(models built) and MiniLM, under the default options and under
a wide set (``min_q=1, include conv+embeddings, split_fused``): per model, the records' ``name``
and ``module_type``, and the skip counts.

The file is a record of that old behaviour for ``tests/test_kinds.py``, which asserts that the new
selection differs from it exactly by the misclassified tensors it names. Running this script on
later code records the later selection, not the baseline: it is kept to show how the file was made.

    PYTHONPATH=. .venv/bin/python tests/data/make_selection_baseline.py WHEEL MINILM_SAFETENSORS
"""
import json
import sys
import tempfile
import zipfile
from pathlib import Path

from allennlp_analyze import analyze
from allennlp_analyze.plugin.subcommand import analyze_archives

REPO = Path(__file__).resolve().parents[2]
#: The 0.9 archives whose models AllenNLP 2.10 builds (the others fall back to raw weights).
BUILT09 = ("basic_classifier/serialization", "simple_tagger/serialization")
OPTION_SETS = {"default": {},
               "wide": {"min_q": 1.0, "include": ("conv", "embeddings"), "split_fused": True}}


def records(result):
    return {"records": [[r.name, r.module_type] for r in result.records],
            "skipped": dict(result.summary.skipped)}


def main(wheel: str, minilm: str) -> None:
    out = {"generated_from": "main f2bea44", "option_sets": OPTION_SETS, "raw09": {},
           "built09": {}, "built_fixtures": {}, "minilm": {}}
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as z:
        for name in sorted(n for n in z.namelist() if n.endswith("model.tar.gz")):
            key = name.split("fixtures/")[1].rsplit("/model.tar.gz")[0]
            path = Path(tmp) / f"{len(out['raw09']):02d}.tar.gz"
            path.write_bytes(z.read(name))
            out["raw09"][key] = {o: records(analyze(str(path), **kw)) for o, kw in OPTION_SETS.items()}
            if key in BUILT09:
                out["built09"][key] = {o: records(analyze_archives(str(path), **kw))
                                       for o, kw in OPTION_SETS.items()}
    for archive in sorted((REPO / "fixtures" / "archives").glob("*.tar.gz")):
        out["built_fixtures"][archive.name] = {
            o: records(analyze_archives(str(archive), **kw)) for o, kw in OPTION_SETS.items()}
    out["minilm"] = {o: records(analyze(minilm, **kw)) for o, kw in OPTION_SETS.items()}
    (Path(__file__).parent / "selection_baseline.json").write_text(json.dumps(out, indent=0) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
