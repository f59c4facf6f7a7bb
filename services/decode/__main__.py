"""python -m services.decode --port 7300 --kvstore 127.0.0.1:7100 [--model DIR] ..."""

from services.common.engine_worker import run_worker, worker_parser

from .server import DecodeService


def main(argv=None) -> None:
    args = worker_parser("pdserve decode worker", port=7300, metrics_port=9300, kvstore=True).parse_args(argv)
    from services.kvstore.client import KvStoreClient

    def make_service(engine, registry, worker_id):
        return DecodeService(
            engine, KvStoreClient(args.kvstore), worker_id=worker_id, node_id=args.node_id,
            model_name=engine.kv_pool.layout.model_id, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, registry=registry,
            stream_interval=args.stream_interval,
        )

    run_worker("decode", args, make_service, "DecodeWorker")


if __name__ == "__main__":
    main()
