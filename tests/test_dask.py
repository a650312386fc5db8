"""The Dask engine on a real ``LocalCluster`` (2 worker processes, one thread each, 127.0.0.1;
one for the whole module): a sweep over the fixture archives, MiniLM and generated safetensors
checkpoints (one split into tasks per matrix) equals the local run bit for bit, also through
``--scheduler``; a worker process killed by its PID mid-run loses nothing and duplicates
nothing; a sweep resumed on the cluster ends as the uninterrupted one; errors are one line."""
import json
import os
import signal
import threading
import time

import pytest

from allennlp_analyze import analyze, cli
from allennlp_analyze.journal import END_KEY

distributed = pytest.importorskip("distributed")
import dask  # noqa: E402


@pytest.fixture(scope="module")
def cluster(zoo):
    """Worker processes forked from this one, which has imported torch already (the archives'
    local run, in ``zoo``): they need not import it again (~3 s of CPU each, and again after a
    restart). The fork happens while this process's main thread waits (cluster start, or
    ``concurrent.futures.wait`` when the nanny restarts the killed worker)."""
    with dask.config.set({"distributed.worker.multiprocessing-method": "fork"}), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=":0") as lc, \
            distributed.Client(lc, set_as_default=False) as client:
        yield lc, client


@pytest.fixture(scope="module")
def zoo(sweep_zoo):
    return sweep_zoo


def test_cluster_equals_local_bit_for_bit(cluster, zoo, capsys):
    _, client = cluster
    sources, local = zoo
    remote = analyze(*sources, on_error="collect", executor=client.get_executor(),
                     progress=True)
    err = capsys.readouterr().err  # the client's bar over tasks
    assert f"{len(sources)} sources:" in err and "task/s" in err, err
    assert len(remote.records) == len(local.records) >= 40
    for a, b in zip(remote.records, local.records):
        assert a == b, (a.model, a.name)  # every float with ==, not approx
    assert remote.summary == local.summary and remote.sources == local.sources
    assert remote.summary.errors == [f"{sources[-1]} does not exist"]


def test_scheduler_option_gives_the_local_report(cluster, zoo, tmp_path, capsys):
    lc, _ = cluster
    sources = zoo[0][3:8] + zoo[0][-1:]  # MiniLM, the small generated ones, the missing one
    out = {}
    for how, extra in (("local", []), ("dask", ["--scheduler", lc.scheduler_address])):
        rc = cli.main([*sources, "--format", "json", "-o", str(tmp_path / how), *extra])
        out[how] = rc, (tmp_path / how).read_text(), capsys.readouterr()
    assert out["dask"] == out["local"]
    rc, text, (stdout, stderr) = out["dask"]
    assert rc == 2 and stdout == ""
    assert stderr == f"allennlp-analyze: error: {sources[-1]} does not exist\n"
    assert len(json.loads(text)["records"]) == 12 + 4 * 3


def test_worker_killed_midway_loses_and_repeats_nothing(cluster, zoo):
    _, client = cluster
    sources, local = zoo
    sources = sources[3:-1]  # the big one is split into tasks of ~0.2 s per matrix
    expected = [r for r in local.records if r.model in local.summary.models[3:]]
    pids = client.run(os.getpid)
    killed = {}

    def kill_a_busy_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for address, keys in client.processing().items():
                if any(str(k).startswith("part_task") for k in keys):
                    os.kill(pids[address], signal.SIGKILL)
                    killed[address] = keys
                    return
            time.sleep(0.002)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    remote = analyze(*sources, executor=client.get_executor())
    killer.join()
    assert killed, "no worker was busy with a part task"
    assert remote.records == expected  # the same records, each once, in the local order
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed one
    assert set(client.run(os.getpid).values()) - set(pids.values())


def test_resume_on_the_cluster(cluster, zoo, tmp_path):
    lc, _ = cluster
    sources = zoo[0][3:8]
    whole = tmp_path / "whole.jsonl"
    analyze(*sources, journal=whole)
    data = whole.read_bytes()
    first_end = data.index(END_KEY.encode())
    sweep = tmp_path / "sweep.jsonl"
    sweep.write_bytes(data[:data.index(b"\n", first_end) + 40])  # 1 source and a torn line
    rc = cli.main([*sources, "-o", str(sweep), "--resume", "--scheduler", lc.scheduler_address])
    assert rc == 0
    assert sweep.read_bytes() == data


def test_unreachable_scheduler_is_one_line(zoo, capsys):
    rc = cli.main([zoo[0][4], "--scheduler", "tcp://127.0.0.1:1"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("allennlp-analyze: error: cannot reach the Dask scheduler at "
                          "tcp://127.0.0.1:1: ") and err.count("\n") == 1, err


def test_comparison_on_the_cluster_equals_local(cluster, zoo):
    """``--base`` on the cluster: small checkpoints (one task each, no partner) and the split
    one compared with itself as the base (paired as a whole, compared part by part in tasks)
    give the local run's records, ΔW records included, and base summary, to the bit."""
    _, client = cluster
    sources = zoo[0][5:-1]  # the small generated checkpoints and the split one
    base = zoo[0][-2]
    local = analyze(*sources, base=base, delta=True)
    remote = analyze(*sources, base=base, delta=True, executor=client.get_executor())
    assert remote.records == local.records
    assert remote.summary == local.summary and remote.summary.base == local.summary.base
    # the split one's 3 large matrices and its NaN one pair (the latter, nonfinite, gets no ΔW)
    assert local.summary.base.paired == 4
    deltas = [r for r in remote.records if r.name.startswith("delta:")]
    assert [r.base_name for r in deltas] == [f"blocks.{i}.mlp.weight" for i in range(3)]
    assert all(r.sv_max == 0.0 for r in deltas)
