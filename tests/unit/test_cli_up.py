"""`pdserve up` refuses a bad emulation, cluster or plan setup before it starts anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROFILE = os.path.join(ROOT, "profiles", "llama-3-8b-H100-80G-analytic.json")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--emulate", "/nonexistent/profile.json"], "--emulate: "),
        (["--emulate", os.path.join(ROOT, "README.md")], "--emulate: "),  # not JSON
        (["--prefill-profile", PROFILE], "--prefill-profile and --decode-profile go together"),
        (["--routers", "0"], "--routers must be >= 1"),
        (["--tp", "2"], "--tp: for colocated mode (this cluster is disaggregated)"),
        (["--mode", "colocated", "--prefill-tp", "2"], "--prefill-tp: for disaggregated mode"),
        (["--decode-tp", "0"], "--decode-tp must be >= 1"),
        (["--prefill-tp", "2", "--emulate", PROFILE], "its profile's"),
        (["--pp", "2"], "--pp: for colocated mode"),
        (["--decode-pp", "0"], "--decode-pp must be >= 1"),
        (["--prefill-pods", "2"], "--prefill-pods: 2 pods must each hold whole pipeline stages of the 1"),
        (["--mode", "colocated", "--tp", "0"], "--tp must be >= 1"),
        (["--mode", "colocated", "--tp", "2", "--emulate", PROFILE], "its profile's"),
    ],
)
def test_a_bad_emulation_or_cluster_setup_is_refused_up_front(tmp_path, args, message):
    _assert_refused(tmp_path, args, message)


def _assert_refused(tmp_path, args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--port", "0", "--http-port", "0", "--log-dir", str(tmp_path)]
        + list(args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # no service was started (none wrote a log)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """A plan (with its colocated baseline) and one searched with --no-colocated."""
    out = {}
    for name, flags in (("plan", []), ("plan-no-colocated", ["--no-colocated"])):
        folder = tmp_path_factory.mktemp(name)
        subprocess.run(
            [sys.executable, "-m", "services.cli", "plan", "search", "--model", "llama-3-8b", "--gpu", "H100-80G"]
            + ["--nodes", "2", "--gpus-per-node", "1", "--rate", "5", "--min-duration", "2", "--num-requests", "100"]
            + ["--rel-tol", "0.2", "--workers", "1", "--out-dir", str(folder), *flags],
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=300,
        )
        out[name] = str(folder / "plan.json")
    tp2 = json.loads(open(PROFILE).read()) | {"tensor_parallel": 2}
    out["tp2-profile"] = str(tmp_path_factory.mktemp("profiles") / "tp2.json")
    with open(out["tp2-profile"], "w") as f:
        json.dump(tp2, f)
    return out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--plan", "{plan}", "--prefill", "2"], "--plan sets the layout: drop --prefill"),
        (["--plan", "{plan}", "--nodes", "4", "--placement", "spread"], "drop --nodes, --placement"),
        (["--plan", os.path.join(ROOT, "README.md")], "--plan: "),  # not JSON
        (["--plan", PROFILE], "not a plan"),
        (["--plan", "{plan}", "--emulate", "{tp2-profile}"], "its prefill instances are tp=1, pp=1; "),
        (["--plan", "{plan-no-colocated}", "--mode", "colocated"], "no colocated baseline"),
        (["--mode", "colocated", "--prefill-profile", PROFILE], "for disaggregated mode"),
    ],
)
def test_a_bad_plan_setup_is_refused_up_front(tmp_path, plans, args, message):
    _assert_refused(tmp_path, [a.format(**plans) for a in args], message)


def test_the_launcher_gives_up_only_on_a_crash_loop(monkeypatch):
    """Restarts far apart go on forever (a soak kills the same daemon many times); three within
    the window mean a crash loop, and the cluster stops."""
    import services.launcher as launcher

    cluster = launcher.Cluster(launcher.ClusterSpec(log_dir="/tmp/pdserve-test-restarts"))
    proc = cluster.procs[0]
    now = [1000.0]
    monkeypatch.setattr(launcher.time, "monotonic", lambda: now[0])
    for _ in range(10):  # one restart every 10 minutes
        assert not cluster.crash_looping(proc)
        cluster.restarts.setdefault(proc.name, []).append(now[0])
        now[0] += 600
    for _ in range(launcher.MAX_RESTARTS):  # then three in a minute
        cluster.restarts[proc.name].append(now[0])
        now[0] += 20
    assert cluster.crash_looping(proc)


def test_up_on_cuda_gives_each_instance_gpus_of_its_own():
    """`pdserve up --device cuda`: instance after instance, one GPU per rank (rank r of an instance
    on cuda:first+r, engine/parallel.py), so no two instances share a GPU."""
    import services.launcher as launcher

    spec = launcher.ClusterSpec(
        prefill=2,
        decode=1,
        device="cuda",
        parallel={"prefill": (2, 1), "decode": (1, 4)},
        pods={"decode": 2},  # the decode instance's second pod: a follower, GPUs of its own
        log_dir="/tmp/pdserve-gpus",
    )
    workers = [p for p in launcher.plan_processes(spec) if p.role in ("prefill", "decode", "follower")]

    def flag(argv: list[str], name: str) -> str:
        return argv[len(argv) - 1 - argv[::-1].index(name) + 1]  # the last one given wins

    assert [(p.name, flag(p.argv, "--device")) for p in workers] == [
        ("prefill-0", "cuda:0"),
        ("prefill-1", "cuda:2"),
        ("decode-0", "cuda:4"),
        ("decode-0-pod1", "cuda:6"),
    ]
    assert flag(workers[0].argv, "--tensor-parallel") == "2" and flag(workers[2].argv, "--pipeline-parallel") == "4"
    assert flag(workers[2].argv, "--pods") == "2"
    assert flag(workers[3].argv, "--leader").endswith(":" + flag(workers[2].argv, "--rendezvous-port"))
