"""Option validation: bad values are one AnalyzeError line (exit 2 on the command line)."""
import subprocess
import sys

import pytest

from allennlp_analyze import AnalysisOptions, AnalyzeError


@pytest.mark.parametrize("kwargs, words", [
    ({"min_q": 0.5}, "--min-q"),
    ({"min_dim": 0}, "--min-dim"),
    ({"rank_criterion": "median"}, "--rank-criterion"),
    ({"match": ["("]}, "invalid name pattern"),
    ({"device": "nosuch"}, "not a torch device"),
])
def test_bad_options_raise_one_clear_error(kwargs, words):
    with pytest.raises(AnalyzeError) as e:
        AnalysisOptions(**kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_cpu_device_means_numpy():
    assert AnalysisOptions(device="cpu").device is None


def test_unavailable_cuda_is_a_clear_error(minilm_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, "-m", "allennlp_analyze", str(minilm_path),
                           "--device", "cuda"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("allennlp-analyze: error: --device cuda: "
                                   "no CUDA device is available")
    assert proc.stdout == ""
