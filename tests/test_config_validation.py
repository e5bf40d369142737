"""Every configuration field is typed and range-checked when the config is built (issue 12).

A bad value raises :class:`ConfigError` from the constructor itself (not only from ``validate()``),
naming the field; the configurations of every committed run still load with the same run name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shelora_core.config import METHODS, FederatedConfig
from shelora_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
NAN, INF = math.nan, math.inf

# (field, bad value, other fields the case needs); every field of FederatedConfig appears below
BAD_VALUES: list[tuple[str, object, dict]] = [
    ("method", 3, {}),
    ("method", "fedprox", {}),
    ("method", None, {}),
    ("model", "llama-7b", {}),
    ("model", 1, {}),
    ("dataset", "sst2", {}),
    ("dataset", None, {}),
    ("num_clients", 0, {}),
    ("num_clients", 2.5, {}),
    ("num_clients", "10", {}),
    ("num_clients", True, {}),
    ("num_clients", NAN, {}),
    ("client_fraction", 0.0, {}),
    ("client_fraction", 1.5, {}),
    ("client_fraction", NAN, {}),
    ("client_fraction", INF, {}),
    ("client_fraction", "1", {}),
    ("client_fraction", True, {}),
    ("ranks", 8, {}),
    ("ranks", "8", {}),
    ("ranks", (8.7,), {}),
    ("ranks", ("a",), {}),
    ("ranks", (), {}),
    ("ranks", (0,), {}),
    ("ranks", (8, NAN), {}),
    ("ranks", (8, True), {}),
    ("ranks", {8, 16}, {}),
    ("ranks", None, {}),
    ("lora_alpha", NAN, {}),
    ("lora_alpha", INF, {}),
    ("lora_alpha", 0.0, {}),
    ("lora_alpha", -16.0, {}),
    ("lora_alpha", "16", {}),
    ("target_modules", "query", {}),
    ("target_modules", ("fc1",), {}),
    ("target_modules", ("q_proj",), {}),  # a SmolLM2 module on MiniLM
    ("target_modules", (), {}),
    ("target_modules", (1,), {}),
    ("target_modules", ("query", "query"), {}),
    ("partition", "shards", {}),
    ("partition", 0, {}),
    ("dirichlet_alpha", 0.0, {}),
    ("dirichlet_alpha", -0.3, {}),
    ("dirichlet_alpha", NAN, {}),
    ("dirichlet_alpha", INF, {}),
    ("min_client_examples", 0, {}),
    ("min_client_examples", 1.5, {}),
    ("rounds", 0, {}),
    ("rounds", 2.5, {}),
    ("rounds", NAN, {}),
    ("rounds", INF, {}),
    ("rounds", True, {}),
    ("rounds", "3", {}),
    ("local_steps", 0, {}),
    ("local_steps", 1.5, {}),
    ("batch_size", 0, {}),
    ("batch_size", 16.5, {}),
    ("lr", 0.0, {}),
    ("lr", -1e-3, {}),
    ("lr", NAN, {}),
    ("lr", INF, {}),
    ("lr", -INF, {}),
    ("lr", np.float32("nan"), {}),
    ("lr", "1e-3", {}),
    ("lr", None, {}),
    ("lr_final_ratio", -0.1, {}),
    ("lr_final_ratio", 1.1, {}),
    ("lr_final_ratio", NAN, {}),
    ("weight_decay", -1.0, {}),
    ("weight_decay", NAN, {}),
    ("weight_decay", INF, {}),
    ("loss", "focal", {}),
    ("loss", None, {}),
    ("head_lr_scale", 0.0, {}),
    ("head_lr_scale", NAN, {}),
    ("max_length", 1, {}),
    ("max_length", 64.5, {}),
    ("train_examples", 0, {}),
    ("train_examples", 2.5, {}),
    ("train_examples", NAN, {}),
    ("eval_examples", 0, {}),
    ("eval_examples", 1.5, {}),
    ("eval_every", 0, {}),
    ("eval_every", 1.5, {}),
    ("seed", -1, {}),
    ("seed", 2**64, {}),
    ("seed", 0.5, {}),
    ("seed", NAN, {}),
    ("seed", True, {}),
    ("seed", "0", {}),
    ("he_budgets", 2, {}),
    ("he_budgets", "2", {}),
    ("he_budgets", (2.5,), {}),
    ("he_budgets", (-1,), {}),
    ("he_budgets", (), {}),
    ("he_budgets", (NAN,), {}),
    ("he_budgets", (2, 500), {"method": "shelora"}),  # wider than the layer (384)
    ("cipher_mode", "fast", {}),
    ("cipher_mode", 1, {}),
    ("cipher_mode", "paper", {"method": "shelora+first-layers"}),
    ("cipher_mode", "packed", {"method": "shelora+first-layers"}),
    ("cipher_mode", "packed", {"method": "maskcrypt"}),  # SHE-LoRA's packed products only
    ("ckks_params", "fedshield", {"method": "shelora", "cipher_mode": "packed"}),  # no Galois
    ("ckks_params", "nope", {}),
    ("ckks_params", 3, {}),
    ("ckks_params", ("add_only",), {}),
    ("ckks_params", "add_only", {"method": "fedshield"}),
    ("column_order", "sorted", {}),
    ("column_order", None, {}),
    ("calibration_examples", 0, {}),
    ("calibration_examples", 1.5, {}),
    ("negotiation_grid_step", 0.0, {}),
    ("negotiation_grid_step", 1.5, {}),
    ("negotiation_grid_step", 0.3, {}),  # does not divide 1
    ("negotiation_grid_step", NAN, {}),
    ("authors_weighting", 1, {}),
    ("authors_weighting", "yes", {}),
    ("authors_weighting", None, {}),
    ("fedshield_weighted", 0, {}),
    ("fedshield_weighted", "no", {}),
    ("prune", 1.0, {}),
    ("shelora_protect", "drop", {}),
    ("shelora_protect", None, {}),
    ("shelora_protect", "withhold", {"method": "shelora+first-layers"}),
    ("renegotiate_every", 0, {}),
    ("renegotiate_every", -3, {}),
    ("renegotiate_every", 2.5, {}),
    ("renegotiate_every", NAN, {}),
    ("renegotiate_every", True, {}),
    ("dp_epsilon", 0.0, {}),
    ("dp_epsilon", -1.0, {}),
    ("dp_epsilon", NAN, {}),
    ("dp_epsilon", INF, {}),
    ("dp_epsilon", "10", {}),
    ("dp_epsilon", None, {"method": "flexlora-dp"}),  # and no dp_noise_multiplier
    ("dp_delta", 0.0, {}),
    ("dp_delta", 1.0, {}),
    ("dp_delta", NAN, {}),
    ("dp_clip", 0.0, {}),
    ("dp_clip", NAN, {}),
    ("dp_clip", INF, {}),
    ("dp_noise_multiplier", -1.0, {}),
    ("dp_noise_multiplier", NAN, {}),
    ("dp_noise_multiplier", INF, {}),
    ("dp_target_epsilon", 0.0, {}),
    ("dp_target_epsilon", -1.0, {}),
    ("dp_target_epsilon", NAN, {}),
    ("dp_target_epsilon", INF, {}),
    ("dp_target_epsilon", "8", {}),
    ("dp_target_epsilon", True, {}),
    ("dp_target_epsilon", 8.0, {"dp_noise_multiplier": 1.0}),  # both fix the noise
    ("dp_epsilon", None, {"method": "shelora-dp"}),  # and no multiplier, no target
    ("cipher_mode", "paper", {"method": "shelora-dp"}),  # the noise would enter the products
    ("shelora_protect", "withhold", {"method": "shelora-dp"}),
    ("first_layers", 0, {}),
    ("first_layers", "01", {}),
    ("first_layers", (0.5,), {}),
    ("first_layers", (), {}),
    ("first_layers", (-1,), {}),
    ("first_layers", (0, 0), {}),
    ("first_layers", (0, 6), {}),  # MiniLM has blocks 0..5
    ("first_layers_encrypt", "both", {}),
    ("first_layers_encrypt", None, {}),
    ("min_clients", 0, {}),
    ("min_clients", 1.5, {}),
    ("min_clients", True, {}),
    ("min_clients", 11, {}),  # > clients_per_round (10)
    ("min_clients", 3, {"num_clients": 4, "client_fraction": 0.5}),  # 2 sampled per round
    ("seeded_uploads", 1, {}),
    ("seeded_uploads", "yes", {}),
    ("prune_schedule_rounds", 0, {}),
    ("prune_schedule_rounds", 2.5, {}),
    ("prune_schedule_rounds", True, {}),
    ("prune_schedule_rounds", "20", {}),
    ("secret_init", 1, {}),
    ("secret_init", "yes", {}),
    ("secret_init", None, {}),
    ("min_column_coverage", -0.1, {}),
    ("min_column_coverage", 1.5, {}),
    ("min_column_coverage", NAN, {}),
    ("min_column_coverage", "0.5", {}),
    ("min_column_coverage", None, {}),
    ("extra", [], {}),
    ("extra", None, {}),
]


def _case_id(case: tuple[str, object, dict]) -> str:
    name, value, others = case
    return f"{name}={value!r}" + (f"+{others}" if others else "")


@pytest.mark.parametrize("case", BAD_VALUES, ids=[_case_id(c) for c in BAD_VALUES])
def test_bad_value_is_refused_at_construction_naming_the_field(case):
    name, value, others = case
    with pytest.raises(ConfigError) as err:
        FederatedConfig(**others, **{name: value})  # construction alone, no validate() call
    msg = str(err.value)
    assert f"config.{name} = " in msg, msg
    assert "is invalid: " in msg
    assert isinstance(err.value, ValueError)  # ``except ValueError`` keeps working


@pytest.mark.parametrize("case", BAD_VALUES, ids=[_case_id(c) for c in BAD_VALUES])
def test_replace_refuses_the_same_values(case):
    name, value, others = case
    base = FederatedConfig(**{k: v for k, v in others.items()})
    with pytest.raises(ConfigError, match=f"config.{name} = "):
        base.replace(**{name: value})


def test_every_field_has_bad_value_cases():
    fields = {f.name for f in dataclasses.fields(FederatedConfig)}
    assert fields == {name for name, _, _ in BAD_VALUES}


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        (dict(lr=NAN), ["NaN and Inf are refused"]),
        (dict(lora_alpha=INF), ["NaN and Inf are refused"]),
        (dict(rounds=2.5), ["not a whole number", "2 or 3"]),
        (dict(ranks=8), ["give a tuple such as (8, 16, 32)", "not a single int"]),
        (dict(ranks="8"), ["give a tuple such as", "not a string"]),
        (dict(ranks=(8, 8.7)), ["element 1 (8.7) is not an integer"]),
        (dict(ranks=("a",)), ["element 0 ('a') is not an integer"]),
        (dict(he_budgets=4), ["give a tuple such as (2, 4, 8)"]),
        (dict(first_layers=1), ["give a tuple such as (0, 1)"]),
        (dict(target_modules="query"), ["give a tuple such as ('query', 'value')"]),
        (dict(seed=-1), [">= 0"]),
        (dict(method=3), ["must be a string", "not an int"]),
        (dict(prune=1), ["True or False"]),
        (dict(min_clients=11), ["clients_per_round", "<= 10"]),
    ],
)
def test_messages_say_what_is_wrong_and_the_fix(changes, needles):
    with pytest.raises(ConfigError) as err:
        FederatedConfig(**changes)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_integral_values_are_converted_and_keep_the_fingerprint():
    plain = FederatedConfig(num_clients=4, rounds=2, ranks=(8, 16), he_budgets=(2, 4), seed=3)
    loose = FederatedConfig(
        num_clients=np.int64(4),
        rounds=2.0,
        ranks=[np.int32(8), 16.0],
        he_budgets=np.array([2, 4]),
        seed=np.uint8(3),
        lr=np.float64(1e-3),
        prune=np.bool_(True),
    )
    assert loose == plain
    assert loose.run_name == plain.run_name
    assert type(loose.rounds) is int and type(loose.num_clients) is int and type(loose.seed) is int
    assert loose.ranks == (8, 16) and all(type(r) is int for r in loose.ranks)
    assert type(loose.lr) is float and type(loose.prune) is bool
    assert FederatedConfig(renegotiate_every=3.0, method="shelora").renegotiate_every == 3
    assert FederatedConfig(target_modules=["query", "value"]).target_modules == ("query", "value")
    assert json.dumps(loose.to_dict())  # numpy scalars would not serialise


def test_validate_is_public_and_rechecks_the_stored_values():
    cfg = FederatedConfig()
    assert cfg.validate() is cfg
    object.__setattr__(cfg, "lr", NAN)  # bypassing the frozen dataclass
    with pytest.raises(ConfigError, match="config.lr = nan"):
        cfg.validate()


# ---------------------------------------------------------------------- CKKS parameter sets
def _method_configs() -> list[FederatedConfig]:
    out = []
    for method in METHODS:
        delta_only = method in ("shelora+first-layers", "shelora-dp")
        modes = ("delta",) if delta_only else ("delta", "paper")
        modes += ("packed",) if method == "shelora" else ()
        out += [FederatedConfig(method=method, cipher_mode=m) for m in modes]
    out.append(FederatedConfig(method="shelora", shelora_protect="withhold"))
    return out


@pytest.mark.parametrize("cfg", _method_configs(), ids=lambda c: f"{c.variant}")
def test_each_method_accepts_its_default_ckks_set_named_explicitly(cfg):
    from shelora_core.methods import ckks_params_for

    default = ckks_params_for(cfg)
    assert cfg.replace(ckks_params=default).ckks_params == default


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        (dict(method="fedshield"), "multiplicative depth >= 1"),
        (dict(method="full_he"), "multiplicative depth >= 1"),
        (dict(method="maskcrypt", cipher_mode="paper"), "multiplicative depth >= 1"),
        (dict(method="shelora", cipher_mode="paper"), "multiplicative depth >= 1"),
    ],
)
def test_add_only_set_is_refused_where_the_server_multiplies(changes, needle):
    with pytest.raises(ConfigError, match="config.ckks_params = 'add_only'") as err:
        FederatedConfig(ckks_params="add_only", **changes)
    assert needle in str(err.value)


def test_shelora_paper_mode_needs_galois_keys():
    with pytest.raises(ConfigError, match="Galois keys"):
        FederatedConfig(method="shelora", cipher_mode="paper", ckks_params="fedshield")
    FederatedConfig(method="shelora", cipher_mode="paper", ckks_params="paper_mm")


def test_shelora_packed_mode_needs_galois_keys_and_defaults_to_the_packed_set():
    from shelora_core.methods import ckks_params_for

    with pytest.raises(ConfigError, match="Galois keys.*'packed'"):
        FederatedConfig(method="shelora", cipher_mode="packed", ckks_params="fedshield")
    assert ckks_params_for(FederatedConfig(method="shelora", cipher_mode="packed")) == "packed"
    FederatedConfig(method="shelora", cipher_mode="packed", ckks_params="paper_mm")


def test_adding_methods_take_any_named_set_and_plaintext_methods_ignore_it():
    from shelora_core.ckks import PARAM_SETS

    for name in PARAM_SETS:
        for method in ("shelora", "shelora+first-layers", "maskcrypt"):
            FederatedConfig(method=method, cipher_mode="delta", ckks_params=name)
        for method in ("fedavg", "flexlora", "flexlora-dp"):
            FederatedConfig(method=method, ckks_params=name)


def test_unknown_or_insecure_ckks_set_is_refused(monkeypatch):
    from shelora_core.ckks import PARAM_SETS, CKKSParams

    with pytest.raises(
        ConfigError, match=r"choose one of \['add_only', 'fedshield', 'packed', 'paper_mm'\]"
    ):
        FederatedConfig(method="fedshield", ckks_params="fedshield2")
    # 120 bits of modulus at N=4096: above the 128-bit bound (109)
    toy = CKKSParams("toy", 4096, (60, 60), 40)
    monkeypatch.setitem(PARAM_SETS, "toy", toy)
    with pytest.raises(ConfigError, match="config.ckks_params = 'toy'.*security check"):
        FederatedConfig(method="shelora", ckks_params="toy")


def test_a_config_without_ckks_params_does_not_import_tenseal():
    code = (
        "import sys; from shelora_core.config import FederatedConfig; "
        "FederatedConfig(method='fedshield'); print('tenseal' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------- min_clients
def test_min_clients_is_a_late_field():
    cfg = FederatedConfig()
    assert cfg.min_clients == 1
    assert cfg.replace(min_clients=1).fingerprint() == cfg.fingerprint()
    assert cfg.replace(min_clients=2).fingerprint() != cfg.fingerprint()
    old = cfg.to_dict()
    del old["min_clients"]  # a config saved before the field existed
    assert FederatedConfig.from_dict(old) == cfg
    assert FederatedConfig(num_clients=4, client_fraction=0.5, min_clients=2).min_clients == 2


def test_dp_target_epsilon_is_a_late_field():
    cfg = FederatedConfig(method="flexlora-dp")
    assert cfg.dp_target_epsilon is None
    assert cfg.replace(dp_target_epsilon=None).fingerprint() == cfg.fingerprint()
    assert cfg.replace(dp_target_epsilon=8.0).fingerprint() != cfg.fingerprint()
    old = cfg.to_dict()
    del old["dp_target_epsilon"]
    assert FederatedConfig.from_dict(old) == cfg
    # a target alone is enough for flexlora-dp (no per-round epsilon needed)
    assert (
        FederatedConfig(method="flexlora-dp", dp_epsilon=None, dp_target_epsilon=8).dp_epsilon
        is None
    )


# ---------------------------------------------------------------------- unknown field names
def test_replace_with_an_unknown_field_suggests_close_names():
    with pytest.raises(ConfigError) as err:
        FederatedConfig().replace(rnuods=3)
    assert "'rnuods' (did you mean 'rounds'?)" in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'ckks_params'"):
        FederatedConfig().replace(ckks_param="fedshield")


def test_constructor_with_an_unknown_field_suggests_close_names():
    from shelora_core.profiles import profile_config

    with pytest.raises(ConfigError, match=r"'lr_final' \(did you mean 'lr_final_ratio'\?\)"):
        FederatedConfig(lr_final=0.2)
    with pytest.raises(ConfigError, match="did you mean 'num_clients'"):
        profile_config("quick", num_client=4)


def test_from_dict_with_an_unknown_field_suggests_close_names():
    d = FederatedConfig().to_dict()
    d["min_client"] = 2
    with pytest.raises(ConfigError) as err:
        FederatedConfig.from_dict(d)
    msg = str(err.value)
    assert "'min_client' (did you mean" in msg
    assert "'min_clients'" in msg and "'min_client_examples'" in msg
    with pytest.raises(ConfigError, match="from_dict needs a dict"):
        FederatedConfig.from_dict([("rounds", 3)])


# ---------------------------------------------------------------------- fingerprint stability
def _committed_records() -> list[tuple[str, dict]]:
    """``(where, record)`` for every committed run record that holds a config and its name."""
    records = []
    for path in sorted(REPO.glob("results/*/federated_tuning/*.summary.json")):
        records.append((str(path.relative_to(REPO)), json.loads(path.read_text())))
    for path in sorted(REPO.glob("results/*/federated_tuning.json")):
        for i, rec in enumerate(json.loads(path.read_text())):
            records.append((f"{path.relative_to(REPO)}[{i}]", rec))
    return records


def test_every_committed_run_config_loads_with_its_run_name():
    records = _committed_records()
    summaries = [w for w, _ in records if w.endswith(".summary.json")]
    assert summaries, "no committed results/*/federated_tuning/*.summary.json found"
    for where, rec in records:
        cfg = FederatedConfig.from_dict(rec["config"])
        assert cfg.run_name == rec["run_name"], where
        if where.endswith(".summary.json"):
            assert Path(where).name == f"{cfg.run_name}.summary.json"
        assert FederatedConfig.from_dict(cfg.to_dict()) == cfg
