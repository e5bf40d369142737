"""Bad configurations fail before any work, naming the value and the allowed range."""

import pytest

from shelora_core import FederatedConfig
from shelora_core.profiles import federated_tuning_grid, profile_config


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("dirichlet_alpha", 0.0, "dirichlet_alpha = 0.0"),
        ("dirichlet_alpha", -1.0, "must be > 0"),
        ("ranks", (0,), "every rank must be >= 1"),
        ("ranks", (), "at least one LoRA rank"),
        ("method", "fedprox", "choose one of"),
        ("model", "llama-7b", "models ship in packages"),
        ("dataset", "sst2", "rotten_tomatoes"),
        ("partition", "shards", "iid"),
        ("client_fraction", 0.0, "(0, 1]"),
        ("num_clients", 0, ">= 1"),
        ("rounds", 0, ">= 1"),
        ("lr", 0.0, "> 0"),
        ("max_length", 1, ">= 2"),
    ],
)
def test_bad_config_value_raises_naming_value(field, value, needle):
    with pytest.raises(ValueError) as err:
        FederatedConfig(**{field: value}).validate()
    assert field in str(err.value)
    assert needle in str(err.value)


def test_more_clients_than_examples_raises():
    with pytest.raises(ValueError, match="more clients than the data allows"):
        FederatedConfig(num_clients=50, train_examples=100, min_client_examples=10).validate()


def test_fingerprint_changes_with_results_relevant_fields_only():
    a = FederatedConfig()
    assert a.fingerprint() == FederatedConfig().fingerprint()
    assert a.fingerprint() != a.replace(seed=1).fingerprint()
    assert a.fingerprint() != a.replace(ranks=(8, 16)).fingerprint()


def test_config_roundtrips_through_dict():
    cfg = FederatedConfig(ranks=[8, 16, 32], target_modules=["query"])
    assert FederatedConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown config field"):
        FederatedConfig.from_dict({"rnuods": 3})


def test_client_ranks_are_assigned_cyclically():
    cfg = FederatedConfig(num_clients=5, ranks=(8, 16, 32))
    assert cfg.client_ranks == (8, 16, 32, 8, 16)


def test_profiles_build_valid_grids():
    assert len(federated_tuning_grid("quick")) == 12
    paper = federated_tuning_grid("paper")
    assert {c.model for c in paper} == {"minilm", "smollm2"}
    with pytest.raises(ValueError, match="unknown profile"):
        profile_config("fast")
