"""Aggregation methods, one module each; :func:`get_method` returns one by name."""

from __future__ import annotations

from typing import Any

from ..config import METHODS
from .base import Method
from .dp import FlexLoRADP
from .first_layers import FirstLayersSHELoRA
from .he_avg import FedShield, FullHE
from .maskcrypt import MaskCrypt
from .plaintext import FedAvg, FlexLoRA
from .shelora import SHELoRA
from .shelora_dp import SHELoRADP

__all__ = [
    "FedAvg",
    "FedShield",
    "FlexLoRA",
    "FlexLoRADP",
    "FirstLayersSHELoRA",
    "FullHE",
    "MaskCrypt",
    "Method",
    "SHELoRA",
    "SHELoRADP",
    "ckks_params_for",
    "get_method",
]

_REGISTRY: dict[str, type[Method]] = {
    "fedavg": FedAvg,
    "flexlora": FlexLoRA,
    "flexlora-dp": FlexLoRADP,
    "shelora": SHELoRA,
    "shelora+first-layers": FirstLayersSHELoRA,
    "shelora-dp": SHELoRADP,
    "fedshield": FedShield,
    "full_he": FullHE,
    "maskcrypt": MaskCrypt,
}

#: CKKS parameter set each encrypted method uses unless the config names one
DEFAULT_CKKS = {
    "shelora": {"delta": "add_only", "paper": "paper_mm", "packed": "packed"},
    "shelora+first-layers": {"delta": "add_only"},
    "shelora-dp": {"delta": "add_only"},
    "fedshield": "fedshield",
    "full_he": "fedshield",
    # delta: clients pre-weight, the server only adds; paper: the server multiplies by p_i
    "maskcrypt": {"delta": "add_only", "paper": "fedshield"},
}


if set(_REGISTRY) != set(METHODS):  # one list of names: config.METHODS
    raise ImportError(f"methods registry {sorted(_REGISTRY)} != config.METHODS {sorted(METHODS)}")


def get_method(name: str, cfg: Any = None) -> Method:
    """The method called ``name``, configured by ``cfg`` (a FederatedConfig) where it needs one."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(_REGISTRY)}") from None
    return cls(cfg)


def ckks_params_for(cfg: Any) -> str | None:
    """The CKKS parameter-set name for ``cfg`` (``None`` for plaintext methods and for SHE-LoRA's
    withhold ablation, which sends no ciphertext)."""
    if cfg.method == "shelora" and getattr(cfg, "shelora_protect", "encrypt") == "withhold":
        return None
    if cfg.ckks_params:
        return cfg.ckks_params
    d = DEFAULT_CKKS.get(cfg.method)
    return d[cfg.cipher_mode] if isinstance(d, dict) else d
