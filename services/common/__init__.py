"""Helpers shared by every pdserve service (one copy of each mechanism)."""
