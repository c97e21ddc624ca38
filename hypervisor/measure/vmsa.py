"""The initial VMSA page of each vCPU of a QEMU/KVM SEV-ES or SEV-SNP guest.

KVM builds each VMSA from the vCPU's reset state (QEMU sets it, x86 reset values) when QEMU
finishes the launch, and the AMD firmware measures it: so the launch digest depends on the CPU
model (CPUID 1 EAX, the signature, sits in RDX at reset) and on the SEV features QEMU asks for.
Offsets are those of the SEV-ES save area (AMD APM vol. 2, table B-4; Linux
``struct sev_es_save_area``); every field not written here is zero.
"""

from __future__ import annotations

import struct

from hypervisor.measure.errors import MeasureError

PAGE = 4096
BSP_RESET_EIP = 0xFFFFFFF0

# (family, model, stepping) of QEMU's named AMD models, as ``query-cpu-model-expansion`` reports
# them on QEMU 11.1 (an integration test checks every EPYC name QEMU lists against this table).
_EPYC = (23, 1, 2)
_ROME = (23, 49, 0)
_MILAN = (25, 1, 1)
_GENOA = (25, 17, 0)
_TURIN = (26, 0, 0)
CPU_MODELS: dict[str, tuple[int, int, int]] = {
    **{n: _EPYC for n in ("EPYC", "EPYC-IBPB", "EPYC-v1", "EPYC-v2", "EPYC-v3", "EPYC-v4",
                          "EPYC-v5")},
    **{n: _ROME for n in ("EPYC-Rome", *(f"EPYC-Rome-v{i}" for i in range(1, 6)))},
    **{n: _MILAN for n in ("EPYC-Milan", *(f"EPYC-Milan-v{i}" for i in range(1, 5)))},
    **{n: _GENOA for n in ("EPYC-Genoa", *(f"EPYC-Genoa-v{i}" for i in range(1, 4)))},
    **{n: _TURIN for n in ("EPYC-Turin", "EPYC-Turin-v1", "EPYC-Turin-v2")},
}

# SEV_FEATURES bits (VMSA offset 0x3B0).
SEV_FEATURE_SNP_ACTIVE = 0x1


def cpuid_signature(family: int, model: int, stepping: int) -> int:
    """CPUID Fn0000_0001 EAX: stepping, model, family with their extended parts."""
    if not (0 <= family <= 0xFF + 0xF and 0 <= model <= 0xFF and 0 <= stepping <= 0xF):
        raise ValueError(f"impossible family/model/stepping {family}/{model}/{stepping}")
    base_family = min(family, 0xF)
    ext_family = family - 0xF if family > 0xF else 0
    return ((ext_family << 20) | ((model >> 4) << 16) | (base_family << 8)
            | ((model & 0xF) << 4) | stepping)


def model_signature(cpu_model: str | None) -> int:
    """The signature QEMU gives a named CPU model; MeasureError for anything else."""
    if cpu_model is None or cpu_model not in CPU_MODELS:
        shown = "none" if cpu_model is None else repr(cpu_model)
        extra = (" (host: the signature is the host CPU's; name a model so the measurement "
                 "does not depend on the machine)") if cpu_model == "host" else ""
        raise MeasureError(f"CPU model {shown} has no known signature{extra}; known: "
                           f"{', '.join(sorted(CPU_MODELS))}")
    return cpuid_signature(*CPU_MODELS[cpu_model])


# (offset, format, value) of the non-zero reset fields; segments are (selector, attrib,
# limit, base) at 16-byte strides: es cs ss ds fs gs gdtr ldtr idtr tr.
_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr")
_SEG = struct.Struct("<HHIQ")
_ATTRIB = {"es": 0x93, "cs": 0x9B, "ss": 0x93, "ds": 0x93, "fs": 0x93, "gs": 0x93,
           "gdtr": 0, "ldtr": 0x82, "idtr": 0, "tr": 0x8B}
EFER, CR4, CR0, DR7, DR6, RFLAGS, RIP = 0xD0, 0x148, 0x158, 0x160, 0x168, 0x170, 0x178
G_PAT, RDX, SEV_FEATURES, XCR0, MXCSR, X87_FCW = 0x268, 0x310, 0x3B0, 0x3E8, 0x408, 0x410


def vmsa_page(eip: int, signature: int, sev_features: int) -> bytes:
    """One vCPU's VMSA as measured: reset state starting at ``eip``."""
    page = bytearray(PAGE)
    for index, name in enumerate(_SEGMENTS):
        selector, base = (0xF000, eip & 0xFFFF0000) if name == "cs" else (0, 0)
        _SEG.pack_into(page, index * _SEG.size, selector, _ATTRIB[name], 0xFFFF, base)
    for offset, fmt, value in (
        (EFER, "<Q", 0x1000),  # SVME: KVM sets it for the guest
        (CR4, "<Q", 0x40),  # MCE
        (CR0, "<Q", 0x10),  # ET
        (DR7, "<Q", 0x400),
        (DR6, "<Q", 0xFFFF0FF0),
        (RFLAGS, "<Q", 0x2),
        (RIP, "<Q", eip & 0xFFFF),
        (G_PAT, "<Q", 0x0007040600070406),  # PAT reset value
        (RDX, "<Q", signature),
        (SEV_FEATURES, "<Q", sev_features),
        (XCR0, "<Q", 0x1),
        (MXCSR, "<I", 0x1F80),
        (X87_FCW, "<H", 0x37F),
    ):
        struct.pack_into(fmt, page, offset, value)
    return bytes(page)


def vmsa_pages(vcpus: int, ap_eip: int, signature: int, sev_features: int) -> list[bytes]:
    """The BSP's VMSA (reset vector) then one per AP (the firmware's SEV-ES reset block)."""
    if vcpus < 1:
        raise MeasureError(f"vcpus must be >= 1, got {vcpus}")
    bsp = vmsa_page(BSP_RESET_EIP, signature, sev_features)
    ap = vmsa_page(ap_eip, signature, sev_features)
    return [bsp] + [ap] * (vcpus - 1)
