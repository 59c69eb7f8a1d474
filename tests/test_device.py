"""Choosing the device and dtype a model runs in: the rule for ``auto``, its reasons, and its errors."""

from __future__ import annotations

import pytest
import torch

from streamvlm.config import ModelConfig
from streamvlm.errors import ConfigError
from streamvlm.models.device import Hardware, Precision, choose_precision, cpu_flags_from_cpuinfo, detect_hardware, precision_of

# Trimmed /proc/cpuinfo of two x86 CPUs: one with AVX512-BF16, one with AVX2 only; and an Arm one.
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_vnni avx512_bf16 avx512_vbmi2
processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_vnni avx512_bf16 avx512_vbmi2
"""
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: sse avx2 avx512f amx_bf16 amx_tile amx_int8\n"
ZEN2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"


def cpu(text: str) -> Hardware:
    return Hardware(cpu_flags=cpu_flags_from_cpuinfo(text))


@pytest.mark.parametrize("text, dtype, reason", [
    (ZEN4, "bfloat16", "bfloat16: CPU has avx512_bf16"),
    (SAPPHIRE_RAPIDS, "bfloat16", "bfloat16: CPU has amx_bf16"),
    (ZEN2, "float32", "float32: CPU has no native bf16"),
    (ARM, "float32", "float32: CPU has no native bf16"),
    ("", "float32", "float32: CPU has no native bf16"),
])
def test_auto_on_a_cpu_picks_bf16_only_where_the_cpu_has_it(text, dtype, reason):
    choice = choose_precision("auto", "auto", cpu(text))
    assert (choice.device, choice.dtype) == ("cpu", dtype)
    assert choice.dtype_reason.startswith(reason)


def test_auto_prefers_cuda_then_mps_then_cpu_and_says_why():
    ampere = Hardware(cuda_capabilities=((8, 0),), mps=False, cpu_flags=cpu_flags_from_cpuinfo(ZEN2))
    choice = choose_precision("auto", "auto", ampere)
    assert (choice.device, choice.dtype) == ("cuda:0", "bfloat16")
    assert choice.dtype_reason == "bfloat16: GPU compute capability 8.0 has bf16"
    turing = Hardware(cuda_capabilities=((7, 5),), cpu_flags=cpu_flags_from_cpuinfo(ZEN4))
    assert (choose_precision("auto", "auto", turing).device, choose_precision("auto", "auto", turing).dtype) == ("cuda:0", "float32")
    apple = Hardware(mps=True)
    assert (choose_precision("auto", "auto", apple).device, choose_precision("auto", "auto", apple).dtype) == ("mps", "float32")
    assert choose_precision("auto", "auto", cpu(ZEN2)).device_reason == "cpu: no CUDA or MPS device"


def test_cuda_n_picks_that_gpu_and_its_own_capability():
    two = Hardware(cuda_capabilities=((7, 0), (9, 0)))
    assert choose_precision("cuda:1", "auto", two) == Precision("cuda:1", "bfloat16", "bfloat16: GPU compute capability 9.0 has bf16",
                                                                 "cuda:1: asked for")
    assert choose_precision("cuda", "auto", two).dtype == "float32"  # cuda means cuda:0, a V100 here


def test_a_dtype_asked_for_is_honoured_and_warns_when_it_may_be_slow():
    assert choose_precision("cpu", "float32", cpu(ZEN4)).dtype_reason == "float32: asked for"
    slow = choose_precision("cpu", "bfloat16", cpu(ZEN2))
    assert slow.dtype == "bfloat16" and "slower" in slow.dtype_reason
    assert "slower" in choose_precision("cpu", "float16", cpu(ZEN4)).dtype_reason


@pytest.mark.parametrize("device, message", [
    ("cuda", "sees no CUDA GPU"), ("cuda:0", "sees no CUDA GPU"), ("mps", "MPS is not available"), ("gpu", "auto, cpu, cuda, cuda:N or mps"),
    ("cuda:x", "auto, cpu, cuda, cuda:N or mps"),
])
def test_a_device_this_machine_lacks_is_a_config_error(device, message):
    with pytest.raises(ConfigError, match=message):
        choose_precision(device, "auto", cpu(ZEN4))


def test_a_gpu_index_past_the_last_names_how_many_there_are():
    with pytest.raises(ConfigError, match=r"only 2 CUDA GPU\(s\) visible \(cuda:0..cuda:1\)"):
        choose_precision("cuda:2", "auto", Hardware(cuda_capabilities=((8, 0), (8, 0))))


def test_an_unknown_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="dtype"):
        choose_precision("cpu", "int4", cpu(ZEN4))


def test_model_config_checks_the_device_spelling_at_once():
    assert ModelConfig(device="cuda:3").device == "cuda:3"
    with pytest.raises(ConfigError, match="device"):
        ModelConfig(device="CUDA")


def test_detect_hardware_reads_cpu_flags_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(SAPPHIRE_RAPIDS)
    hw = detect_hardware(info)
    assert "amx_bf16" in hw.cpu_flags
    assert hw.cuda_count == torch.cuda.device_count()


def test_detect_hardware_without_cpuinfo_falls_back_to_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    hw = detect_hardware(tmp_path / "missing")
    assert hw.cpu_flags == frozenset({"avx512_bf16"})
    assert choose_precision("cpu", "auto", hw).dtype == "bfloat16"


def test_load_model_runs_in_the_chosen_dtype_and_says_so(capsys):
    from streamvlm.models import load_model

    adapter = load_model(ModelConfig(model="tiny-smolvlm", dtype="bfloat16", device="cpu"))
    assert next(adapter.model.parameters()).dtype == torch.bfloat16
    assert precision_of(adapter).to_dict() == {"device": "cpu", "dtype": "bfloat16", "dtype_reason": precision_of(adapter).dtype_reason,
                                               "device_reason": "cpu: asked for"}
    assert "device cpu: asked for, dtype bfloat16" in capsys.readouterr().err


def test_load_model_fails_fast_on_a_missing_device():
    from streamvlm.models import load_model

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        load_model(ModelConfig(model="tiny-smolvlm", device="cuda"))
