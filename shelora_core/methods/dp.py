"""FlexLoRA with local differential privacy (the Flex-LoRA-DP baseline of SHE-LoRA's attack table).

Each client privatizes its round update before uploading: the difference between its trained
adapter and the adapter it started the round from (every LoRA factor and the head, as one vector)
is clipped to L2 norm ``C = cfg.dp_clip`` and ``N(0, (sigma C)^2)`` is added to every coordinate
(:func:`shelora_core.privacy.privatize`); the upload is ``start + noisy update``, aggregated by the
server exactly as FlexLoRA. ``sigma`` (:func:`shelora_core.accounting.dp_noise_multiplier`) is
``cfg.dp_noise_multiplier``; or calibrated by the RDP accountant so that the whole run spends at
most ``cfg.dp_target_epsilon``; or the analytic Gaussian mechanism's multiplier for one
``(cfg.dp_epsilon, cfg.dp_delta)`` release per round (10, 1e-5 in the authors' configuration).
Whichever rule sets it, every round record and the summary of the run state the (epsilon, delta)
the accountant gives for the rounds run (:func:`shelora_core.accounting.run_privacy`: client-level,
the unit is a client's whole round update).

To the server a DP upload is a FlexLoRA upload (the header says ``flexlora``): the noise is the
client's own choice and changes nothing on the wire.
"""

from __future__ import annotations

import numpy as np

from ..accounting import dp_noise_multiplier
from ..adapters import AdapterWeights
from ..messages import Message
from ..privacy import privatize
from .base import UploadArgs
from .plaintext import FlexLoRA
from .wire import SEP, adapter_to_upload

__all__ = ["FlexLoRADP", "check_same_adapter", "privatize_update"]


def check_same_adapter(trained: AdapterWeights, start: AdapterWeights) -> None:
    """Refuse a trained adapter whose rank or layers differ from the round's start adapter (a
    DP release clips and noises their difference).

    Raises:
        ValueError: naming both ranks and up to three layers only one of them has.
    """
    if set(trained.factors) != set(start.factors) or trained.rank != start.rank:
        raise ValueError(
            f"the trained adapter (rank {trained.rank}) and the start adapter (rank {start.rank}) "
            f"differ in rank or layers (only in one: "
            f"{sorted(set(trained.factors) ^ set(start.factors))[:3]})"
        )


def privatize_update(
    trained: AdapterWeights,
    start: AdapterWeights,
    *,
    clip: float,
    noise_multiplier: float | None = None,
    epsilon: float | None = None,
    delta: float = 1e-5,
    seed: int = 0,
) -> AdapterWeights:
    """``start + clip-and-noise(trained - start)``: one DP release of a client's update.

    The update is every layer's ``B`` (layers in order), then every ``A``, then the head; noise is
    drawn in that order from ``numpy.random.default_rng([seed, 0xD9])``. Give ``noise_multiplier``
    (sigma) or ``epsilon`` (and ``delta``).
    """
    if (noise_multiplier is None) == (epsilon is None):
        raise ValueError(
            "local DP needs exactly one of noise_multiplier (sigma) and epsilon; got "
            f"noise_multiplier={noise_multiplier!r}, epsilon={epsilon!r}"
        )
    check_same_adapter(trained, start)
    layers = list(trained.factors)
    upd = {f"{k}{SEP}B": trained.factors[k][0] - start.factors[k][0] for k in layers}
    upd |= {f"{k}{SEP}A": trained.factors[k][1] - start.factors[k][1] for k in layers}
    upd |= {f"head{SEP}{k}": trained.head[k] - start.head[k] for k in trained.head}
    rng = np.random.default_rng([seed, 0xD9])
    noisy = privatize(
        upd, max_norm=clip, epsilon=epsilon, delta=delta, sigma=noise_multiplier, rng=rng
    )
    return AdapterWeights(
        trained.rank,
        trained.alpha,
        {
            k: (
                (start.factors[k][0] + noisy[f"{k}{SEP}B"]).astype(np.float32),
                (start.factors[k][1] + noisy[f"{k}{SEP}A"]).astype(np.float32),
            )
            for k in layers
        },
        {k: (start.head[k] + noisy[f"head{SEP}{k}"]).astype(np.float32) for k in trained.head},
    )


class FlexLoRADP(FlexLoRA):
    """FlexLoRA whose clients upload a clipped, noised update (settings ``dp_*`` of the config)."""

    name = "flexlora-dp"
    #: to the server a DP upload is a FlexLoRA upload (only the client adds noise)
    wire_name = "flexlora"

    def _upload(self, weights: AdapterWeights, req: UploadArgs) -> Message:
        round_, client_id, num_examples, _, _, start, seed = req
        if start is None:
            raise ValueError(
                "flexlora-dp privatizes the round's update: pass start= (the adapter the client "
                "started the round from)"
            )
        cfg = self.cfg
        noisy = privatize_update(
            weights,
            start,
            clip=cfg.dp_clip,
            noise_multiplier=dp_noise_multiplier(cfg),
            seed=seed,
        )
        return adapter_to_upload(
            noisy, method="flexlora", round_=round_, client_id=client_id, num_examples=num_examples
        )
