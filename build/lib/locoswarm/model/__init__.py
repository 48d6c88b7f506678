"""GPT presets. ``tiny`` and ``small`` are for CPU; ``60m``/``150m``/``400m`` follow the DiLoCo paper's
architectures (layers, width, heads) for GPU runs. With the byte-level vocabulary (256) the embedding is
far smaller than the paper's 32k-token one, so the parameter counts come out below the preset names.
"""

from __future__ import annotations

from locoswarm.model.gpt import GPT, GPTShape

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=4, n_head=4, d_model=128),  # ~0.8M parameters
    "small": dict(n_layer=6, n_head=6, d_model=384),  # ~10.7M
    "60m": dict(n_layer=3, n_head=16, d_model=896),  # DiLoCo paper, Table 5
    "150m": dict(n_layer=12, n_head=16, d_model=896),
    "400m": dict(n_layer=12, n_head=12, d_model=1536),
}

__all__ = ["GPT", "GPTShape", "PRESETS"]
