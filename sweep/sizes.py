"""Model sizes as data: open_clip CLIP configs and the shapes the rest of the project reads (full token lengths).

Kept free of torch and open_clip so that reading results (`analysis`) knows each size's full lengths without
importing them; `sweep.models` builds the models.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """One model size: open_clip's CLIP config plus the shapes the rest of the project reads."""

    name: str
    config: dict  # open_clip model config: embed_dim, vision_cfg, text_cfg
    scale: str  # "cpu" (embedded default) or "paper"

    @property
    def image_size(self) -> int:
        return self.config["vision_cfg"]["image_size"]

    @property
    def patch_size(self) -> int:
        return self.config["vision_cfg"]["patch_size"]

    @property
    def grid(self) -> int:
        """Patches per side at full resolution."""
        return self.image_size // self.patch_size

    @property
    def image_tokens(self) -> int:
        """Full image sequence: grid x grid patches plus the class token (64 px / patch 8 -> 65)."""
        return self.grid**2 + 1

    @property
    def text_tokens(self) -> int:
        """Full text context, start and end tokens included."""
        return self.config["text_cfg"]["context_length"]

    @property
    def open_clip_name(self) -> str:
        return f"sweep-{self.name}"


def _config(embed_dim, image_size, patch_size, width, layers, head_width, text_width, text_layers, text_heads):
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": width, "layers": layers,
                       "head_width": head_width},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": text_width, "heads": text_heads,
                     "layers": text_layers},
    }


# The CPU sizes are sized so that a whole embedded study (75 runs) takes ~15 minutes on 2 cores: their vision
# towers differ 2-3x in parameters from one size to the next (0.12M, 0.37M, 0.84M). `params` in results counts
# the whole model as open_clip does, so it includes the text token embedding (49408 x text width, 3.2M-4.7M).
# Paper sizes follow the CLIPA recipe: 224 px, patch 16 (14 for H), text context 32.
MODELS: dict[str, ModelSpec] = {
    "cpu-s": ModelSpec("cpu-s", _config(64, 64, 8, 64, 2, 32, 64, 2, 2), "cpu"),
    "cpu-m": ModelSpec("cpu-m", _config(64, 64, 8, 96, 3, 32, 64, 2, 2), "cpu"),
    "cpu-l": ModelSpec("cpu-l", _config(96, 64, 8, 128, 4, 32, 96, 2, 3), "cpu"),
    "ViT-S-16": ModelSpec("ViT-S-16", _config(384, 224, 16, 384, 12, 64, 384, 12, 6), "paper"),
    "ViT-B-16": ModelSpec("ViT-B-16", _config(512, 224, 16, 768, 12, 64, 512, 12, 8), "paper"),
    "ViT-L-16": ModelSpec("ViT-L-16", _config(768, 224, 16, 1024, 24, 64, 768, 12, 12), "paper"),
    "ViT-H-14": ModelSpec("ViT-H-14", _config(1024, 224, 14, 1280, 32, 80, 1024, 24, 16), "paper"),
}
