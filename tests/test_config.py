"""Bad configurations fail before any work, naming the value and the allowed range.

Every field is checked when the config is built (tests/test_config_validation.py covers each
field); these tests pin the messages and the cross-field rules.
"""

import pytest

from shelora_core import FederatedConfig
from shelora_core.errors import ConfigError
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
        ("loss", "focal", "logit_adjusted"),
        ("head_lr_scale", 0.0, "must be > 0"),
        ("rounds", 0, ">= 1"),
        ("lr", 0.0, "> 0"),
        ("max_length", 1, ">= 2"),
        ("renegotiate_every", 0, "integer >= 1"),
        ("renegotiate_every", -3, "or None"),
        ("shelora_protect", "drop", "'withhold'"),
    ],
)
def test_bad_config_value_raises_naming_value(field, value, needle):
    with pytest.raises(ConfigError) as err:
        FederatedConfig(**{field: value})  # refused at construction
    assert field in str(err.value)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        # k m = 8 x 384 values per block > r_max (m + n) = 2 x 768 entries of the padded factors
        (dict(method="maskcrypt", ranks=(2,), he_budgets=(8,)), "lower he_budgets to <= 4"),
        (dict(method="maskcrypt", ranks=(2,), he_budgets=(1, 8)), "client 1 would encrypt 3072"),
        (dict(method="shelora", he_budgets=(2, 500)), "has 384: lower every budget to <= 384"),
        (dict(method="maskcrypt", he_budgets=(385,), ranks=(256,)), "<= 384"),
    ],
)
def test_budget_larger_than_the_layer_raises_naming_the_limit(changes, needle):
    with pytest.raises(ConfigError, match="config.he_budgets") as err:
        FederatedConfig(**changes)
    assert needle in str(err.value)


def test_maskcrypt_budget_that_fits_validates():
    FederatedConfig(method="maskcrypt", ranks=(2, 4), he_budgets=(1, 2)).validate()
    FederatedConfig(method="maskcrypt", cipher_mode="paper", ranks=(2,), he_budgets=(8,)).validate()


def test_layer_shapes_table_matches_the_loaded_model(minilm_model):
    from shelora_core.config import LAYER_SHAPES

    for name, shape in minilm_model.layer_shapes.items():
        assert LAYER_SHAPES["minilm"][name.rsplit(".", 1)[-1]] == shape


def test_more_clients_than_examples_raises():
    with pytest.raises(ConfigError, match="more clients than the data allows"):
        FederatedConfig(num_clients=50, train_examples=100, min_client_examples=10)


def test_fingerprint_changes_with_results_relevant_fields_only():
    a = FederatedConfig()
    assert a.fingerprint() == FederatedConfig().fingerprint()
    assert a.fingerprint() != a.replace(seed=1).fingerprint()
    assert a.fingerprint() != a.replace(ranks=(8, 16)).fingerprint()


def test_new_fields_leave_the_fingerprints_of_existing_runs_unchanged():
    # pinned before shelora_protect / renegotiate_every / maskcrypt existed
    assert FederatedConfig().fingerprint() == "d8a3745210b6"
    she = FederatedConfig(method="shelora")
    assert she.fingerprint() == "03541a168596"
    assert she.replace(shelora_protect="withhold").fingerprint() != she.fingerprint()
    assert she.replace(renegotiate_every=5).fingerprint() != she.fingerprint()
    assert she.replace(loss="logit_adjusted").fingerprint() != she.fingerprint()
    assert she.replace(head_lr_scale=10.0).fingerprint() != she.fingerprint()
    assert she.replace(shelora_protect="encrypt", renegotiate_every=None) == she


def test_negotiation_rounds_every_k():
    cfg = FederatedConfig(method="shelora", renegotiate_every=3)
    assert [cfg.negotiation_round(r) for r in range(1, 9)] == [1, 1, 1, 4, 4, 4, 7, 7]
    assert {FederatedConfig().negotiation_round(r) for r in range(1, 9)} == {1}


def test_config_roundtrips_through_dict():
    cfg = FederatedConfig(ranks=[8, 16, 32], target_modules=["query"])
    assert FederatedConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config field.*did you mean 'rounds'"):
        FederatedConfig.from_dict({"rnuods": 3})


def test_client_ranks_are_assigned_cyclically():
    cfg = FederatedConfig(num_clients=5, ranks=(8, 16, 32))
    assert cfg.client_ranks == (8, 16, 32, 8, 16)


def test_profiles_build_valid_grids():
    quick = federated_tuning_grid("quick")
    assert len(quick) == 20
    variants = [c.variant for c in quick]
    assert len({c.run_name for c in quick}) == 20  # no two runs share checkpoints
    assert len(set(variants[8:])) == 12  # the encrypted and defended runs have distinct labels
    for v in (
        "maskcrypt-delta",
        "shelora-delta-random",
        "shelora-delta-withhold",
        "flexlora-dp",
        "shelora-dp-delta",
        "shelora+first-layers-delta",
        "shelora-delta-secretA",
    ):
        assert variants.count(v) == 1
    paper = federated_tuning_grid("paper")
    assert {c.model for c in paper} == {"minilm", "smollm2"}
    assert len({c.run_name for c in paper}) == len(paper)
    with pytest.raises(ValueError, match="unknown profile"):
        profile_config("fast")


def test_notebook_05_quick_runs_slow_the_head_and_overrides_still_win():
    base = profile_config("quick")
    quick = federated_tuning_grid("quick")
    for cfg in quick:  # the adapter carries the learning: head at 0.01x, constant adapter lr
        assert (cfg.head_lr_scale, cfg.lr, cfg.lr_final_ratio) == (0.01, 1e-2, 1.0)
        assert (cfg.rounds, cfg.eval_examples) == (4, 600)
        assert cfg.num_clients == base.num_clients and cfg.local_steps == base.local_steps
    # the profile itself (demo, faults, membership's overfit setting) is unchanged
    assert base.head_lr_scale == 10.0
    assert {c.rounds for c in federated_tuning_grid("quick", rounds=1)} == {1}
    assert federated_tuning_grid("quick", head_lr_scale=2.0)[0].head_lr_scale == 2.0
    # the paper grid starts from the paper profile as it is
    assert federated_tuning_grid("paper")[0] == profile_config(
        "paper", method="fedavg", ranks=(8,), partition="iid"
    )


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_grid_has_fedshield_with_its_pruning_schedule_laid_over_the_rounds_run(profile):
    grid = federated_tuning_grid(profile)
    shield = [c for c in grid if c.method == "fedshield"]
    assert [c.prune_schedule_rounds for c in shield] == [None, grid[0].rounds]
    plain, scaled = shield
    assert scaled.variant == f"fedshield-prune{grid[0].rounds}" and plain.variant == "fedshield"
    # the same run otherwise: only the schedule differs
    assert scaled.replace(prune_schedule_rounds=None) == plain


def test_paper_grid_runs_shelora_on_smollm2_beside_the_flexlora_control():
    smol = {
        (c.variant, c.partition): c for c in federated_tuning_grid("paper") if c.model == "smollm2"
    }
    she, flex = smol[("shelora-delta", "iid")], smol[("flexlora", "iid")]
    assert she.replace(method="flexlora") == flex  # same data, schedule, ranks and learning rate


def test_prune_schedule_rounds_is_a_late_field():
    cfg = FederatedConfig(method="fedshield")
    assert cfg.prune_schedule_rounds is None
    assert cfg.replace(prune_schedule_rounds=None).fingerprint() == cfg.fingerprint()
    assert cfg.replace(prune_schedule_rounds=20).fingerprint() != cfg.fingerprint()
    old = cfg.to_dict()
    del old["prune_schedule_rounds"]  # a config saved before the field existed
    assert FederatedConfig.from_dict(old) == cfg
    assert cfg.replace(prune_schedule_rounds=20.0).prune_schedule_rounds == 20
    # the label says the schedule was laid over the rounds; without pruning there is none
    assert cfg.replace(prune_schedule_rounds=20).variant == "fedshield-prune20"
    assert cfg.replace(prune_schedule_rounds=20, prune=False).variant == "fedshield"
