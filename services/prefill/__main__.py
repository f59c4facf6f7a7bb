"""python -m services.prefill --port 7200 --kvstore 127.0.0.1:7100 [--model DIR] ..."""

from services.common.enums import Role
from services.kvstore.client import KvStoreClient
from services.runtime.worker import admission_limits, run_worker, worker_parser

from .server import PrefillService


def main(argv=None) -> None:
    args = worker_parser(Role.PREFILL, "pdserve prefill worker", port=7200, metrics_port=9200).parse_args(argv)

    def make_service(engine, registry, worker_id):
        return PrefillService(
            engine,
            KvStoreClient(args.kvstore),
            worker_id=worker_id,
            node_id=args.node_id,
            model_name=engine.kv_pool.layout.model_id,
            registry=registry,
            node_prefix_fetch=args.node_prefix_fetch,
            **admission_limits(args),
        )

    run_worker(Role.PREFILL, args, make_service)


if __name__ == "__main__":
    main()
