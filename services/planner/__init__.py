"""The planner: profiler, latency model, simulator and placement search (DistServe's, OSDI'24).

python -m services.planner profile|simulate|search --help
"""

from services.common.latency_profile import DecodeLatency, LatencyProfile, Overheads, PrefillLatency, TransferSpec

from .simulator import SimConfig, SimResult, Slo, simulate

__all__ = [
    "DecodeLatency",
    "LatencyProfile",
    "Overheads",
    "PrefillLatency",
    "SimConfig",
    "SimResult",
    "Slo",
    "TransferSpec",
    "simulate",
]
