"""python -m services.colocated --port 7400 [--model DIR] ..."""

from services.common.enums import Role
from services.runtime.worker import admission_limits, run_worker, worker_parser

from .server import ColocatedService


def main(argv=None) -> None:
    parser = worker_parser(Role.COLOCATED, "pdserve colocated worker (prefill + decode)", port=7400, metrics_port=9400)
    parser.add_flag(
        "--chunked-prefill",
        action="store_true",
        help="each step carries every running sequence's next token and fills the rest of "
        "--max-num-batched-tokens with prompt chunks (default: prefill first)",
    )
    args = parser.parse_args(argv)

    def make_service(engine, registry, worker_id):
        return ColocatedService(
            engine,
            node_id=args.node_id,
            model_name=engine.kv_pool.layout.model_id,
            registry=registry,
            stream_interval=args.stream_interval,
            chunked_prefill=args.chunked_prefill,
            **admission_limits(args),
        )

    run_worker(Role.COLOCATED, args, make_service)


if __name__ == "__main__":
    main()
