"""The model engine shared by prefill, decode and colocated workers."""

from .block_manager import BlockManager, OutOfBlocksError
from .config import EngineConfig, ModelConfig, SamplingParams, UnsupportedModelError
from .engine import Engine, StepOutput
from .kv_cache import KvLayout, KvPool
from .sequence import Sequence

__all__ = [
    "BlockManager", "Engine", "EngineConfig", "KvLayout", "KvPool", "ModelConfig", "OutOfBlocksError",
    "SamplingParams", "Sequence", "StepOutput", "UnsupportedModelError",
]
