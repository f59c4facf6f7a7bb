"""python -m services.colocated --port 7400 [--model DIR] ..."""

from services.common.engine_worker import run_worker, worker_parser

from .server import ColocatedService


def main(argv=None) -> None:
    args = worker_parser("pdserve colocated worker (prefill + decode)", port=7400, metrics_port=9400,
                         kvstore=False).parse_args(argv)

    def make_service(engine, registry, worker_id):
        return ColocatedService(
            engine, node_id=args.node_id, model_name=engine.kv_pool.layout.model_id,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, registry=registry,
            stream_interval=args.stream_interval,
        )

    run_worker("colocated", args, make_service, "ColocatedWorker")


if __name__ == "__main__":
    main()
