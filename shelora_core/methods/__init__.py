"""Aggregation methods, one module each; :func:`get_method` returns one by name."""

from __future__ import annotations

from .base import Method
from .plaintext import FedAvg, FlexLoRA

__all__ = ["Method", "get_method", "FedAvg", "FlexLoRA"]

_REGISTRY: dict[str, type[Method]] = {"fedavg": FedAvg, "flexlora": FlexLoRA}


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(_REGISTRY)}") from None
