"""python -m services.prefill --port 7200 --kvstore 127.0.0.1:7100 [--model DIR] ..."""

from pdserve.v1 import common_pb2, common_pb2_grpc, worker_pb2, worker_pb2_grpc
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

    def add_servicers(server, service):
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(service, server)
        common_pb2_grpc.add_WorkerServicer_to_server(service, server)
        return [worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name,
                common_pb2.DESCRIPTOR.services_by_name["Worker"].full_name]

    run_worker("prefill", args, make_service, add_servicers)


if __name__ == "__main__":
    main()
