"""What the three workers (prefill, decode, colocated) are built on: the engine thread, worker flags
and process setup, the Stats answer, and the streaming continuous-batch base of the decode and
colocated workers. Scheduling policy is not here but in services/engine/scheduler.py."""
