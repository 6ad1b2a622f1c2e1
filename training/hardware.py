"""What the CPU does in hardware: whether it multiplies bfloat16 natively.

Intel Xeons since Sapphire Rapids (AMX-BF16) and AMD since Zen 4 (AVX512-BF16) multiply bf16 in
hardware: there bf16 matmuls run several times faster than fp32 ones (BENCHMARKS.md, "bf16 on
CPUs"). Elsewhere (an AVX2-only CPU such as AMD's Zen 3) torch emulates them, and bf16 is hundreds
of times slower than fp32: `--bf16 true` or `--dtype bfloat16` there is a mistake worth a warning.

The answer is torch's own: `torch.cpu.get_capabilities()`, the CPU flags read by the cpuinfo
library that torch's kernels dispatch on (`lscpu | grep -o 'amx_bf16\\|avx512_bf16'` agrees).
"""

import torch

# The instruction sets that multiply bf16, in the order oneDNN prefers them.
BF16_INSTRUCTIONS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}


def cpu_bf16_instructions():
    """The CPU's bf16 multiply instructions by name ("AMX-BF16"), or None when it has none."""
    capabilities = torch.cpu.get_capabilities()
    return next((name for flag, name in BF16_INSTRUCTIONS.items() if capabilities.get(flag)), None)


def cpu_name():
    return torch.cpu.get_capabilities().get("cpu_name") or "this CPU"


def training_line(mixed_precision):
    """The banner's CPU line: what the CPU does with bf16, and what that means for this run."""
    found, name = cpu_bf16_instructions(), cpu_name()
    if found and mixed_precision == "no":
        return (f"{name} multiplies bf16 in hardware ({found}): --bf16 true trains faster (1.7x fp32, measured "
                "on a Xeon with AMX, BENCHMARKS.md); this run is fp32, Trainer's default")
    if found:
        return f"{name} multiplies bf16 in hardware ({found})"
    if mixed_precision == "bf16":
        return (f"warning: {name} has no bf16 multiply instructions (AMX-BF16, AVX512-BF16), so torch emulates "
                "them: bf16 trains several times slower than fp32 here (bench/cpu_bf16.py); --mixed_precision no")
    return f"{name}: no bf16 multiply instructions, fp32 is the fast choice here"


def serving_note(dtype):
    """The server's startup line about bf16 on this CPU, or None when there is nothing to say."""
    found, name = cpu_bf16_instructions(), cpu_name()
    if dtype == "bfloat16" and not found:
        return (f"{name} has no bf16 multiply instructions (AMX-BF16, AVX512-BF16): torch emulates them, and "
                "bfloat16 serves far slower than float32 here (bench/cpu_bf16.py); --dtype float32 is the fast choice")
    if dtype == "float32" and found:
        return (f"{name} multiplies bf16 in hardware ({found}): --dtype bfloat16 may serve faster; float32 stays "
                "the default until its agreement with float32 is measured on such a CPU (docs/serving.md)")
    return None
