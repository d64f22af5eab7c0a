"""`cipher: auto` on the server: AES instructions read from the text the system prints."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import get_args

import pytest

from smolcluster.cipher import (
    AES,
    AUTO,
    CHACHA,
    CIPHERS,
    cpuinfo_has_aes,
    machine_has_aes,
    server_cipher,
    sysctl_has_aes,
)
from smolcluster.config import ConfigError, config_fields, load_settings, value_type

# Trimmed /proc/cpuinfo of the machines the cluster has, as the kernel prints them.
X86_AES_NI = """\
processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) CPU @ 2.20GHz
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush \
mmx fxsr sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology \
nonstop_tsc cpuid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe \
popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch
bugs		: cpu_meltdown spectre_v1 spectre_v2
"""
X86_NO_AES = """\
processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Atom(TM) CPU N270 (no aes here: only flags count)
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat clflush dts \
acpi mmx fxsr sse sse2 ss ht tm pbe nx constant_tsc arch_perfmon pebs bts pni dtes64 monitor
"""
PI4 = """\
processor	: 0
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU part	: 0xd08

Hardware	: BCM2835
Model		: Raspberry Pi 4 Model B Rev 1.4
"""
PI5 = """\
processor	: 0
BogoMIPS	: 108.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
lrcpc dcpop asimddp
CPU implementer	: 0x41
CPU part	: 0xd0b

Model		: Raspberry Pi 5 Model B Rev 1.0
"""
INTEL_MAC_FEATURES = (
    "FPU VME DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA CMOV PAT PSE36 CLFSH DS ACPI MMX "
    "FXSR SSE SSE2 SS HTT TM PBE SSE3 PCLMULQDQ DTES64 MON DSCPL VMX EST TM2 SSSE3 FMA CX16 TPR "
    "PDCM SSE4.1 SSE4.2 x2APIC MOVBE POPCNT AES PCID XSAVE OSXSAVE SEGLIM64 TSCTMR AVX1.0 RDRAND "
    "F16C\n"
)


@pytest.mark.parametrize(
    ("text", "has"), [(X86_AES_NI, True), (X86_NO_AES, False), (PI4, False), (PI5, True)]
)
def test_cpuinfo_flags_or_features_name_aes(text: str, has: bool) -> None:
    assert cpuinfo_has_aes(text) is has


def test_aes_elsewhere_in_cpuinfo_does_not_count() -> None:
    assert not cpuinfo_has_aes("model name\t: aes\nflags\t\t: fpu vaes sse2\n")


@pytest.mark.parametrize(
    ("feat_aes", "features", "has"),
    [
        ("1\n", "", True),  # Apple silicon
        ("0\n", "", False),
        ("", INTEL_MAC_FEATURES, True),  # an Intel Mac: no hw.optional.arm keys
        ("", INTEL_MAC_FEATURES.replace(" AES ", " "), False),
        ("", "", False),  # neither key answered
    ],
)
def test_sysctl_answers(feat_aes: str, features: str, has: bool) -> None:
    assert sysctl_has_aes(feat_aes, features) is has


def test_an_explicit_cipher_is_the_servers_and_auto_follows_the_cpu() -> None:
    assert server_cipher(CHACHA) == CHACHA
    assert server_cipher(AES) == AES
    assert server_cipher("auto") == (AES if machine_has_aes() else CHACHA)


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/cpuinfo")
def test_the_live_read_is_the_parser_on_this_machine() -> None:
    assert machine_has_aes() is cpuinfo_has_aes(Path("/proc/cpuinfo").read_text())


def test_an_unknown_cipher_is_one_error_naming_the_key(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "host_ip: {a: 127.0.0.1, b: 127.0.0.1}\nport: 5000\nnum_workers: 1\nworkers: [b]\n"
        "server: a\ncipher: aes-128-gcm\n"
    )
    nn = tmp_path / "nn.yaml"
    nn.write_text("batch_size: 32\nlearning_rate: 0.001\nnum_epochs: 1\n")
    with pytest.raises(ConfigError) as error:
        load_settings(cluster, nn)
    assert error.value.key == "cipher"
    assert "'auto', 'aes-256-gcm' or 'chacha20-poly1305'" in error.value.message


def test_the_config_key_allows_auto_and_exactly_the_protocols_ciphers() -> None:
    assert get_args(value_type(config_fields("cluster")["cipher"])) == (AUTO, *CIPHERS)
