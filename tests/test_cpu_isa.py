"""The CPU attention kernels' run-time instruction-set choice (csrc/cpu/isa.cpp): AVX-512 exactly
when this CPU has AVX-512F/BW/VL/DQ, AVX2 otherwise or when KV_PAGED_CPU_ISA=avx2 forces it, and the
two paths agree. On an AVX-512 machine the rest of the attention tests run the AVX-512 path; this
file also runs the forced AVX2 path there and compares.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import kv_paged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Writes paged_attention outputs for a seeded paged batch (GQA, bf16 and fp32, a partly filled last
# block) to the file named by argv[1].
SCRIPT = r"""
import sys, torch, kv_paged
from kv_paged import ops
g = torch.Generator().manual_seed(0)
outs = {"isa": kv_paged._C.cpu_isa()}
for dtype in (torch.float32, torch.bfloat16):
    B, H, KVH, D, bs = 3, 8, 2, 128, 16
    lens = torch.tensor([37, 16, 70], dtype=torch.int32)
    nb = 16
    k = torch.randn(nb, bs, KVH, D, generator=g).to(dtype)
    v = torch.randn(nb, bs, KVH, D, generator=g).to(dtype)
    tables = torch.randperm(nb, generator=g, dtype=torch.int32)[:15].view(B, 5)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    cu = torch.arange(B + 1, dtype=torch.int32)
    outs[str(dtype)] = ops.paged_attention(q, k, v, tables, cu, lens).float()
torch.save(outs, sys.argv[1])
"""


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_isa_is_avx512_exactly_when_the_cpu_has_it():
    want = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu_flags()
    forced = os.environ.get("KV_PAGED_CPU_ISA") == "avx2"
    assert kv_paged._C.cpu_isa() == ("avx512" if want and not forced else "avx2")


def run(tmp_path, env_isa: str | None) -> dict:
    env = dict(os.environ)
    env.pop("KV_PAGED_CPU_ISA", None)
    if env_isa:
        env["KV_PAGED_CPU_ISA"] = env_isa
    out = tmp_path / f"out_{env_isa}.pt"
    subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, cwd=ROOT, check=True)
    return torch.load(out)


def test_forced_avx2_and_the_default_path_agree(tmp_path):
    forced = run(tmp_path, "avx2")
    default = run(tmp_path, None)
    assert forced["isa"] == "avx2"
    assert default["isa"] == kv_paged._C.cpu_isa() or "KV_PAGED_CPU_ISA" in os.environ
    for dtype in ("torch.float32", "torch.bfloat16"):
        a, b = forced[dtype], default[dtype]
        assert torch.isfinite(a).all()
        # fp32 accumulation in both; only the summation order of 8- vs 16-wide lanes differs
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
