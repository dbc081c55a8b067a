"""Verifiable reward functions, importable as `rewards` (`from rewards import exact`; `rewards.get("exact")`)."""
from rewards.registry import REWARDS, get, register
from rewards.exact_match import exact

__all__ = ["REWARDS", "get", "register", "exact"]
