"""setup.py's choice of CUDA architectures: the user's TORCH_CUDA_ARCH_LIST (anything below sm_80
refused by name, before nvcc fails on cp.async / ldmatrix / bf16 mma), else the visible GPUs', else
a default that needs no GPU (torch's own detection raises without one)."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

SETUP = pathlib.Path(__file__).resolve().parent.parent / "setup.py"


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("kv_paged_setup", SETUP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() does not run
    return module


def test_no_gpu_no_list_builds_the_default(setup_module):
    assert setup_module.cuda_arch_list({}, []) == "8.0+PTX;9.0a"
    assert setup_module.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "  "}, []) == "8.0+PTX;9.0a"


@pytest.mark.parametrize("given", ["9.0a", "8.0;9.0a", "8.6 9.0", "8.0,8.9+PTX", "10.0a", "12.0"])
def test_supported_lists_are_kept(setup_module, given):
    assert setup_module.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": given}, [(7, 5)]) == given


@pytest.mark.parametrize(
    "given, bad", [("7.5", "7.5"), ("8.0;7.0+PTX", "7.0+PTX"), ("6.1 9.0", "6.1")]
)
def test_old_archs_are_refused_by_name(setup_module, given, bad):
    with pytest.raises(RuntimeError, match=rf"TORCH_CUDA_ARCH_LIST has {re.escape(bad)}: .* sm_80"):
        setup_module.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": given}, [])


def test_unreadable_entry_is_named(setup_module):
    with pytest.raises(RuntimeError, match="cannot read the entry 'Ampere'"):
        setup_module.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "Ampere"}, [])


def test_visible_gpus_decide_without_a_list(setup_module):
    assert setup_module.cuda_arch_list({}, [(9, 0), (9, 0)]) == "9.0"
    assert setup_module.cuda_arch_list({}, [(8, 0), (9, 0)]) == "8.0;9.0"
    with pytest.raises(RuntimeError, match="compute capability 7.5"):
        setup_module.cuda_arch_list({}, [(7, 5)])
