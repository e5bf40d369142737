"""shelora_core.export: the global adapter as a PEFT folder, loadable by PeftModel.from_pretrained."""

import json

import numpy as np
import pytest
import torch

from shelora_core import FederatedConfig
from shelora_core.adapters import AdapterWeights
from shelora_core.assets import load_classifier, load_tokenizer
from shelora_core.errors import CheckpointError, ConfigError
from shelora_core.export import (
    EXPORT_INFO,
    export_federation,
    export_peft,
    exported_logits,
    load_peft,
)
from shelora_core.federation import Federation

TEXTS = [
    "a gripping, beautifully acted film",
    "dull and far too long",
    "the plot never quite comes together, but the cast is wonderful",
]


def _batch(model_name="minilm"):
    tok = load_tokenizer(model_name)
    enc = tok(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _tiny_adapter(model, rank, seed=1):
    """A rank-``rank`` adapter with non-zero B (so it changes the logits) and a random head."""
    rng = np.random.default_rng(seed)
    w = model.init_weights(rank, seed=0)
    factors = {
        k: (rng.normal(0, 0.05, b.shape).astype(np.float32), a) for k, (b, a) in w.factors.items()
    }
    head = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in w.head.items()}
    return AdapterWeights(rank=rank, alpha=model.alpha, factors=factors, head=head)


def test_exported_adapter_loads_with_peft_and_gives_our_logits(minilm_model, tmp_path):
    from peft import PeftModel

    weights = _tiny_adapter(minilm_model, 4)
    minilm_model.load(weights)
    ids, mask = _batch()
    with torch.no_grad():
        ours = minilm_model.logits(ids, mask)
    cfg = FederatedConfig(ranks=(2, 4), lora_alpha=minilm_model.alpha)
    out = export_peft(weights, cfg, tmp_path / "export", label_names=["rotten", "fresh"])

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == minilm_model.alpha
    assert config["target_modules"] == ["query"] and "classifier" in config["modules_to_save"]
    assert (out / "adapter_model.safetensors").stat().st_size > 10_000
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["pooling"] == "mean" and info["label_names"] == ["rotten", "fresh"]

    # by hand, as a Hugging Face user would: the base model with another head seed
    loaded = PeftModel.from_pretrained(load_classifier("minilm", num_labels=2, seed=7), str(out))
    loaded.eval()
    theirs = exported_logits(loaded, ids, mask)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # the adapter and the head matter: the bare base model disagrees
    base = load_classifier("minilm", num_labels=2, seed=7)
    base_peft = PeftModel.from_pretrained(base, str(out))
    with base_peft.disable_adapter():
        bare = exported_logits(base_peft, ids, mask)
    assert not torch.allclose(bare, ours, atol=1e-3)
    # and load_peft does the same in one call
    torch.testing.assert_close(exported_logits(load_peft(out), ids, mask), ours)


def test_export_from_a_federation_checkpoint_matches_the_evaluated_global_model(
    tiny_config, tmp_path
):
    cfg = tiny_config.replace(rounds=1, local_steps=1)
    fed = Federation(cfg, results_dir=tmp_path)
    fed.run()
    # the global model Federation.evaluate scores: the broadcast at the largest rank
    broadcast = fed.last_broadcast()
    fed.evaluate(broadcast)
    ids, mask = _batch()
    with torch.no_grad():
        ours = fed.model.logits(ids, mask)
    out = export_federation(fed, tmp_path / "export")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == max(cfg.ranks)
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["run_name"] == cfg.run_name and info["label_names"] == list(fed.train.label_names)
    torch.testing.assert_close(exported_logits(load_peft(out), ids, mask), ours)


def test_export_refuses_an_encrypted_broadcast_without_the_clients_key(tiny_config, tmp_path):
    cfg = tiny_config.replace(method="shelora")
    with pytest.raises(ConfigError, match=r"'shelora' broadcasts ciphertexts: pass crypto="):
        export_peft(b"not read", cfg, tmp_path)


def test_export_refuses_an_adapter_of_another_model_naming_the_layers(minilm_model, tmp_path):
    weights = _tiny_adapter(minilm_model, 2)
    cfg = FederatedConfig(ranks=(2,), target_modules=("value",))
    with pytest.raises(ConfigError, match=r"do not match 'minilm' with target modules \['value'\]"):
        export_peft(weights, cfg, tmp_path)


def test_export_federation_without_a_checkpoint_names_the_file(tiny_config, tmp_path):
    fed = Federation(tiny_config, results_dir=tmp_path)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        export_federation(fed, tmp_path / "export")
    with pytest.raises(CheckpointError, match="is not an export"):
        load_peft(tmp_path)
