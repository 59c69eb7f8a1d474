"""Random-weight presets of the real architectures, built on this machine with no download.

``tiny-qwen2.5-vl``, ``tiny-qwen3-vl`` and ``tiny-smolvlm`` are a few hundred thousand parameters: fast
enough for tests. ``smolvlm-256m-random`` has SmolVLM2-256M's layer sizes (and vocabulary size) with
random weights: its answers are noise, its timings are honest. Each preset is built once with a local
tokenizer (byte-level BPE trained on a built-in text, padded to the model's vocabulary) and the
family's real image processor, written with ``save_pretrained`` under the presets directory, and then
loaded back through exactly the same code path as a downloaded checkpoint.

The presets directory is ``$STREAMVLM_HOME/presets`` (default ``~/.cache/streamvlm/presets``).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import streamvlm_home

__all__ = ["PRESETS", "preset_dir", "ensure_preset", "is_preset", "build_tokenizer", "SMOL_SPECIALS", "SMOL_TEMPLATE"]

#: Bumped when a preset's recipe changes, so stale builds are not reused.
_RECIPE_VERSION = 1

_CORPUS = """
what is on the table? a red cup, a blue ball and a green book. the person is holding a knife and
cutting an onion on the cutting board. someone opens the door and walks into the kitchen. the kettle
is boiling on the stove. a car leaves the parking lot; it was white. the dog sits on the sofa next to
a yellow lamp. how many people are in the room? there are two people and one cat. when did the red
circle appear? it appeared at 12 seconds. tell me when someone waves. yes. no. i can see a laptop,
a phone and a pair of glasses on the desk. the screen shows a chart. the light is on. the window is
open and it is raining outside. she picks up the bottle, pours water into the glass and drinks.
a square, a triangle and a circle move across the frame from left to right. first, then, after that,
before, earlier, later, now, seconds, minutes, frame, video, camera, left, right, top, bottom, center.
zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 : . , ? ! ' " - ( )
"""


def build_tokenizer(
    specials: list[str], vocab_size: int, *, eos: str, pad: str, corpus: str = _CORPUS, split_digits: bool = False,
    extra_special: dict[str, str] | None = None,
) -> Any:
    """A byte-level BPE tokenizer over ``corpus``, with ``specials`` first and padded to ``vocab_size``.

    Padding entries are ordinary vocabulary items named ``<r123>`` so every id the model can emit decodes
    to visible text. ``split_digits`` makes every digit its own token (so a time can be copied digit by
    digit).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 600), special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([corpus] * 4, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<r{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, **(extra_special or {}))
    if len(fast) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(fast)} entries, expected {vocab_size}")
    return fast


# ---- Qwen2.5-VL / Qwen3-VL -----------------------------------------------------------------------
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_ids(tok: Any) -> dict[str, int]:
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _qwen_text(tok: Any, vocab: int, hidden: int, layers: int, heads: int, kv: int, inter: int, **extra: Any) -> dict:
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), **extra,
    )


def _build_tiny_qwen25(out: Path) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tok = build_tokenizer(_QWEN_SPECIALS, 640, eos="<|im_end|>", pad="<|endoftext|>")
    tok.chat_template = _QWEN_TEMPLATE
    cfg = Qwen2_5_VLConfig(
        text_config=_qwen_text(tok, 640, 64, 2, 4, 2, 128, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
        **_qwen_ids(tok),
    )
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2)
    _save(Qwen2_5_VLForConditionalGeneration(cfg), tok, processor, out)


def _build_tiny_qwen3(out: Path) -> None:
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = build_tokenizer(_QWEN_SPECIALS, 640, eos="<|im_end|>", pad="<|endoftext|>")
    tok.chat_template = _QWEN_TEMPLATE
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    cfg = Qwen3VLConfig(
        text_config=_qwen_text(tok, 640, 64, 2, 4, 2, 128, head_dim=16, rope_parameters=rope),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[1]),
        **_qwen_ids(tok),
    )
    processor = Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=128 * 128, patch_size=16, merge_size=2, temporal_patch_size=2,
                                      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    _save(Qwen3VLForConditionalGeneration(cfg), tok, processor, out)


# ---- SmolVLM2 ---------------------------------------------------------------------------------------
SMOL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>", "<image>"]
SMOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] | capitalize }}: {{ m['content'] }}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _build_smolvlm(out: Path, *, vocab: int, vision: dict, text: dict, scale_factor: int, image_side: int) -> None:
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil

    tok = build_tokenizer(SMOL_SPECIALS, vocab, eos="<end_of_utterance>", pad="<|endoftext|>")
    tok.chat_template = SMOL_TEMPLATE
    cfg = SmolVLMConfig(
        vision_config=dict(image_size=image_side, **vision),
        text_config=dict(model_type="llama", vocab_size=vocab, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"), eos_token_id=tok.eos_token_id, **text),
        scale_factor=scale_factor,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )
    processor = SmolVLMImageProcessorPil(size={"longest_edge": image_side}, max_image_size={"longest_edge": image_side}, do_image_splitting=False)
    _save(SmolVLMForConditionalGeneration(cfg), tok, processor, out)


def _build_tiny_smolvlm(out: Path) -> None:
    _build_smolvlm(
        out, vocab=640, scale_factor=2, image_side=64,
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    )


def _build_smolvlm_256m(out: Path) -> None:
    # Layer sizes of SmolVLM2-256M-Video-Instruct: SigLIP-B/16 at 512 px, pixel shuffle 4 (64 tokens per
    # frame), a 30-layer Llama of width 576 with 9 query and 3 key/value heads, vocabulary 49,280.
    _build_smolvlm(
        out, vocab=49280, scale_factor=4, image_side=512,
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16),
        text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                  max_position_embeddings=16384, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    )


def _save(model: Any, tokenizer: Any, image_processor: Any, out: Path) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    (out / "README.md").write_text(
        "# Random weights\n\nThis checkpoint was built locally by streamvlm with random weights. It has a real\n"
        "architecture and a local tokenizer; its answers carry no meaning. Use it for tests and timings only.\n"
    )


PRESETS: dict[str, Callable[[Path], None]] = {
    "tiny-qwen2.5-vl": _build_tiny_qwen25,
    "tiny-qwen3-vl": _build_tiny_qwen3,
    "tiny-smolvlm": _build_tiny_smolvlm,
    "smolvlm-256m-random": _build_smolvlm_256m,
}


def is_preset(name: str) -> bool:
    return name in PRESETS


def preset_dir(name: str) -> Path:
    return streamvlm_home() / "presets" / f"{name}-r{_RECIPE_VERSION}"


def ensure_preset(name: str, *, seed: int = 0) -> Path:
    """Build preset ``name`` if it is not on disk yet and return its directory.

    Building is deterministic for a seed and atomic: a half-written build is never picked up.
    """
    out = preset_dir(name)
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"streamvlm: building preset {name} (random weights) in {out} ...", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            PRESETS[name](tmp)
        finally:
            torch.random.set_rng_state(state)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
