"""The CPU's features decide bf16: a CPU without bf16 matrix units is named in the log."""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from ft.core.cpuinfo import cpu_info, warn_cpu_precision

AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n"
AMX = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
       "flags\t\t: avx2 fma avx512f avx512_bf16 amx_tile amx_bf16\n")


def test_features_are_read_from_cpuinfo():
    a, b = cpu_info(AVX2), cpu_info(AMX)
    assert a["model"] == "AMD EPYC 7B13" and a["features"] == ["avx2", "fma"] and not a["bf16_units"]
    assert b["features"] == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"] and b["bf16_units"]
    here = cpu_info()
    assert here["model"] and isinstance(here["bf16_units"], bool)


def test_bf16_on_a_cpu_without_units_is_named(caplog):
    cpu = OmegaConf.create({"precision": "bf16-mixed", "accelerator": "cpu"})
    with caplog.at_level(logging.WARNING, logger="ft"):
        message = warn_cpu_precision(cpu, cpu_info(AVX2))
    assert message and "without bf16 matrix units (AMD EPYC 7B13; has avx2, fma" in message
    assert "trainer.precision=32-true is faster" in caplog.text
    assert warn_cpu_precision(cpu, cpu_info(AMX)) is None  # AMX: bf16 is the faster choice there
    assert warn_cpu_precision(OmegaConf.create({"precision": "32-true", "accelerator": "cpu"}), cpu_info(AVX2)) is None
    assert warn_cpu_precision(OmegaConf.create({"precision": "bf16-mixed", "accelerator": "gpu"}),
                              cpu_info(AVX2)) is None
