"""Where pdserve keeps what it builds at run time: $PDSERVE_CACHE (default ~/.cache/pdserve), with
the embedded tiny models under models/ (services/tiny_models.py) and the compiled CPU kernels
under kernels/ (services/engine/kernels/cpu.py)."""

from __future__ import annotations

import os


def cache_dir() -> str:
    return os.environ.get("PDSERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pdserve"))
