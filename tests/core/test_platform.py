"""opt_core.platform.cpu_info: the one /proc/cpuinfo parser (kernel choices and benchmark reports)."""

from __future__ import annotations

from opt_core.platform import cpu_info

SAMPLE = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9454P 48-Core Processor
flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: Some Other Name
flags\t\t: fpu
"""


def test_reads_first_processor(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(SAMPLE)
    info = cpu_info(path)
    assert info.model_name == "AMD EPYC 9454P 48-Core Processor"
    assert info.flags == frozenset({"fpu", "sse2", "avx2", "fma", "avx512f", "avx512_vnni"})


def test_missing_file_gives_no_flags(tmp_path):
    info = cpu_info(tmp_path / "absent")
    assert info.flags == frozenset()
    assert info.model_name  # platform.processor() or "unknown CPU", never empty


def test_arm_style_file_without_model_name(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n")
    info = cpu_info(path)
    assert info.flags == frozenset()
    assert info.model_name
