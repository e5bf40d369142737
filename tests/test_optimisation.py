"""The optimisation-based (gradient-matching) attack on a tiny LLaMA classifier, and its grid cells.

A 2-layer LLaMA with a 64-token vocabulary keeps every attack to a second or two: the tests
check the mechanics (determinism, masking, that matching a visible gradient recovers more than
matching nothing), not how well the attack does on SmolLM2 (notebook 06's grid measures that).
"""

import copy

import numpy as np
import pytest
import torch

from shelora_core.attacks.gradients import (
    add_lora,
    capture_update,
    hide_columns,
    set_lora_factors,
)
from shelora_core.attacks.grid import OPTIMISATION, Cell, attack_plan
from shelora_core.attacks.optimisation import (
    MatchTarget,
    OptimisationSettings,
    matching_distance,
    optimisation_attack,
)
from shelora_core.attacks.scoring import token_set_scores

TRUE = [10, 20, 30, 40, 50]
SETTINGS = OptimisationSettings(max_iters=60, time_cap=120.0, refine_rounds=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A tiny model's step is all per-operation overhead: a second thread only contends."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tiny():
    """(public model, observed update of one sentence, its batch) on a later-round LoRA."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        max_position_embeddings=64,
    )
    public = LlamaForSequenceClassification(cfg).eval()
    victim = add_lora(copy.deepcopy(public), rank=4, layers=(0, 1))
    rng = np.random.default_rng(0)
    for i in (0, 1):  # a later round: B != 0, so grad A carries the inputs too
        set_lora_factors(victim, i, b=rng.normal(0, 0.1, (32, 4)), a=rng.normal(0, 0.2, (4, 32)))
    ids = torch.tensor([[1, *TRUE]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    obs = capture_update(victim, batch, labels=[1], layers=(0, 1))
    return public, obs, batch


def _attack(public, target, batch, settings=SETTINGS):
    return optimisation_attack(
        public, target, attention_mask=batch["attention_mask"], labels=[1], bos_id=1,
        settings=settings,
    )  # fmt: skip


def test_the_attack_is_deterministic_given_the_seed(tiny):
    public, obs, batch = tiny
    target = MatchTarget.from_update(obs)
    short = OptimisationSettings(max_iters=15, time_cap=120.0, seed=3)

    first, second = _attack(public, target, batch, short), _attack(public, target, batch, short)
    other = _attack(public, target, batch, OptimisationSettings(max_iters=15, seed=4))

    assert first.stopped == "iterations" and first.iterations == 15
    assert first.sequences == second.sequences
    assert first.distance == second.distance and first.history == second.history
    assert other.history != first.history  # the seed matters


def test_matching_the_visible_gradient_recovers_more_than_matching_nothing(tiny):
    public, obs, batch = tiny
    full = MatchTarget.from_update(obs)
    nothing = MatchTarget.from_update(obs)
    for masks in (nothing.mask_a, nothing.mask_b):
        for i in masks:
            masks[i][:] = False

    got = _attack(public, full, batch)
    blind = _attack(public, nothing, batch)
    recall_full = token_set_scores(got.tokens, TRUE)[1]
    recall_blind = token_set_scores(blind.tokens, TRUE)[1]

    assert matching_distance(public, full, batch["input_ids"], attention_mask=batch[
        "attention_mask"], labels=[1]) < 1e-5  # the truth matches exactly  # fmt: skip
    assert blind.stopped == "nothing visible" and blind.iterations == 0
    assert got.distance < 1.0
    assert recall_full >= 0.6 and recall_full > recall_blind


def test_adaptive_masking_reads_only_the_visible_coordinates(tiny):
    public, obs, batch = tiny
    cols = list(range(8))
    seen = hide_columns(obs, cols)
    tampered = seen.copy()
    rng = np.random.default_rng(1)
    for lu in tampered.layers.values():
        lu.grad_a[:, cols] = rng.normal(0.0, 1.0, size=(lu.grad_a.shape[0], len(cols)))
    short = OptimisationSettings(max_iters=10, time_cap=120.0, refine_rounds=0)

    ada = _attack(public, MatchTarget.from_update(seen, masking="adaptive"), batch, short)
    ada_t = _attack(public, MatchTarget.from_update(tampered, masking="adaptive"), batch, short)
    obl = _attack(public, MatchTarget.from_update(seen, masking="oblivious"), batch, short)
    obl_t = _attack(public, MatchTarget.from_update(tampered, masking="oblivious"), batch, short)

    assert ada.history == ada_t.history and ada.sequences == ada_t.sequences
    assert obl.history != obl_t.history  # the oblivious attacker does read them
    masked = MatchTarget.from_update(seen)
    assert not masked.mask_a[0][:, cols].any() and masked.mask_a[0][:, 8:].all()
    assert not masked.mask_b[0].any()  # grad B reads the unknown columns of the broadcast A
    assert MatchTarget.from_update(seen, masking="oblivious").mask_b[0].all()


def test_bad_names_and_caps_raise_clear_errors(tiny):
    public, obs, batch = tiny
    with pytest.raises(ValueError, match="unknown attacker 'optimization'"):
        Cell("flexlora", "optimization", 1, 8, "later")
    with pytest.raises(ValueError, match="runs on methods"):
        Cell("maskcrypt", OPTIMISATION, 1, 8, "later", budget=4)
    with pytest.raises(ValueError, match="runs on methods"):
        Cell("flexlora", OPTIMISATION, 1, 8, "multistep")
    with pytest.raises(ValueError, match="takes none"):
        Cell("flexlora", "oblivious", 1, 8, "later", opt_iters=5)
    with pytest.raises(ValueError, match="unknown masking"):
        MatchTarget.from_update(obs, masking="blind")
    with pytest.raises(ValueError, match="time_cap"):
        OptimisationSettings(time_cap=0)
    with pytest.raises(ValueError, match="right-padded"):
        optimisation_attack(public, MatchTarget.from_update(obs), attention_mask=torch.tensor(
            [[1, 0, 1]]), labels=[1], bos_id=1)  # fmt: skip


def test_plans_hold_bounded_optimisation_cells():
    quick = [c for c in attack_plan("quick")["cells"] if c.attacker == OPTIMISATION]
    paper = [c for c in attack_plan("paper")["cells"] if c.attacker == OPTIMISATION]

    assert len(quick) <= 2 and {c.method for c in quick} == {"flexlora", "shelora"}
    assert {c.batch_size for c in quick} == {1}
    assert sum(c.opt_seconds for c in quick) <= 60
    assert {c.method for c in paper} == {"flexlora", "shelora"}
    assert {c.batch_size for c in paper} == {1, 2} and {c.update for c in paper} == {
        "round1",
        "later",
    }
    assert all(c.opt_iters and c.opt_seconds for c in quick + paper)
    assert len({c.key for c in paper}) == len(paper)


def test_overrides_cap_only_the_optimisation_cells_and_make_them_cells_of_their_own():
    from shelora_core.attacks.grid import apply_overrides, attack_plan

    plan = attack_plan("quick")
    capped, ignored = apply_overrides(plan, {"opt_seconds": 4, "opt_iters": 1000})
    assert not ignored
    for before, after in zip(plan["cells"], capped["cells"], strict=True):
        if before.attacker == "optimisation":
            assert after.opt_seconds == 4.0 and after.opt_iters == before.opt_iters  # the smaller
            assert after.key != before.key
        else:
            assert after == before
    with pytest.raises(ValueError, match="opt_iters=-1: the cap must be positive"):
        apply_overrides(plan, {"opt_iters": -1})
