"""The node-local KV-transfer daemon (python -m services.kvstore) and its worker-side client."""
