"""python -m services.decode --port 7300 --kvstore 127.0.0.1:7100 [--model DIR] ..."""

from services.common.enums import Role
from services.kvstore.client import KvStoreClient
from services.runtime.worker import admission_limits, run_worker, worker_parser

from .server import DecodeService


def main(argv=None) -> None:
    args = worker_parser(Role.DECODE, "pdserve decode worker", port=7300, metrics_port=9300).parse_args(argv)

    def make_service(engine, registry, worker_id):
        return DecodeService(
            engine,
            KvStoreClient(args.kvstore),
            worker_id=worker_id,
            node_id=args.node_id,
            model_name=engine.kv_pool.layout.model_id,
            registry=registry,
            stream_interval=args.stream_interval,
            offer_prefixes=not args.no_prefix_caching,
            **admission_limits(args),
        )

    run_worker(Role.DECODE, args, make_service)


if __name__ == "__main__":
    main()
