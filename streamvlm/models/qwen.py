"""Qwen2.5-VL and Qwen3-VL: multimodal RoPE, positions built online frame by frame.

Each frame enters as one *image* (the processor repeats it over the temporal patch of 2), preceded by
its timestamp as text, ``<12.0 seconds>``, the way Qwen3-VL marks video frames. One image per frame
means a frame is read the moment it arrives (no waiting for a partner frame to fill a temporal patch),
every frame is one self-contained chunk that memory can later keep, compress or evict on its own, and
time is carried by the text rather than by a temporal position scale. The cost is that the vision
tower sees each frame twice inside its temporal patch, where video mode would pair two frames.

Positions follow the released checkpoints' rule: text advances by one per token; an image's tokens sit
at ``(start, start + row, start + col)``; the next token takes ``max(position) + 1``. For single images
this equals what transformers 5.23 computes (``start + max(h, w)``); the two rules differ only for
multi-frame video grids, which this engine does not use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ModelError
from .base import ModelAdapter, PreparedFrame

__all__ = ["QwenVLAdapter"]


class QwenVLAdapter(ModelAdapter):
    families = ("qwen2_5_vl", "qwen3_vl")
    position_rows = 3
    time_answer_shape = "seconds"  # frames are stamped <12.0 seconds>: a time answer copies that shape

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, source: str) -> None:
        super().__init__(model, tokenizer, image_processor, source)
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.vision_start_id = int(cfg.vision_start_token_id)
        self.vision_end_id = int(cfg.vision_end_token_id)
        self.merge = int(cfg.vision_config.spatial_merge_size)
        self.im_end_id = _token_id(tokenizer, "<|im_end|>")
        self.end_of_text_id = _token_id(tokenizer, "<|endoftext|>", required=False)

    # ---- the chat format ------------------------------------------------------------------------
    def conversation_start(self, system_prompt: str) -> list[int]:
        return (
            self.text_ids(f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n")
        )

    def question_ids(self, question: str) -> list[int]:
        return self.text_ids(question, user=True) + self.text_ids("<|im_end|>\n<|im_start|>assistant\n")

    def turn_end_ids(self) -> list[int]:
        return self.text_ids("<|im_end|>\n<|im_start|>user\n")

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset(i for i in (self.im_end_id, self.end_of_text_id) if i is not None)

    @property
    def banned_ids(self) -> frozenset[int]:
        return frozenset((self.image_token_id, self.vision_start_id, self.vision_end_id, int(self.model.config.video_token_id)))

    # ---- frames ---------------------------------------------------------------------------------
    def prepare_frame(self, image: np.ndarray, pts_s: float, source_id: str = "default") -> PreparedFrame:
        out = self.image_processor(images=[image], return_tensors="pt")
        t, h, w = (int(v) for v in out["image_grid_thw"][0])
        grid = (1, h // self.merge, w // self.merge)
        n = grid[0] * grid[1] * grid[2]
        ids = self.text_ids(f"<{pts_s:.1f} seconds>") + [self.vision_start_id] + [self.image_token_id] * n + [self.vision_end_id]
        pixels = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
        return PreparedFrame(input_ids=ids, pixels=pixels, grid=grid, pts_s=pts_s, source_id=source_id)

    def encode(self, frame: PreparedFrame) -> Any:
        device = self.device
        return self.model.model.get_image_features(
            frame.pixels["pixel_values"].to(device), frame.pixels["image_grid_thw"].to(device), return_dict=True
        )

    def encode_batch(self, frames: list[PreparedFrame]) -> list[Any]:
        """All frames in one vision forward: their patches concatenated, with the list of their grids.

        The vision tower attends within each image only (its sequence boundaries come from the grids),
        so each frame's output equals its own encode; the outputs are split back by each image's
        patch count and merged token count.
        """
        if len(frames) == 1:
            return [self.encode(frames[0])]
        device = self.device
        grids = torch.cat([f.pixels["image_grid_thw"] for f in frames])
        out = self.model.model.get_image_features(
            torch.cat([f.pixels["pixel_values"] for f in frames]).to(device), grids.to(device), return_dict=True
        )
        patches = [int(n) for n in grids.prod(-1)]
        hidden = torch.split(out.last_hidden_state, patches) if out.last_hidden_state.shape[0] == sum(patches) else None
        deepstack = getattr(out, "deepstack_features", None)
        results = []
        for i, pooled in enumerate(out.pooler_output):
            fields: dict[str, Any] = {"last_hidden_state": None if hidden is None else hidden[i], "pooler_output": (pooled,)}
            if deepstack is not None:
                fields["deepstack_features"] = [(layer[i],) for layer in deepstack]
            results.append(type(out)(**fields))
        return results

    def offline_kwargs(self, input_ids: torch.Tensor, frames: list[PreparedFrame]) -> dict[str, Any]:
        if not frames:
            return {}
        return {
            "pixel_values": torch.cat([f.pixels["pixel_values"] for f in frames]),
            "image_grid_thw": torch.cat([f.pixels["image_grid_thw"] for f in frames]),
            "mm_token_type_ids": (input_ids == self.image_token_id).int(),
        }

    # ---- positions --------------------------------------------------------------------------------
    def position_ids(self, ids: list[int], start: int, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
        pieces: list[torch.Tensor] = []
        pos, i, n, grid_iter = start, 0, len(ids), iter(grids)
        while i < n:
            j = i
            is_image = ids[i] == self.image_token_id
            while j < n and (ids[j] == self.image_token_id) == is_image:
                j += 1
            if is_image:
                grid = next(grid_iter, None)
                if grid is None:
                    raise ModelError("image placeholder tokens without a frame grid; image tokens cannot be fed as text")
                t, h, w = grid
                tt, hh, ww = torch.meshgrid(torch.zeros(t, dtype=torch.long), torch.arange(h), torch.arange(w), indexing="ij")
                block = torch.stack([tt, hh, ww]).reshape(3, -1) + pos
                if block.shape[1] != j - i:
                    raise ModelError(f"image placeholder run of {j - i} tokens does not match its grid {t}x{h}x{w}")
                pieces.append(block)
                pos = int(block.max()) + 1
            else:
                pieces.append(torch.arange(pos, pos + (j - i)).expand(3, -1))
                pos += j - i
            i = j
        if not pieces:
            return torch.empty(3, 1, 0, dtype=torch.long), start
        return torch.cat(pieces, dim=1).unsqueeze(1), pos


def _token_id(tokenizer: Any, token: str, *, required: bool = True) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
        if required:
            raise ModelError(f"the tokenizer has no {token!r} token; is this a chat checkpoint of the family?")
        return None
    return int(tid)
