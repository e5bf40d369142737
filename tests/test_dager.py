"""DAGER gradient inversion (shelora_core.attacks): span checks, the attack on SmolLM2, errors."""

import numpy as np
import pytest
import torch
from dager_driver import load_victim, run_attack

from shelora_core.attacks.dager import dager_attack
from shelora_core.attacks.decoder_view import DecoderView
from shelora_core.attacks.gradients import (
    LayerUpdate,
    add_dp_noise,
    capture_update,
    encode_batch,
    hide_columns,
    multistep_update,
    update_from_weights,
)
from shelora_core.attacks.scoring import match_sentences, token_set_scores
from shelora_core.attacks.span import SpanCheck, row_span, span_distances
from shelora_core.privacy import gaussian_sigma

SENTENCE = "a gorgeous , witty , seductive movie ."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module (10x faster than two on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------- synthetic layer
def _linear_layer_gradient(x_vocab: np.ndarray, used: list[int], m: int, seed: int) -> np.ndarray:
    """grad W of y_t = W x_t for the inputs ``x_vocab[used]`` and a random loss."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.tensor(x_vocab[used], dtype=torch.float64)
    w = torch.randn(m, x.shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(len(used), m, generator=gen, dtype=torch.float64)
    ((x @ w.T - target) ** 2).sum().backward()
    return w.grad.numpy()


@pytest.fixture()
def vocab():
    rng = np.random.default_rng(0)
    return rng.normal(size=(300, 24))


def test_span_check_on_a_synthetic_linear_layer_recovers_exactly_the_inputs(vocab):
    used = [3, 17, 42, 99, 250]
    grad = _linear_layer_gradient(vocab, used, m=32, seed=1)

    span = row_span(grad, rank_tol=1e-9)
    dist = span_distances(torch.from_numpy(vocab), span).numpy()

    assert span.rank == len(used)
    assert sorted(np.flatnonzero(dist < 1e-8).tolist()) == used
    assert np.delete(dist, used).min() > 1e-2


def test_lora_grad_b_check_through_a_recovers_the_inputs_when_fewer_than_the_rank(vocab):
    used = [5, 6, 7]
    rng = np.random.default_rng(2)
    a = rng.normal(size=(8, 24))
    grad_w = _linear_layer_gradient(vocab, used, m=32, seed=3)
    lu = LayerUpdate(layer=0, grad_a=np.zeros_like(a), grad_b=grad_w @ a.T, lora_a=a,
                     lora_b=np.zeros((32, 8)), scaling=1.0)  # fmt: skip

    check = SpanCheck(lu, rank_tol=1e-9)
    dist = check.distances(torch.from_numpy(vocab)).numpy()

    assert check.route == "grad_b" and check.rank == 3
    assert sorted(np.argsort(dist)[:3].tolist()) == used
    assert dist[used].max() < 1e-8 < np.delete(dist, used).min()


def test_hidden_columns_break_the_oblivious_check_and_not_the_adaptive_one(vocab):
    used = [10, 20, 30, 40]
    rng = np.random.default_rng(4)
    b = rng.normal(size=(32, 8))
    grad_w = _linear_layer_gradient(vocab, used, m=32, seed=5)
    lu = LayerUpdate(layer=0, grad_a=b.T @ grad_w, grad_b=grad_w @ np.ones((24, 8)),
                     lora_a=np.ones((8, 24)), lora_b=b, scaling=1.0)  # fmt: skip
    seen = hide_columns(_as_update(lu), [0, 1, 2]).layers[0]

    oblivious = SpanCheck(seen, attacker="oblivious", rank_tol=1e-9)
    adaptive = SpanCheck(seen, attacker="adaptive", rank_tol=1e-9)
    d_obl = oblivious.distances(torch.from_numpy(vocab)).numpy()
    d_ada = adaptive.distances(torch.from_numpy(vocab)).numpy()

    assert np.all(seen.grad_a[:, :3] == 0)
    assert d_obl[used].min() > 1e-3  # the true inputs are no longer in the seen span
    assert d_ada[used].max() < 1e-8 < np.delete(d_ada, used).min()


def test_adaptive_trimmed_least_squares_recovers_inputs_through_grad_b_with_hidden_a(vocab):
    used = [1, 50, 77, 120, 121, 200]
    rng = np.random.default_rng(6)
    a = rng.normal(size=(16, 24))
    grad_w = _linear_layer_gradient(vocab, used, m=32, seed=7)
    lu = LayerUpdate(layer=0, grad_a=np.zeros_like(a), grad_b=grad_w @ a.T, lora_a=a,
                     lora_b=np.zeros((32, 16)), scaling=1.0)  # fmt: skip
    seen = hide_columns(_as_update(lu), [4, 9]).layers[0]  # A[:, [4, 9]] unknown to the server
    x = torch.from_numpy(vocab)

    check = SpanCheck(seen, attacker="adaptive", rank_tol=1e-9)
    check.fit_offset(x, inliers=check.rank)
    dist = check.distances(x).numpy()

    assert sorted(np.argsort(dist)[: len(used)].tolist()) == used
    assert dist[used].max() < 1e-6


def test_hidden_columns_do_not_hide_grad_b_from_a_server_that_knows_the_initial_a(vocab):
    used = [2, 4, 8]
    rng = np.random.default_rng(9)
    a = rng.normal(size=(8, 24))  # round 1: A from a public seed, B = 0
    grad_w = _linear_layer_gradient(vocab, used, m=32, seed=10)
    lu = LayerUpdate(layer=0, grad_a=np.zeros_like(a), grad_b=grad_w @ a.T, lora_a=a,
                     lora_b=np.zeros((32, 8)), scaling=1.0)  # fmt: skip
    seen = hide_columns(_as_update(lu), [0, 1, 2], hide_a=False).layers[0]

    dist = SpanCheck(seen, attacker="oblivious", rank_tol=1e-9).distances(torch.from_numpy(vocab))

    assert not seen.a_hidden
    assert sorted(np.flatnonzero(dist.numpy() < 1e-8).tolist()) == used


def _as_update(lu: LayerUpdate):
    from shelora_core.attacks.gradients import ObservedUpdate

    return ObservedUpdate(layers={0: lu}, total_norm=1.0)


def test_update_from_weights_of_one_sgd_step_is_the_gradient():
    rng = np.random.default_rng(8)
    b0, a0 = np.zeros((6, 2)), rng.normal(size=(2, 5))
    gb, ga = rng.normal(size=(6, 2)), np.zeros((2, 5))
    lr = 0.05

    upd = update_from_weights(
        {"model.layers.0.self_attn.q_proj": (b0, a0)},
        {"model.layers.0.self_attn.q_proj": (b0 - lr * gb, a0 - lr * ga)},
        lr=lr,
        scaling=8.0,
    )

    np.testing.assert_allclose(upd.layers[0].grad_b, gb, atol=1e-12)
    np.testing.assert_array_equal(upd.layers[0].lora_a, a0)
    assert upd.kind == "multistep"


def _tiny_llama(seed: int):
    """A 2-layer LLaMA decoder (width 16, vocabulary 40) with LoRA r = 4 on q_proj, float64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from shelora_core.attacks.gradients import add_lora

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      bos_token_id=1, pad_token_id=0, eos_token_id=2)  # fmt: skip
    model = add_lora(LlamaForCausalLM(cfg).double(), rank=4, alpha=8.0)
    with torch.no_grad():  # a later round: B != 0, so both factors move from the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model


def test_multistep_sgd_update_is_the_mean_of_the_hand_computed_sgd_gradients():
    model = _tiny_llama(0)
    batch = {"input_ids": torch.tensor([[1, 5, 9, 13, 7], [1, 22, 3, 3, 30]]),
             "attention_mask": torch.ones(2, 5, dtype=torch.long)}  # fmt: skip
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    steps, lr = 3, 0.5

    upd = multistep_update(model, batch, steps=steps, lr=lr, optimizer="sgd")

    # by hand: w <- w - lr * grad, three times, summing the gradients of layer 0's factors
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    work = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(steps):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(work[n])
        logits = model(**batch).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 40), batch["input_ids"][:, 1:].reshape(-1)
        )
        grads = torch.autograd.grad(loss, list(params.values()))
        for (n, _p), g in zip(params.items(), grads, strict=True):
            total[n] += g
            work[n] = work[n] - lr * g
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(before[n])

    def summed(layer: int, factor: str) -> np.ndarray:
        (name,) = [n for n in total if f"layers.{layer}." in n and f"lora_{factor}" in n]
        return total[name].numpy()

    for layer in (0, 1):
        lu = upd.layers[layer]
        np.testing.assert_allclose(lu.grad_a * steps, summed(layer, "A"), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(lu.grad_b * steps, summed(layer, "B"), rtol=1e-9, atol=1e-12)
        assert np.abs(lu.grad_a).max() > 1e-4  # the steps moved A: not a vacuous comparison
    # the steps did not stay in the model
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    # a single SGD step is exactly the gradient capture_update reads
    one = multistep_update(model, batch, steps=1, lr=lr, optimizer="sgd")
    grad = capture_update(model, batch)
    np.testing.assert_allclose(one.layers[0].grad_a, grad.layers[0].grad_a, rtol=1e-9, atol=1e-12)


def test_multistep_sgd_keeps_the_first_layer_update_in_the_span_of_the_token_inputs():
    model = _tiny_llama(1)
    ids = torch.tensor([[1, 5, 9, 13, 7]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    upd = multistep_update(model, batch, steps=4, lr=0.5, optimizer="sgd")
    adamw = multistep_update(model, batch, steps=4, lr=0.05)

    x = DecoderView.from_model(model).first_layer_inputs(ids[0, 1:4])  # positions with a query grad
    sgd_d = SpanCheck(upd.layers[0], route="grad_a", rank_tol=1e-9).distances(x)
    adam_d = SpanCheck(adamw.layers[0], route="grad_a", rank_tol=1e-9).distances(x)
    # layer 0's inputs do not change while the adapters train (1e-8: LlamaRMSNorm runs in float32)
    assert float(sgd_d.max()) < 1e-6
    assert float(adam_d.max()) > 1e-3  # AdamW's per-coordinate scaling leaves the span


def test_multistep_update_refuses_bad_optimizer_settings():
    model = _tiny_llama(2)
    batch = {"input_ids": torch.tensor([[1, 5, 9]]), "attention_mask": torch.ones(1, 3)}
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        multistep_update(model, batch, optimizer="lbfgs")
    with pytest.raises(ValueError, match="no weight decay"):
        multistep_update(model, batch, optimizer="sgd", weight_decay=0.01)


def test_dp_noise_clips_the_whole_update_then_adds_noise():
    lu = LayerUpdate(layer=0, grad_w=np.full((3, 4), 2.0))  # norm 6.93 of a total norm 20
    upd = _as_update(lu)
    upd.total_norm = 20.0

    clipped = add_dp_noise(upd, noise_multiplier=0.0, max_norm=1.0, rng=np.random.default_rng(0))
    noisy = add_dp_noise(upd, noise_multiplier=1.0, max_norm=1.0, rng=np.random.default_rng(0))

    np.testing.assert_allclose(clipped.layers[0].grad_w, 2.0 / 20.0)
    assert np.std(noisy.layers[0].grad_w - clipped.layers[0].grad_w) > 0.3


def test_token_scores_and_sentence_matching():
    assert token_set_scores([1, 2, 3, 4], [2, 3, 5]) == (0.5, 2 / 3)
    assert token_set_scores([], [1]) == (0.0, 0.0)
    assert match_sentences(["b c d", "x a b"], ["a b c", "b c d", "q r"]) == ["x a b", "b c d", ""]


# ---------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    """The full fine-tuning classifier and tokenizer, loaded once (shared with run_attack)."""
    torch.manual_seed(0)
    return load_victim("smollm2", None, 16.0)


def test_decoder_view_reproduces_the_model_second_layer_inputs(smollm2):
    model, tok = smollm2
    batch = encode_batch(tok, [SENTENCE])
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[1][0]
        want = model.model.layers[1].input_layernorm(hidden).double()[1:]

    got = DecoderView.from_model(model).sequence_inputs(batch["input_ids"][0].tolist())

    assert batch["input_ids"][0, 0] == tok.bos_token_id
    assert ((got - want).norm(dim=1) / want.norm(dim=1)).max() < 1e-5


def test_encode_batch_prepends_bos_and_pads_on_the_right(smollm2):
    _model, tok = smollm2

    batch = encode_batch(tok, [SENTENCE, "fine ."], add_eos=True)

    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert mask[1].sum() < mask[0].sum() and (ids[1][mask[1] == 0] == tok.pad_token_id).all()
    assert ids[0, int(mask[0].sum()) - 1] == tok.eos_token_id


def test_unprotected_full_finetuning_attack_recovers_the_sentence_at_batch_1(smollm2):
    out = run_attack("smollm2", [SENTENCE], batch_size=1, labels=[1])

    assert out["rouge1"] >= 0.9
    assert out["token_precision"] == 1.0 and out["token_recall"] == 1.0
    assert out["reconstructed"][0].strip() == SENTENCE


def test_dager_reads_lora_factors_from_the_update_not_from_the_model():
    lora, tok = load_victim("smollm2", 64, 16.0)
    lora.load(lora.init_weights(64, seed=0))  # round 1: B = 0
    batch = encode_batch(tok, [SENTENCE])
    upd = capture_update(lora, batch, labels=[0])
    scrambled = lora.init_weights(64, seed=99)  # the attacker's copy holds other LoRA weights
    lora.load(scrambled)

    res = dager_attack(lora, upd)

    assert upd.mode == "lora" and res.route == "grad_b"
    assert tok.decode(res.sequences[0]).strip() == SENTENCE


def test_hidden_columns_defeat_the_oblivious_attacker_but_not_the_adaptive_one():
    kw = dict(batch_size=1, labels=[1], lora_rank=64, hidden_columns=4, update="fedsgd_later")

    oblivious = run_attack("smollm2", [SENTENCE], attacker="oblivious", **kw)
    adaptive = run_attack("smollm2", [SENTENCE], attacker="adaptive", **kw)

    assert oblivious["batches"][0]["hidden"][0][0] == 471  # the massive-activation feature
    assert oblivious["batches"][0]["route"] == "grad_a"
    assert oblivious["token_recall"] < 0.5 and oblivious["rouge1"] < 0.5
    assert adaptive["token_recall"] == 1.0 and adaptive["rouge1"] >= 0.9


def test_adaptive_attacker_fits_the_hidden_block_of_a_through_grad_b_in_round_1():
    kw = dict(batch_size=1, labels=[1], lora_rank=64, hidden_columns=4, update="fedsgd_round1")

    oblivious = run_attack("smollm2", [SENTENCE], attacker="oblivious", **kw)
    adaptive = run_attack("smollm2", [SENTENCE], attacker="adaptive", **kw)

    assert adaptive["batches"][0]["route"] == "grad_b"
    assert oblivious["token_recall"] < 0.5
    assert adaptive["token_precision"] == 1.0 and adaptive["token_recall"] == 1.0


def test_large_dp_noise_stops_the_attack():
    sigma = gaussian_sigma(10.0, 1e-5)  # the authors' epsilon = 10, delta = 1e-5

    out = run_attack("smollm2", [SENTENCE], batch_size=1, labels=[1], dp_sigma=sigma, seed=1)

    assert out["rouge1"] < 0.2
    assert out["token_precision"] < 0.1


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 1, "attacker": "clever"}, "unknown attacker 'clever'"),
        ({"batch_size": 1, "lora_rank": 0}, "lora_rank must be >= 1"),
        ({"batch_size": 2}, "got 3 sentences for batch_size=2"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"batch_size": 1, "update": "fedavg"}, "unknown update 'fedavg'"),
        ({"batch_size": 1, "update": "multistep"}, "needs lora_rank"),
        ({"batch_size": 1, "selection": "best"}, "unknown selection 'best'"),
        ({"batch_size": 1, "labels": [0]}, "got 1 labels for 3 sentences"),
        ({"batch_size": 1, "model_name": "minilm"}, "written for the decoder 'smollm2'"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, message):
    model_name = kwargs.pop("model_name", "smollm2")
    with pytest.raises(ValueError, match=message):
        run_attack(model_name, ["a", "b", "c"], **kwargs)


def test_bad_span_check_inputs_raise():
    full = LayerUpdate(layer=0, grad_w=np.ones((3, 4)))
    with pytest.raises(ValueError, match="needs a LoRA update"):
        SpanCheck(full, route="grad_b")
    with pytest.raises(ValueError, match="unknown attacker"):
        SpanCheck(full, attacker="psychic")
    with pytest.raises(ValueError, match="rank_tol must be > 0"):
        row_span(np.ones((2, 2)), rank_tol=0.0)
    with pytest.raises(ValueError, match="hidden columns must lie in"):
        hide_columns(_as_update(full), [7])
