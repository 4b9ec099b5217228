"""Tensor parallelism on this CPU: 2 ranks over gloo, each holding half of a tiny Llama's heads
(transformers' tensor-parallel plan), launched here as two processes running
tests/distributed/tp_check.py (the script torchrun runs; same environment variables), bounded by a
timeout. Their reports: the Engine's outputs on 2 ranks equal one process's (greedy, seeded
sampling with n = 2 forks, prefix caching, beam search, chunked prefill, preemption, the step API)
and eager generate; each rank's pool is half the single-process one; PagedCache under
model.generate; planted failures (an exception, a death, a KeyboardInterrupt) surface on the other
rank, named, within seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torch.distributed as dist  # noqa: E402

from kv_paged.integrations import hf  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from local_ranks import start_ranks  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch without gloo"
)

SCRIPT = REPO / "tests" / "distributed" / "tp_check.py"
LAUNCH_TIMEOUT_S = 300
# Two shapes whose KV heads divide by 2: 4 KV heads (as many as query heads), and GQA with 2.
MODELS = {"llama_mha": (4, 4), "llama_gqa": (4, 2)}
ENGINE_RUNS = [
    "greedy",
    "sampled_n2",
    "prefix_cache",
    "beam_search",
    "chunked_prefill",
    "preemption",
    "step_api",
]
RANK0_CHECKS = [
    f"{m}/{c}"
    for m in MODELS
    for c in [
        "pool_bytes_per_rank",
        "greedy_vs_eager_generate",
        "bad_prompt_raises_on_rank0",
        "generate_after_bad_prompt",
        *[f"{r}_vs_single_process" for r in ENGINE_RUNS],
        "prefix_cache_hit",
        "preempted",
        "paged_cache_generate_vs_eager",
        "paged_cache_same_decisions",
        "paged_cache_pool_heads",
    ]
]
RANK1_CHECKS = [
    f"{m}/{c}"
    for m in MODELS
    for c in ["worker_generate_returns_empty", "bad_prompt_raises_on_rank1", "worker_step_refused"]
]


def save_tiny_llama(path: Path, heads: int, kv_heads: int, seed: int = 0) -> None:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=160,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the init: logits far from uniform (no near-ties)
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(path)


def launch(models: list[Path], out: Path, scenario: str | None = None, nproc: int = 2, extra=()):
    """Runs tp_check.py on nproc ranks (torchrun's environment variables); returns
    ({rank: report}, {rank: exit code}). Fails the test if the ranks outlive LAUNCH_TIMEOUT_S."""
    cmd = [sys.executable, str(SCRIPT), "--models", *map(str, models), "--out", str(out)]
    if scenario:
        cmd += ["--scenario", scenario]
    cmd += list(extra)
    log_paths = [out.parent / f"{out.name}.log{rank}" for rank in range(nproc)]
    codes = {}
    with start_ranks(
        cmd, nproc, threads=1, cwd=REPO, store_timeout_s=LAUNCH_TIMEOUT_S, logs=log_paths
    ) as procs:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        try:
            for rank, p in enumerate(procs):
                codes[rank] = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"tp_check.py ranks still running after {LAUNCH_TIMEOUT_S} s: {logs(out)}")
    reports = {}
    for rank in range(nproc):
        path = out if rank == 0 else Path(f"{out}.rank{rank}")
        if path.exists():
            reports[rank] = json.loads(path.read_text())
    return reports, codes


def logs(out: Path) -> str:
    return "\n".join(
        f"--- rank {r} ---\n{(out.parent / f'{out.name}.log{r}').read_text()[-4000:]}"
        for r in range(2)
        if (out.parent / f"{out.name}.log{r}").exists()
    )


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_models")
    dirs = []
    for name, (heads, kv_heads) in MODELS.items():
        save_tiny_llama(root / name, heads, kv_heads)
        dirs.append(root / name)
    return dirs


@pytest.fixture(scope="module")
def checks(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_run") / "report.json"
    reports, codes = launch(model_dirs, out)
    assert codes == {0: 0, 1: 0}, f"exit codes {codes}; reports {reports}\n{logs(out)}"
    return reports


@pytest.mark.parametrize("name", RANK0_CHECKS)
def test_two_ranks_match_one_process(checks, name):
    entry = checks[0].get(name)
    assert entry is not None, f"rank 0 did not report {name!r}; it reported {sorted(checks[0])}"
    assert entry["ok"], f"{name}: {entry['detail']}"


@pytest.mark.parametrize("name", RANK1_CHECKS)
def test_worker_rank(checks, name):
    entry = checks[1].get(name)
    assert entry is not None, f"rank 1 did not report {name!r}; it reported {sorted(checks[1])}"
    assert entry["ok"], f"{name}: {entry['detail']}"


def _ended(report: dict, rank: int) -> dict:
    return json.loads(report[f"rank{rank}"]["detail"])


@pytest.mark.parametrize(
    "scenario, victim", [("worker-raises", 1), ("driver-raises", 0), ("worker-dies", 1)]
)
def test_a_failed_rank_is_named_on_the_others(model_dirs, tmp_path, scenario, victim):
    reports, codes = launch(model_dirs[1:], tmp_path / "report.json", scenario=scenario)
    out = tmp_path / "report.json"
    survivors = [r for r in (0, 1) if not (scenario == "worker-dies" and r == victim)]
    for rank in survivors:
        assert codes[rank] == 0, f"rank {rank} exit {codes[rank]}\n{logs(out)}"
        ended = _ended(reports[rank], rank)
        assert ended["ended"].startswith("RuntimeError"), ended
        assert ended["closed"], ended
        assert ended["seconds"] < 30, ended  # failed promptly, not at a timeout
        if scenario == "worker-dies":
            assert f"rank {victim} reported nothing (it died" in ended["ended"], ended
        else:
            assert (
                f"rank {victim}: RuntimeError: planted failure on rank {victim}" in ended["ended"]
            )
        after = reports[rank][f"rank{rank}_after"]["detail"]
        assert "the Engine is closed (its tensor-parallel group broke" in after, after
    if scenario == "worker-dies":
        assert codes[victim] == 3


@pytest.mark.parametrize("scenario, victim", [("worker-interrupted", 1), ("driver-interrupted", 0)])
def test_an_interrupted_rank_raises_it_and_releases_the_others(
    model_dirs, tmp_path, scenario, victim
):
    """A KeyboardInterrupt (a BaseException, not an Exception) mid-generate on one rank: that rank
    raises it as is, with its Engine closed and nothing held; the other rank fails promptly, naming
    the interrupted rank."""
    out = tmp_path / "report.json"
    reports, codes = launch(model_dirs[1:], out, scenario=scenario)
    assert codes == {0: 0, 1: 0}, f"exit codes {codes}\n{logs(out)}"
    mine = _ended(reports[victim], victim)
    assert mine["ended"].startswith("KeyboardInterrupt"), mine
    assert mine["closed"] and mine["requests"] == 0 and mine["blocks_in_use"] == 0, mine
    after = reports[victim][f"rank{victim}_after"]["detail"]
    assert "the Engine is closed (its tensor-parallel group broke" in after, after
    other = 1 - victim
    theirs = _ended(reports[other], other)
    assert theirs["ended"].startswith("RuntimeError"), theirs
    assert f"rank {victim}: KeyboardInterrupt" in theirs["ended"], theirs
    assert theirs["closed"] and theirs["requests"] == 0 and theirs["blocks_in_use"] == 0, theirs
    assert theirs["seconds"] < 30, theirs  # released promptly, not at a timeout


def test_kv_heads_a_degree_does_not_divide_are_refused():
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    model._tp_size = 4  # what transformers sets on a model sharded 4 ways
    with pytest.raises(ValueError, match="2 KV heads, which a tensor-parallel degree of 4"):
        hf.kv_cache_spec(model)
    model._tp_size = 2
    assert hf.kv_cache_spec(model)["num_kv_heads"] == [1]


def test_a_failed_rank_that_lives_on_fails_the_others_at_the_timeout(model_dirs, tmp_path):
    """gloo has no abort: while the failed rank's process lives, the rank waiting on it in a
    collective fails at the process group's timeout (here 6 s), with the failed rank's report."""
    out = tmp_path / "report.json"
    reports, codes = launch(
        model_dirs[1:], out, scenario="worker-raises-lives", extra=["--timeout", "6"]
    )
    assert codes == {0: 0, 1: 0}, f"exit codes {codes}\n{logs(out)}"
    ended = _ended(reports[0], 0)
    assert ended["ended"].startswith("RuntimeError"), ended
    assert "rank 1: RuntimeError: planted failure on rank 1" in ended["ended"], ended
    assert 5 < ended["seconds"] < 15, ended
