"""The model engine shared by prefill, decode and colocated workers (docs/architecture.md has the
module map). Import from the modules: config, sequence, block_manager and scheduler import no
torch, so the router can read a model's limits without loading the engine."""
