"""The planner's command line end to end: profile the tiny engine, simulate on a trace, search."""

import argparse
import json

import pytest
import yaml

from services.common.latency_profile import LatencyProfile
from services.planner.cli import add_subparsers, main
from services.planner.workload import make_trace, write_trace


def test_profile_the_tiny_engine_then_simulate_it(tmp_path, capsys):
    profile_path = tmp_path / "profile.json"
    assert (
        main(
            [
                "profile",
                "--model",
                "llama",
                "--quick",
                "--threads",
                "1",
                "--kv-cache-mib",
                "16",
                "--out",
                str(profile_path),
                "--first-token-ms",
                "2",
            ]
        )
        == 0
    )
    data = json.loads(profile_path.read_text())
    assert data["schema"] == "pdserve.profile/v1" and data["source"] == "measured"
    assert data["prefill"]["a"] + data["prefill"]["b"] > 0 and data["decode"]["a"] + data["decode"]["c"] > 0
    assert data["kv_capacity_tokens"] > 0 and data["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # 2 layers, 2 KV heads
    assert data["overheads"]["first_token_s"] == 0.002
    assert len(data["samples"]["prefill"]) >= 3 and len(data["samples"]["decode"]) >= 3
    profile = LatencyProfile.load(str(profile_path))
    assert profile.max_batched_tokens >= 128
    assert "profiling" in capsys.readouterr().err  # the progress bar

    trace_path = tmp_path / "trace.jsonl"
    write_trace(str(trace_path), make_trace("chat", 2.0, 60, seed=0, scale=0.1))
    out = tmp_path / "sim.json"
    assert (
        main(
            [
                "simulate",
                "--profile",
                str(profile_path),
                "--trace",
                str(trace_path),
                "--rates",
                "1,2,4,8",
                "--slo-ttft",
                "1.0",
                "--slo-tpot",
                "0.5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert [run["rate"] for run in result["runs"]] == [1.0, 2.0, 4.0, 8.0]
    for run in result["runs"]:
        assert len(run["requests"]) == 60
        assert {"ttft_s", "tpot_s", "ok"} <= set(run["requests"][0])
        assert 0.0 <= run["summary"]["attainment"] <= 1.0
        assert run["summary"]["ttft_s"]["mean"] >= 0.002  # includes the first-token overhead
    out = tmp_path / "coloc.json"
    assert (
        main(
            [
                "simulate",
                "--profile",
                str(profile_path),
                "--mode",
                "colocated",
                "--workload",
                "code",
                "--rate",
                "3",
                "--num-requests",
                "50",
                "--scale",
                "0.1",
                "--no-requests",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    run = json.loads(out.read_text())["runs"][0]
    assert "requests" not in run and run["summary"]["num_requests"] == 50


def test_analytic_profile_and_search_commands(tmp_path, capsys):
    profile_path = tmp_path / "a100.json"
    assert (
        main(
            [
                "profile",
                "--analytic",
                "--model",
                "llama-3-8b",
                "--gpu",
                "H100-80G",
                "--tp",
                "2",
                "--pp",
                "2",
                "--inter-node-gbps",
                "3.125",
                "--out",
                str(profile_path),
            ]
        )
        == 0
    )
    data = json.loads(profile_path.read_text())
    assert data["source"] == "analytic" and data["tensor_parallel"] == 2 and data["pipeline_parallel"] == 2
    assert data["notes"]["gpu"]["inter_node_bytes_per_s"] == 3.125e9

    out_dir = tmp_path / "plan"
    assert (
        main(
            [
                "search",
                "--model",
                "llama-3-8b",
                "--gpu",
                "H100-80G",
                "--nodes",
                "2",
                "--gpus-per-node",
                "4",
                "--affinity",
                "low",
                "--num-requests",
                "150",
                "--min-duration",
                "2",
                "--rel-tol",
                "0.2",
                "--top-segments",
                "1",
                "--no-colocated",
                "--out-dir",
                str(out_dir),
            ]
        )
        == 0
    )
    plan = json.loads((out_dir / "plan.json").read_text())
    assert plan["algorithm"].startswith("low-affinity")
    values = yaml.safe_load((out_dir / "values.yaml").read_text())
    assert values["prefill"]["replicaCount"] == plan["prefill"]["replicas"]
    assert "segments" in values["placement"]
    assert "wrote" in capsys.readouterr().out


def test_plan_command_plugs_into_a_parent_cli():
    parser = argparse.ArgumentParser(prog="pdserve")
    add_subparsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "simulate", "--profile", "p.json", "--rates", "1,2"])
    assert args.command == "plan" and args.plan_command == "simulate" and callable(args.func)


def test_profile_refits_decode_on_a_worker_step_log(tmp_path):
    """`plan profile --step-log`: the engine is measured, then decode is refitted on the log's
    steps (here a decode worker whose steps cost 4 ms + 0.5 us per context token + 0.3 ms per
    sequence), while prefill, absent from the log, keeps the engine's fit."""
    from services.runtime.step_log import StepLog

    log_path = tmp_path / "decode-steps.jsonl"
    log = StepLog(str(log_path))
    t = 50.0
    for batch in (1, 2, 4, 8, 16, 32):
        for context_per_seq in (64, 256, 1024):
            for step in range(5):  # the last step finishes the batch: the idle gap after it is no step's cost
                seconds = 0.004 + 5e-7 * batch * context_per_seq + 3e-4 * batch
                log.write(
                    {
                        "t": t,
                        "kind": "decode",
                        "batch": batch,
                        "context_tokens": batch * context_per_seq,
                        "max_context": context_per_seq,
                        "running_after": 0 if step == 4 else batch,
                        "seconds": seconds,
                    }
                )
                t += seconds
            t += 1.0
    log.close()
    out = tmp_path / "served.json"
    assert (
        main(
            [
                "profile",
                "--model",
                "llama",
                "--quick",
                "--threads",
                "1",
                "--kv-cache-mib",
                "16",
                "--step-log",
                str(log_path),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["decode"] == pytest.approx({"a": 0.004, "b": 5e-7, "c": 3e-4}, rel=1e-6)
    assert data["notes"]["step_logs"] == [str(log_path)]
    assert len(data["samples"]["prefill"]) >= 3  # the engine's prefill points, not the log's


@pytest.fixture
def small_profile(tmp_path):
    path = tmp_path / "p.json"
    assert main(["profile", "--analytic", "--model", "llama-3-8b", "--gpu", "H100-80G", "--out", str(path)]) == 0
    return str(path)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d, p: ["simulate", "--profile", str(d / "missing.json")], "No such file"),
        (lambda d, p: ["simulate", "--profile", _write(d / "bad.json", "{not json")], "bad.json: not JSON"),
        (lambda d, p: ["simulate", "--profile", _write(d / "empty.json", "{}")], "not a latency profile"),
        (
            lambda d, p: ["simulate", "--profile", p, "--trace", _write(d / "t.jsonl", '{"arrival_s": 0}\n')],
            "t.jsonl:1: missing field 'prompt_tokens'",
        ),
        (lambda d, p: ["simulate", "--profile", p, "--trace", _write(d / "t.jsonl", "{oops\n")], "t.jsonl:1: not JSON"),
        (lambda d, p: ["simulate", "--profile", p, "--trace", _write(d / "t.jsonl", "")], "no requests"),
        (lambda d, p: ["simulate", "--profile", p, "--rates", "0,4"], "--rates: every value must be > 0"),
        (lambda d, p: ["simulate", "--profile", p, "--rates", "1,x"], "--rates: comma-separated numbers"),
        (lambda d, p: ["simulate", "--profile", p, "--num-prefill", "0", "--num-decode", "0"], "need at least one"),
        (lambda d, p: ["simulate", "--profile", p, "--rate", "-1"], "rate"),
        (lambda d, p: ["simulate", "--profile", p, "--out", str(d / "nodir" / "s.json")], "does not exist"),
        (lambda d, p: ["search", "--attainment", "90"], "--attainment"),
        (lambda d, p: ["search", "--rel-tol", "0"], "--rel-tol"),
        (
            lambda d, p: [
                "search",
                "--model",
                "llama-2-7b",
                "--nodes",
                "1",
                "--gpus-per-node",
                "1",
                "--workers",
                "1",
                "--num-requests",
                "100",
                "--no-colocated",
                "--out-dir",
                str(d / "plan"),
            ],
            "cannot hold one prefill",
        ),
    ],
)
def test_user_mistakes_are_one_line_errors(tmp_path, small_profile, capsys, make_args, message):
    """Bad values and bad files end with `error: ...` naming the problem and exit status 2."""
    assert main(make_args(tmp_path, small_profile)) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # (after any progress bar)
    assert last_line.startswith("error: ") and message in last_line, last_line


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)
