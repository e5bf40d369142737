"""Shared fixtures. Everything runs offline: the model and the data ship in pip packages."""

import os

for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[var] = "1"
os.environ["SHELORA_QUIET"] = "1"
# `make test` runs pytest-xdist workers on the two cores: each worker (and the notebook kernels
# and SuperNodes it starts, which inherit the environment) then computes on one thread instead
# of the workers oversubscribing both cores; a plain `pytest` keeps two threads
_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if _THREADS == 1:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(_THREADS)


@pytest.fixture(scope="session")
def minilm_model():
    """One MiniLM with LoRA adapter slots for ranks 2, 4 and 8 (shared: adapters are swapped)."""
    from shelora_core.lora import LoraModel

    return LoraModel("minilm", num_labels=2, ranks=(2, 4, 8), alpha=16.0, seed=0)


@pytest.fixture()
def tiny_config():
    """A federated run that takes a few seconds: 2 clients, 2 rounds, 2 local steps."""
    from shelora_core import FederatedConfig

    return FederatedConfig(
        method="flexlora",
        model="minilm",
        num_clients=2,
        ranks=(2, 4),
        rounds=2,
        local_steps=2,
        batch_size=8,
        train_examples=120,
        eval_examples=48,
        min_client_examples=10,
        lr=5e-3,
        max_length=32,
    )
