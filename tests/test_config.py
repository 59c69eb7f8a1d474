"""Settings are checked when built: a bad value fails at once with the field's name."""

from __future__ import annotations

import pytest

from streamvlm import ConfigError, IngestConfig, ModelConfig, SamplingConfig, SessionConfig


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: ModelConfig(model=" "), "model"),
        (lambda: ModelConfig(dtype="float8"), "dtype"),
        (lambda: ModelConfig(attn_implementation="flash"), "attn_implementation"),
        (lambda: SamplingConfig(max_new_tokens=0), "max_new_tokens"),
        (lambda: SamplingConfig(temperature=-1.0), "temperature"),
        (lambda: SamplingConfig(top_k=-2), "top_k"),
        (lambda: SamplingConfig(top_p=0.0), "top_p"),
        (lambda: SessionConfig(min_frame_side=0), "min_frame_side"),
        (lambda: SessionConfig(max_question_chars=0), "max_question_chars"),
        (lambda: IngestConfig(fps=0), "fps"),
        (lambda: IngestConfig(fps=float("inf")), "fps"),
    ],
)
def test_invalid_settings_name_their_field(build, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        build()


def test_defaults_are_valid_and_greedy():
    assert SamplingConfig().greedy and not SamplingConfig(temperature=0.5).greedy
    assert ModelConfig().model == "tiny-smolvlm" and IngestConfig().realtime
