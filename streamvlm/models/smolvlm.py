"""SmolVLM2 (Idefics3 style): a Llama language model with 1-D RoPE and pixel-shuffled SigLIP tokens.

Each frame enters as one unsplit image (no tiling), preceded by ``\\nFrame from MM:SS:`` as in
SmolVLM2's video prompt, with ``image_seq_len`` visual tokens between ``<fake_token_around_image>``
markers. Positions are consecutive integers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from transformers.modeling_outputs import BaseModelOutputWithPooling

from .base import ModelAdapter, PreparedFrame
from .qwen import _token_id

__all__ = ["SmolVLMAdapter"]


class SmolVLMAdapter(ModelAdapter):
    families = ("smolvlm", "idefics3")
    position_rows = 1

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, source: str) -> None:
        super().__init__(model, tokenizer, image_processor, source)
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        vision = cfg.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        self.image_seq_len = side * side // int(cfg.scale_factor) ** 2
        self.fake_id = _token_id(tokenizer, "<fake_token_around_image>")
        self.global_id = _token_id(tokenizer, "<global-img>")
        self.end_of_utterance_id = _token_id(tokenizer, "<end_of_utterance>")
        self.eos_id = tokenizer.eos_token_id

    # ---- the chat format ------------------------------------------------------------------------
    def conversation_start(self, system_prompt: str) -> list[int]:
        return self.text_ids(f"<|im_start|>System: {system_prompt}<end_of_utterance>\n<|im_start|>User:")

    def question_ids(self, question: str) -> list[int]:
        return self.text_ids("\n") + self.text_ids(question, user=True) + self.text_ids("<end_of_utterance>\nAssistant:")

    def turn_end_ids(self) -> list[int]:
        return self.text_ids("<end_of_utterance>\n<|im_start|>User:")

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset(i for i in (self.end_of_utterance_id, self.eos_id) if i is not None)

    @property
    def banned_ids(self) -> frozenset[int]:
        return frozenset((self.image_token_id, self.fake_id, self.global_id))

    # ---- frames ---------------------------------------------------------------------------------
    def prepare_frame(self, image: np.ndarray, pts_s: float, source_id: str = "default") -> PreparedFrame:
        out = self.image_processor(images=[[image]], do_image_splitting=False, return_tensors="pt")
        minutes, seconds = divmod(int(pts_s), 60)
        ids = (
            self.text_ids(f"\nFrame from {minutes:02d}:{seconds:02d}:")
            + [self.fake_id, self.global_id]
            + [self.image_token_id] * self.image_seq_len
            + [self.fake_id]
        )
        pixels = {"pixel_values": out["pixel_values"]}
        if "pixel_attention_mask" in out:
            pixels["pixel_attention_mask"] = out["pixel_attention_mask"]
        return PreparedFrame(input_ids=ids, pixels=pixels, grid=(1, 1, self.image_seq_len), pts_s=pts_s, source_id=source_id)

    def encode(self, frame: PreparedFrame) -> Any:
        device = self.device
        mask = frame.pixels.get("pixel_attention_mask")
        return self.model.model.get_image_features(
            frame.pixels["pixel_values"].to(device), None if mask is None else mask.to(device), return_dict=True
        )

    def encode_batch(self, frames: list[PreparedFrame]) -> list[Any]:
        """Frames of one size share one vision forward (stacked on the batch dimension); others go apart.

        A frame whose pixels are all zero goes alone: the model would take it for batch padding.
        """
        results: list[Any] = [None] * len(frames)
        groups: dict[tuple, list[int]] = {}
        for i, frame in enumerate(frames):
            pixels = frame.pixels["pixel_values"]
            key = (tuple(pixels.shape), "pixel_attention_mask" in frame.pixels, i if not bool(pixels.any()) else -1)
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            if len(members) == 1:
                results[members[0]] = self.encode(frames[members[0]])
                continue
            device = self.device
            pixels = torch.cat([frames[i].pixels["pixel_values"] for i in members]).to(device)
            masks = [frames[i].pixels.get("pixel_attention_mask") for i in members]
            mask = None if masks[0] is None else torch.cat(masks).to(device)
            out = self.model.model.get_image_features(pixels, mask, return_dict=True)
            hidden = out.last_hidden_state
            per_image = hidden.shape[0] // len(members)
            for k, (i, pooled) in enumerate(zip(members, out.pooler_output)):
                results[i] = BaseModelOutputWithPooling(last_hidden_state=hidden[k * per_image : (k + 1) * per_image], pooler_output=[pooled])
        return results

    def offline_kwargs(self, input_ids: torch.Tensor, frames: list[PreparedFrame]) -> dict[str, Any]:
        if not frames:
            return {}
        kwargs = {"pixel_values": torch.cat([f.pixels["pixel_values"] for f in frames], dim=1)}
        if all("pixel_attention_mask" in f.pixels for f in frames):
            kwargs["pixel_attention_mask"] = torch.cat([f.pixels["pixel_attention_mask"] for f in frames], dim=1)
        return kwargs

    # ---- positions --------------------------------------------------------------------------------
    def position_ids(self, ids: list[int], start: int, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
        return torch.arange(start, start + len(ids)).view(1, 1, -1), start + len(ids)
