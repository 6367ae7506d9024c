"""Model sizes (sweep/sizes.py) -> open_clip CLIP models, and encoders that accept reduced token sequences.

Every size is an open_clip ``CLIP`` built from a config dict (the same dicts are registered with open_clip under
``sweep-<size>``, so a saved checkpoint loads with ``open_clip.create_model("sweep-<size>", pretrained=path)``).

open_clip's own ``encode_image``/``encode_text`` assume the full sequence. The two functions at the bottom run the
same open_clip modules on shorter sequences, so one set of weights serves every image resolution, every subset of
patches and every text context length:
- image: the learned position table (full grid) is bilinearly resized to the grid actually fed (``resize``), then
  the kept patches are gathered before the transformer blocks (masking strategies), so compute really falls;
- text: the position table and the causal mask are sliced to the context fed.
"""
from __future__ import annotations

import copy

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from sweep.sizes import MODELS


def register_open_clip_configs() -> None:
    """Make every size known to open_clip as ``sweep-<size>`` (idempotent)."""
    from open_clip.factory import _MODEL_CONFIGS

    for spec in MODELS.values():
        _MODEL_CONFIGS.setdefault(spec.open_clip_name, copy.deepcopy(spec.config))


def build_model(name: str) -> open_clip.CLIP:
    """A freshly initialised open_clip CLIP of the named size (call ``torch.manual_seed`` first for determinism)."""
    return open_clip.CLIP(**copy.deepcopy(MODELS[name].config))


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tower_params(model: open_clip.CLIP) -> tuple[int, int]:
    """(vision_params, text_params): the parameters of each encoder, the paper's model-size axes. The text tower
    leaves out its token embedding (49408 x width), which is a lookup table, not compute, and would otherwise
    dominate the small sizes' counts; the temperature belongs to neither."""
    vision = count_params(model.visual)
    text = sum(p.numel() for name, p in model.named_parameters()
               if not name.startswith(("visual.", "token_embedding.", "logit_")))
    return vision, text


def position_embedding_for_grid(visual: VisionTransformer, grid: int) -> torch.Tensor:
    """The class position and ``grid x grid`` patch positions, resized from the learned full-grid table as open_clip
    resizes one (bicubic, antialiased: each new position averages all the old ones it covers, so at 17 of 197
    tokens every entry of the table is trained; without the filter only the 2 x 2 around each sample point were,
    64 of ViT-B-16's 196, and the full-length fine-tune started from the others' initial values)."""
    table = visual.positional_embedding
    full = visual.grid_size[0]
    if grid == full:
        return table
    patches = table[1:].reshape(1, full, full, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def encode_image(model: open_clip.CLIP, images: torch.Tensor, keep: torch.Tensor | None = None,
                 normalize: bool = True) -> torch.Tensor:
    """Image features from ``images`` [B, 3, H, W] (any H = W multiple of the patch size).

    ``keep`` [B, n] holds the indices (row-major into the patch grid) of the patches that enter the transformer;
    None keeps all of them. The class token is always kept, so the blocks see ``n + 1`` tokens.
    """
    visual = model.visual
    x = visual.conv1(images)  # [B, width, grid, grid]
    grid = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)  # [B, grid*grid, width]
    pos = position_embedding_for_grid(visual, grid).to(x.dtype)
    x = x + pos[1:]
    if keep is not None:  # drop patches before the blocks: the attention and MLP FLOPs fall with the count
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    cls = (visual.class_embedding + pos[0]).to(x.dtype).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1))
    x = visual.transformer(x)
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return F.normalize(pooled, dim=-1) if normalize else pooled


def encode_text(model: open_clip.CLIP, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Text features from token ids [B, L] for any context L up to the model's full context."""
    length = text.shape[1]
    x = model.token_embedding(text) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    # open_clip pools at the end-of-text token, the highest id in every row
    x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)]
    x = x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x
