"""Heterogeneous LoRA adapters on one shared base model."""

import numpy as np
import pytest
import torch

from shelora_core.lora import LoraModel


def test_adapter_layers_and_shapes_follow_the_paper_notation(minilm_model):
    assert len(minilm_model.layer_names) == 6  # MiniLM: 6 layers, `query` adapted
    w = minilm_model.init_weights(4, seed=0)
    for layer, (b, a) in w.factors.items():
        m, n = minilm_model.layer_shapes[layer]
        assert b.shape == (m, 4) and a.shape == (4, n)
        assert not b.any()  # B = 0: the round-0 adapter does not change the model


def test_load_then_read_returns_the_same_weights(minilm_model):
    rng = np.random.default_rng(1)
    w = minilm_model.init_weights(8, seed=3)
    for layer, (b, a) in w.factors.items():
        w.factors[layer] = (rng.normal(size=b.shape).astype(np.float32), a)
    minilm_model.load(w)
    back = minilm_model.read()
    assert back.rank == 8
    for layer in w.factors:
        np.testing.assert_array_equal(back.factors[layer][0], w.factors[layer][0])
        np.testing.assert_array_equal(back.factors[layer][1], w.factors[layer][1])


def test_adapter_changes_logits_by_scaled_BA(minilm_model):
    ids = torch.tensor([[101, 2204, 3185, 102]])
    mask = torch.ones_like(ids)
    w = minilm_model.init_weights(2, seed=0)
    minilm_model.load(w)
    before = minilm_model.logits(ids, mask).detach()
    layer = minilm_model.layer_names[0]
    b, a = w.factors[layer]
    w.factors[layer] = (np.full_like(b, 0.05), a)
    minilm_model.load(w)
    after = minilm_model.logits(ids, mask).detach()
    assert not torch.allclose(before, after)


def test_init_is_identical_for_same_seed_and_rank(minilm_model):
    a1 = minilm_model.init_weights(4, seed=5).factors
    a2 = minilm_model.init_weights(4, seed=5).factors
    a3 = minilm_model.init_weights(4, seed=6).factors
    layer = minilm_model.layer_names[0]
    np.testing.assert_array_equal(a1[layer][1], a2[layer][1])
    assert not np.array_equal(a1[layer][1], a3[layer][1])


def test_shape_mismatch_is_refused_with_both_shapes(minilm_model):
    w = minilm_model.init_weights(4, seed=0)
    layer = minilm_model.layer_names[0]
    b, a = w.factors[layer]
    w.factors[layer] = (b[:, :3], a)
    with pytest.raises(
        ValueError, match=r"size mismatch .* got B \(384, 3\) .* expected B \(384, 4\)"
    ):
        minilm_model.load(w)


def test_unknown_rank_slot_is_refused(minilm_model):
    w = minilm_model.init_weights(4, seed=0)
    w.rank = 16
    with pytest.raises(ValueError, match="no slot"):
        minilm_model.load(w)


def test_rank_larger_than_layer_width_and_unknown_target_are_refused():
    with pytest.raises(ValueError, match=r"rank 1000 is out of range .* \[1, 384\]"):
        LoraModel("minilm", num_labels=2, ranks=(1000,))
    with pytest.raises(ValueError, match="unknown target module"):
        LoraModel("minilm", num_labels=2, ranks=(4,), target_modules=("q_proj",))
    with pytest.raises(ValueError, match="unknown model"):
        LoraModel("gpt2", num_labels=2, ranks=(4,))


def test_minilm_head_reads_the_masked_mean_so_padding_does_not_change_logits(minilm_model):
    # all-MiniLM-L6-v2 was trained with mean pooling; BERT's [CLS] pooler output barely varies
    # between sentences, so the head reads the mean of the non-padding hidden states
    minilm_model.load(minilm_model.init_weights(2, seed=0))
    ids = torch.tensor([[101, 2204, 3185, 102]])
    padded = torch.tensor([[101, 2204, 3185, 102, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        short = minilm_model.logits(ids, torch.ones_like(ids))
        long = minilm_model.logits(padded, mask)
        inner = minilm_model.model.base_model.model
        hidden = inner.bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        by_hand = minilm_model.head_parameters()
        w, b = by_hand[0], by_hand[1]
        expected = hidden.mean(1) @ w.T + b
    torch.testing.assert_close(long, short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short, expected, atol=1e-5, rtol=1e-5)


def test_adapter_and_head_parameters_partition_the_trainable_ones(minilm_model):
    minilm_model.load(minilm_model.init_weights(4, seed=0))
    ad, hd = minilm_model.adapter_parameters(), minilm_model.head_parameters()
    assert len(ad) == 2 * len(minilm_model.layer_names) and len(hd) == 2
    assert [id(p) for p in minilm_model.trainable_parameters()] == [id(p) for p in ad + hd]
