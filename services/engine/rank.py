"""A rank of a tensor- or pipeline-parallel instance other than 0 (parallel.py starts it):
`python -m services.engine.rank SPEC` loads its shard of the model and runs every forward pass rank
0 sends it (ForwardInputs frames on stdin, parallel.py), until rank 0 says stop or is gone."""

from __future__ import annotations

import faulthandler
import json
import logging
import sys

import torch
import torch.distributed as dist

from .config import EngineConfig, ModelConfig
from .engine import Engine
from .parallel import STOP, config_fields, die_with_parent, join_group, rank_device, read_frame
from .runner import ForwardInputs


def follow(spec: dict) -> None:
    rank = spec["rank"]
    die_with_parent(spec["parent"])
    faulthandler.enable()  # a native crash leaves the Python stacks in the log
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank-{rank} %(levelname)s %(message)s")
    torch.set_num_threads(spec["threads"])
    fields = config_fields(spec)
    fields["kv_pool_name"] = None  # rank 0's name; each rank's pool gets its own
    device = fields["device"] if fields["ranks_share_device"] else rank_device(fields["device"], spec["local_rank"])
    config = EngineConfig(**{**fields, "device": device})
    store = f"{spec['store_host']}:{spec['store_port']}"
    tp, pipeline = join_group(rank, config, store, ModelConfig.from_pretrained(spec["model_dir"]).num_layers)
    engine = Engine(spec["model_dir"], config, tp=tp, pipeline=pipeline)
    try:
        while True:
            frame = read_frame(sys.stdin.buffer)
            if frame is None or frame == STOP:  # rank 0 is gone, or stops the instance
                break
            engine.runner.forward(ForwardInputs.from_bytes(frame))
    finally:
        engine.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    follow(json.loads(sys.argv[1]))
