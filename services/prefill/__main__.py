"""python -m services.prefill --port 7200 --kvstore 127.0.0.1:7100 [--model DIR] ..."""

from services.common.engine_worker import run_worker, worker_parser

from .server import PrefillService


def main(argv=None) -> None:
    parser = worker_parser("pdserve prefill worker", port=7200, metrics_port=9200, kvstore=True)
    args = parser.parse_args(argv)
    from services.kvstore.client import KvStoreClient

    def make_service(engine, registry, worker_id):
        return PrefillService(
            engine, KvStoreClient(args.kvstore), worker_id=worker_id, node_id=args.node_id,
            model_name=engine.kv_pool.layout.model_id, max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs, registry=registry,
        )

    run_worker("prefill", args, make_service, "PrefillWorker")


if __name__ == "__main__":
    main()
