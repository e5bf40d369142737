"""Heterogeneous LoRA adapters on one shared base model.

Each simulated client has its own LoRA rank. All clients of a process share ONE frozen base model
wrapped by ``peft``: the wrapper holds one adapter per distinct rank (named ``r8``, ``r16``, ...),
and a client's weights are swapped into the adapter of its rank before it trains and read out after.
Nothing but the adapter and the classification head ever changes, so the base model is never copied.

Weights cross this module's boundary as numpy arrays in the paper's notation: for layer ``name``
with frozen ``W0`` (m x n), ``B`` is (m x r) and ``A`` is (r x n); the adapter adds
``s * B @ A`` with ``s = alpha / r``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from .adapters import AdapterWeights
from .assets import get_spec, load_classifier

__all__ = ["AdapterWeights", "LoraModel", "adapter_name"]


def adapter_name(rank: int) -> str:
    return f"r{rank}"


class LoraModel:
    """One base model with LoRA adapters for a set of ranks.

    Args:
        model_name: ``"minilm"`` or ``"smollm2"``.
        num_labels: classes of the task.
        ranks: every rank any client uses.
        alpha: LoRA alpha shared by all clients (scaling ``alpha / r``).
        target_modules: leaf module names to adapt; defaults to the model's ``default_targets``.
        seed: seeds the classification head (identical for every client with the same seed).
    """

    def __init__(
        self,
        model_name: str,
        *,
        num_labels: int,
        ranks: Iterable[int],
        alpha: float = 16.0,
        target_modules: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        import warnings

        from peft import LoraConfig, get_peft_model

        spec = get_spec(model_name)
        targets = tuple(target_modules) if target_modules else spec.default_targets
        bad = [t for t in targets if t not in spec.target_modules]
        if bad:
            raise ValueError(
                f"unknown target module(s) {bad} for model {model_name!r}; "
                f"choose from {list(spec.target_modules)}"
            )
        ranks = sorted(set(int(r) for r in ranks))
        if not ranks:
            raise ValueError("ranks is empty: give at least one LoRA rank, e.g. ranks=(8,)")
        if alpha <= 0:
            raise ValueError(f"lora alpha must be > 0 (got {alpha})")
        base = load_classifier(model_name, num_labels=num_labels, seed=seed)
        width = min(
            min(m.weight.shape)
            for n, m in base.named_modules()
            if n.rsplit(".", 1)[-1] in targets and hasattr(m, "weight")
        )
        for r in ranks:
            if not 1 <= r <= width:
                raise ValueError(
                    f"LoRA rank {r} is out of range for {model_name!r}: ranks must be in "
                    f"[1, {width}] (the smallest adapted layer is {width} wide)"
                )
        self.model_name = model_name
        self.spec = spec
        self.targets = targets
        self.ranks = tuple(ranks)
        self.alpha = float(alpha)
        self.num_labels = num_labels
        self.initial_head = {
            k: v.detach().cpu().numpy().copy()
            for k, v in base.get_submodule(spec.head).state_dict().items()
        }
        peft_model = None
        for r in ranks:
            cfg = LoraConfig(
                r=r,
                lora_alpha=alpha,
                target_modules=list(targets),
                lora_dropout=0.0,
                bias="none",
                modules_to_save=[spec.head],
                task_type="SEQ_CLS",
            )
            with warnings.catch_warnings():  # transformers 5 deprecation noise from inside peft
                warnings.simplefilter("ignore", FutureWarning)
                if peft_model is None:
                    peft_model = get_peft_model(base, cfg, adapter_name=adapter_name(r))
                else:
                    peft_model.add_adapter(adapter_name(r), cfg)
        self.model = peft_model
        self._lora_modules = {
            name: module
            for name, module in peft_model.base_model.model.named_modules()
            if name.rsplit(".", 1)[-1] in targets and hasattr(module, "lora_A")
        }
        self.layer_names = tuple(self._lora_modules)
        self.layer_shapes = {
            name: tuple(mod.base_layer.weight.shape) for name, mod in self._lora_modules.items()
        }
        self.active_rank = ranks[0]
        self.activate(ranks[0])

    # ------------------------------------------------------------------ weights in / out
    def activate(self, rank: int) -> None:
        """Make the adapter of ``rank`` the one used by forward and training."""
        if rank not in self.ranks:
            raise ValueError(f"rank {rank} has no adapter; this model was built for {self.ranks}")
        self.model.set_adapter(adapter_name(rank))
        self.active_rank = rank

    def _head_module(self, rank: int) -> torch.nn.Module:
        wrapper = self.model.base_model.model.get_submodule(self.spec.head)
        return wrapper.modules_to_save[adapter_name(rank)]

    def adapter_parameters(self) -> list[torch.nn.Parameter]:
        """The active adapter's LoRA factors (A and B of every target layer)."""
        name = adapter_name(self.active_rank)
        params = []
        for mod in self._lora_modules.values():
            params += [mod.lora_A[name].weight, mod.lora_B[name].weight]
        return params

    def head_parameters(self) -> list[torch.nn.Parameter]:
        """The active adapter's classification head."""
        return list(self._head_module(self.active_rank).parameters())

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Everything local training updates: the adapter, then the head."""
        return self.adapter_parameters() + self.head_parameters()

    def init_weights(self, rank: int, *, seed: int) -> AdapterWeights:
        """The round-0 adapter: A ~ U(-1/sqrt(n), 1/sqrt(n)) (peft's default), B = 0.

        The same ``seed`` and ``rank`` give the same A on every client (a common initial model).
        """
        rng = np.random.default_rng([seed, rank, 0x10A])
        factors = {}
        for name, (m, n) in self.layer_shapes.items():
            bound = 1.0 / np.sqrt(n)
            a = rng.uniform(-bound, bound, size=(rank, n)).astype(np.float32)
            factors[name] = (np.zeros((m, rank), np.float32), a)
        head = {k: v.copy() for k, v in self.initial_head.items()}
        return AdapterWeights(rank=rank, alpha=self.alpha, factors=factors, head=head)

    @torch.no_grad()
    def load(self, weights: AdapterWeights) -> None:
        """Copy ``weights`` into the adapter of its rank and make that adapter active."""
        self.validate(weights)
        name = adapter_name(weights.rank)
        for layer, (b, a) in weights.factors.items():
            mod = self._lora_modules[layer]
            mod.lora_B[name].weight.copy_(torch.from_numpy(np.asarray(b, np.float32)))
            mod.lora_A[name].weight.copy_(torch.from_numpy(np.asarray(a, np.float32)))
        head = self._head_module(weights.rank)
        head.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.head.items()})
        self.activate(weights.rank)

    @torch.no_grad()
    def read(self, rank: int | None = None) -> AdapterWeights:
        """Read the adapter of ``rank`` (default: the active one) back as numpy arrays."""
        rank = self.active_rank if rank is None else rank
        name = adapter_name(rank)
        factors = {
            layer: (
                mod.lora_B[name].weight.detach().cpu().numpy().copy(),
                mod.lora_A[name].weight.detach().cpu().numpy().copy(),
            )
            for layer, mod in self._lora_modules.items()
        }
        head = {
            k: v.detach().cpu().numpy().copy()
            for k, v in self._head_module(rank).state_dict().items()
        }
        return AdapterWeights(rank=rank, alpha=self.alpha, factors=factors, head=head)

    def validate(self, weights: AdapterWeights) -> None:
        """Check layer names and shapes before loading; the error names both shapes."""
        if weights.rank not in self.ranks:
            raise ValueError(
                f"adapter rank {weights.rank} has no slot in this model (ranks {self.ranks}); "
                "build the LoraModel with every client rank"
            )
        missing = set(self.layer_shapes) - set(weights.factors)
        extra = set(weights.factors) - set(self.layer_shapes)
        if missing or extra:
            raise ValueError(
                f"adapter layers do not match the model: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(extra)[:3]} (target modules {self.targets})"
            )
        r = weights.rank
        for layer, (b, a) in weights.factors.items():
            m, n = self.layer_shapes[layer]
            if tuple(b.shape) != (m, r) or tuple(a.shape) != (r, n):
                raise ValueError(
                    f"size mismatch for {layer}: got B {tuple(b.shape)} and A {tuple(a.shape)}, "
                    f"expected B {(m, r)} and A {(r, n)} for rank {r}"
                )
        for k, v in self.initial_head.items():
            got = weights.head.get(k)
            if got is None or tuple(got.shape) != v.shape:
                raise ValueError(
                    f"size mismatch for head {k}: got {None if got is None else tuple(got.shape)}, "
                    f"expected {v.shape}"
                )

    def base_weights(self) -> dict[str, np.ndarray]:
        """The frozen W0 (m x n) of every adapted layer (public: part of the pretrained model)."""
        if not hasattr(self, "_w0"):
            self._w0 = {
                name: mod.base_layer.weight.detach().cpu().numpy().copy()
                for name, mod in self._lora_modules.items()
            }
        return self._w0

    # ------------------------------------------------------------------ forward helpers
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits with the active adapter; the head reads the pooling of the model's spec."""
        if self.spec.pooling == "native":
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        inner = self.model.base_model.model  # the ...ForSequenceClassification, LoRA injected
        hidden = getattr(inner, self.spec.encoder)(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return getattr(inner, self.spec.head)(inner.dropout(pooled))

    @torch.no_grad()
    def predict(
        self, batches: Iterable[Mapping[str, torch.Tensor]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Predicted and true labels over ``batches`` with the active adapter."""
        self.model.eval()
        preds, refs = [], []
        for batch in batches:
            out = self.logits(batch["input_ids"], batch["attention_mask"])
            preds.append(out.argmax(-1).cpu().numpy())
            refs.append(batch["labels"].cpu().numpy())
        return np.concatenate(preds), np.concatenate(refs)
