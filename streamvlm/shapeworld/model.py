"""The ShapeWorld model: a SmolVLM-architecture VLM small enough to train from scratch on a CPU.

The architecture is transformers' ``SmolVLMForConditionalGeneration`` (a SigLIP-style vision tower,
pixel shuffle, a Llama language model), so the trained checkpoint loads through exactly the same
adapter path as a downloaded SmolVLM2 (``load_model("shapeworld")``). Sizes follow what was measured
to learn this world on two CPU cores: 64x64 frames cut into 8 px patches, a 2-layer vision tower of
width 64, pixel shuffle 4 (4 visual tokens per frame), and a 4-layer Llama of width 128. The tokenizer
is a byte-level BPE trained on the ShapeWorld vocabulary with every digit its own token, so a frame's
``MM:SS`` timestamp can be copied into an answer digit by digit.

No torch training code lives here: :mod:`streamvlm.shapeworld.train` trains, this module only builds
the untrained model and says where the shipped checkpoint is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import SessionConfig
from ..dialogue.controller import DEFAULT_PROBE_TEMPLATE
from ..models.tiny import SMOL_SPECIALS, SMOL_TEMPLATE, build_tokenizer
from .world import COLOURS, SHAPES

__all__ = ["FRAME_SIZE", "VOCAB_SIZE", "checkpoint_dir", "build_untrained", "SYSTEM_PROMPT"]

#: Frames are rendered (and read) at this size.
FRAME_SIZE = 64
VOCAB_SIZE = 512
#: The system prompt the model is trained with: the session's default, so a default session fits it.
SYSTEM_PROMPT = SessionConfig().system_prompt


def checkpoint_dir() -> Path:
    """Where the trained checkpoint ships inside the package (``streamvlm/shapeworld/checkpoint``)."""
    return Path(__file__).resolve().parent / "checkpoint"


def _corpus() -> str:
    """Every phrase the model reads or says, for training the tokenizer's merges (frequent ones repeated)."""
    things = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    lines = [
        SYSTEM_PROMPT,
        "Frame from 00:00: What shape is on screen now? How many shapes are visible?",
        "What colour was the first shape? Assistant: User: System:",
        *(f"When did the {t} appear? Tell me when a {t} appears. Is there a {t} now?" for t in things),
        *(DEFAULT_PROBE_TEMPLATE.format(condition=f"a {t} appears") for t in things),
        " ".join(SHAPES) + " " + " ".join(COLOURS) + " yes no 0 1 2 3 4 5 6 7 8 9 :",
        *(["\nFrame from 00:00: Assistant: User:"] * 40),
    ]
    return "\n".join(lines)


def build_untrained(out: Path, *, seed: int = 0) -> Any:
    """Build the untrained model with its tokenizer and image processor, save all three to ``out``.

    Returns the model (float32, train mode off). Deterministic for ``seed``.
    """
    import torch
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil

    tok = build_tokenizer(SMOL_SPECIALS, VOCAB_SIZE, eos="<end_of_utterance>", pad="<|endoftext|>", corpus=_corpus(), split_digits=True)
    tok.chat_template = SMOL_TEMPLATE
    cfg = SmolVLMConfig(
        vision_config=dict(image_size=FRAME_SIZE, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=384,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"), eos_token_id=tok.eos_token_id),
        scale_factor=4,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )
    processor = SmolVLMImageProcessorPil(size={"longest_edge": FRAME_SIZE}, max_image_size={"longest_edge": FRAME_SIZE},
                                         do_image_splitting=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = SmolVLMForConditionalGeneration(cfg)
    finally:
        torch.random.set_rng_state(state)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    processor.save_pretrained(out)
    return model.eval()
