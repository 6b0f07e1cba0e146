"""The image splice and GLM-4V's compressed position ids (docs/MODEL.md §4.5).

In ``input_ids`` an image is three tokens: ``<|begin_of_image|> <|endoftext|> <|end_of_image|>``. The model
replaces those three embeddings with the vision tower's output (boi vector, P patch vectors, eoi vector) and gives
them positions ``p, p+1 (shared by all P patches), p+2``, where p is the position of ``<|begin_of_image|>``. Text
after the image keeps its unexpanded numbering, so the image costs P + 2 cache entries but only 3 RoPE positions.
"""

from __future__ import annotations

import torch


def find_image_span(ids: torch.Tensor, boi_id: int, eoi_id: int) -> int | None:
    """Index of the first ``boi`` in a 1-D id tensor, checking the ``boi, placeholder, eoi`` shape; None if absent."""
    hits = (ids == boi_id).nonzero()
    if hits.numel() == 0:
        return None
    b = int(hits[0, 0])
    if b + 2 >= ids.numel() or int(ids[b + 2]) != eoi_id:
        raise ValueError(
            f"image tokens malformed: <|begin_of_image|> at {b} must be followed by one placeholder and "
            f"<|end_of_image|> (id {eoi_id})"
        )
    return b


def expand_position_ids(position_ids: torch.Tensor, boi_index: int, num_patches: int) -> torch.Tensor:
    """(S,) unexpanded → (S - 3 + num_patches + 2,): pos[:b+1] ⧺ [pos[b+1]] × num_patches ⧺ pos[b+2:]."""
    b = boi_index
    shared = position_ids[b + 1 : b + 2].expand(num_patches)
    return torch.cat([position_ids[: b + 1], shared, position_ids[b + 2 :]])


def splice_image(
    embeds: torch.Tensor, position_ids: torch.Tensor, boi_index: int, image_embeds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the 3 image-token rows of one sample by its image embeddings.

    embeds (S, H), position_ids (S,), image_embeds (P + 2, H) → embeds (S - 3 + P + 2, H), position_ids (same length).
    The token embeddings of boi/placeholder/eoi are discarded; the learned boi/eoi vectors take their place.
    """
    b = boi_index
    new_embeds = torch.cat([embeds[:b], image_embeds.to(embeds.device, embeds.dtype), embeds[b + 3 :]])
    new_pos = expand_position_ids(position_ids, b, image_embeds.shape[0] - 2)
    return new_embeds, new_pos
