import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Generated tiny models are cached inside the checkout unless the caller chose a cache.
os.environ.setdefault("PDSERVE_CACHE", os.path.join(ROOT, ".cache"))
