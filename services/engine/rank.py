"""A rank of a tensor- or pipeline-parallel instance other than 0 (parallel.py starts it):
`python -m services.engine.rank SPEC` loads its shard of the model and runs every forward pass rank
0 sends it (pickled ForwardInputs on stdin), until rank 0 says stop or is gone."""

from __future__ import annotations

import json
import logging
import pickle
import sys

import torch
import torch.distributed as dist

from .config import EngineConfig, ModelConfig
from .engine import Engine
from .parallel import config_fields, die_with_parent, join_group, rank_device
from .runner import ForwardInputs


def follow(spec: dict) -> None:
    rank = spec["rank"]
    die_with_parent(spec["parent"])
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank-{rank} %(levelname)s %(message)s")
    torch.set_num_threads(spec["threads"])
    fields = config_fields(spec)
    fields["kv_pool_name"] = None  # rank 0's name; each rank's pool gets its own
    config = EngineConfig(**{**fields, "device": rank_device(fields["device"], spec["local_rank"])})
    store = f"{spec['store_host']}:{spec['store_port']}"
    tp, pipeline = join_group(rank, config, store, ModelConfig.from_pretrained(spec["model_dir"]).num_layers)
    engine = Engine(spec["model_dir"], config, tp=tp, pipeline=pipeline)
    try:
        while True:
            try:
                inputs: ForwardInputs | None = pickle.load(sys.stdin.buffer)
            except EOFError:  # rank 0 is gone
                break
            if inputs is None:
                break
            engine.runner.forward(inputs)
    finally:
        engine.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    follow(json.loads(sys.argv[1]))
