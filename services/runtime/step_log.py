"""`--step-log FILE`: one JSON line per engine step of a worker, for profiling the serving
instance itself (`pdserve plan profile --step-log`, DistServe profiles on the real instances).

    {"t": 4521.0312, "kind": "decode", "batch": 9, "context_tokens": 3560, "max_context": 1400,
     "running_after": 9, "seconds": 0.0057}
    {"t": 4521.0401, "kind": "prefill", "lengths": [81, 412], "seconds": 0.031}

`t` is the step's start on the node's monotonic clock (the same in every process on the node), so
a client on the node can pick out the steps of a time window. `seconds` is the engine call alone;
the time to the next step's `t` also holds the worker's own work between steps (streaming tokens,
admissions), which is what a decode step costs a client when the batch keeps running
(`running_after` > 0).
"""

from __future__ import annotations

import json


class StepLog:
    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1)  # line-buffered: a reader sees whole steps

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()


def read_step_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
