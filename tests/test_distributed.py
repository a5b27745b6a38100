"""Multi-process ZO on torch.distributed (gloo, CPU), real processes started by the test.

Two jobs run concurrently, each rank a `python tests/dist_worker.py` with torchrun's environment:
  - 2 ranks: layouts, data parallel (vs one process on the 2x batch), spread queries, non-finite
    agreement, FSDP2 (33 rows over 2 ranks), then rank 1 dies mid-step;
  - 4 ranks: FSDP2 over 4 (33 rows -> 9, 9, 9, 6; 5 rows -> 2, 2, 1, 0: an empty shard) and HSDP 2x2.
Plus in-process checks that a single process never calls a collective.
"""
from __future__ import annotations

import contextlib
import glob
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import zokernels as Z
from zokernels import distributed as D
from zokernels.log import FineTuneLog

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dist_worker as W  # noqa: E402

JOB_TIMEOUT_S = 300       # whole job; each collective is bounded by the workers' 60 s process-group timeout
JOBS = {"two": (2, "layouts,dp,spread,nonfinite,fsdp,die"), "four": (4, "fsdp,hsdp")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(world: int, scenarios: str, out: str) -> list[tuple[subprocess.Popen, str]]:
    port, procs = _free_port(), []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", ZOK_TEST_TIMEOUT_S="60")
        log = os.path.join(out, f"stderr.rank{r}.txt")
        with open(log, "w") as f:
            procs.append((subprocess.Popen([sys.executable, os.path.join(HERE, "dist_worker.py"), out, scenarios],
                                           env=env, stdout=f, stderr=subprocess.STDOUT), log))
    return procs


def _wait(procs, deadline: float) -> tuple[list[int], list[str]]:
    rcs = []
    for p, _ in procs:
        try:
            rcs.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            pytest.fail(f"a distributed test job hung for {JOB_TIMEOUT_S} s (killed)")
    logs = []
    for _, log in procs:
        with open(log) as f:
            logs.append(f.read())
    return rcs, logs


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    started, t0 = {}, time.monotonic()
    for name, (world, scenarios) in JOBS.items():
        out = str(tmp_path_factory.mktemp(f"dist_{name}"))
        started[name] = (out, world, _start(world, scenarios, out))
    results = {}
    for name, (out, world, procs) in started.items():
        rcs, logs = _wait(procs, t0 + JOB_TIMEOUT_S)
        loaded = {}
        for f in glob.glob(os.path.join(out, "*.pt")):
            scenario, rank = os.path.basename(f)[:-3].split(".rank")
            loaded.setdefault(scenario, {})[int(rank)] = torch.load(f, weights_only=False)
        results[name] = {"world": world, "rcs": rcs, "logs": logs, "res": loaded}
    return results


def _result(jobs, job: str, scenario: str) -> dict[int, dict]:
    j = jobs[job]
    got = j["res"].get(scenario, {})
    if len(got) != j["world"]:
        pytest.fail(f"job {job}: scenario {scenario} has results from ranks {sorted(got)} of {j['world']}; "
                    f"rcs {j['rcs']}; rank logs:\n" + "\n".join(log[-3000:] for log in j["logs"]))
    return got


def _equal_states(a: dict, b: dict) -> list[str]:
    return [n for n in a if not torch.equal(a[n], b[n])]


# ----------------------------------------------------------------------------- single process
@contextlib.contextmanager
def _collectives_forbidden(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a collective was called in a single-process run")
    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "barrier", "reduce_scatter"):
        monkeypatch.setattr(dist, name, boom)
    yield


def _one_step(**kw) -> tuple[torch.nn.Module, "Z.ZOSGD"]:
    model = W.mlp(torch.float32)
    x, y = W.batch(1)
    opt = Z.ZOSGD(model, lr=1e-2, backend=W.BACKEND, **kw)
    before = W.digest(W.full_state(model))
    opt.step(W.closure_for(model, x, y, torch.float32))
    assert W.digest(W.full_state(model)) != before  # the step did something
    return model, opt


def test_single_process_calls_no_collective(monkeypatch):
    assert not dist.is_initialized()
    with _collectives_forbidden(monkeypatch):
        _, opt = _one_step(seed=3)
        assert opt._group is None
    with pytest.raises(ValueError, match="not initialised"):
        Z.ZOSGD(W.mlp(torch.float32), lr=1e-2, backend=W.BACKEND, process_group=object())


def test_world_size_one_calls_no_collective(monkeypatch):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with _collectives_forbidden(monkeypatch):
            _, opt = _one_step()  # seed=None: nothing to broadcast with one rank
            assert opt._group is None
            _, opt = _one_step(spread_queries=True, n_queries=3)
            assert D.assigned_queries(3, opt._group, True) == [0, 1, 2]
    finally:
        dist.destroy_process_group()


def test_spread_queries_refusals():
    with pytest.raises(ValueError, match="inplace"):
        Z.ZOSGD(W.mlp(torch.float32), lr=1e-2, backend=W.BACKEND, probe="inplace", spread_queries=True)
    with pytest.raises(ValueError, match="one_sided"):
        Z.ZOSGD(W.mlp(torch.float32), lr=1e-2, backend=W.BACKEND, one_sided=True, spread_queries=True)


@pytest.mark.parametrize("global_shape, local_shape, ok", [
    ((33, 8), (17, 8), True), ((33, 8), (0, 8), True), ((33,), (16,), True), ((4, 8), (4, 4), False),
    ((1, 4, 8), (1, 2, 8), True), ((2, 4, 8), (2, 2, 8), False), ((4, 8), (2, 4), False),
])
def test_contiguous_block_rule(global_shape, local_shape, ok):
    assert D._contiguous_block(global_shape, local_shape) is ok


# ----------------------------------------------------------------------------- data parallel
DP_TAGS = ("float32_hooks", "bfloat16_hooks", "float32_inplace")


@pytest.mark.parametrize("tag", DP_TAGS)
def test_dp_replicas_bitwise_identical(jobs, tag):
    res = _result(jobs, "two", "dp")
    assert len({res[r][tag]["seed"] for r in res}) == 1  # seed=None: rank 0's was broadcast
    assert len({res[r][tag]["digest"] for r in res}) == 1
    assert len({tuple(res[r][tag]["grads"]) for r in res}) == 1
    assert all(math.isfinite(g) and g != 0 for g in sum(res[0][tag]["grads"], ()))


@pytest.mark.parametrize("tag", DP_TAGS)
def test_dp_matches_single_process_with_w_times_the_batch(jobs, tag):
    r0 = _result(jobs, "two", "dp")[0][tag]
    ref = r0["ref"]
    eps = 1e-3
    # per-rank float32 means vs one float32 mean over the whole batch: each probe loss differs by a few
    # ulps of L, and g = dL / (2 eps) amplifies that to ~ 4 ulp(L) / (2 eps)
    g_tol = 4 * 2.0 ** -23 * max(ref["losses"]) / (2 * eps)
    steps = len(ref["grads"]) if tag.startswith("float32") else 1  # bf16: the first step (later ones fork)
    for s in range(steps):
        for g, gr in zip(r0["grads"][s], ref["grads"][s]):
            assert abs(g - gr) <= g_tol, (s, g, gr, g_tol)
        # step 0 starts from equal weights; later steps from weights a few g_tol * lr apart
        loss_tol = 4 * 2.0 ** -23 if s == 0 else 1e-4
        assert abs(r0["losses"][s] - ref["losses"][s]) <= loss_tol * ref["losses"][s]
    if tag.startswith("float32"):
        worst = max((r0["state"][n] - ref["state"][n]).abs().max().item() for n in ref["state"])
        assert worst < 5e-2 * 5 * g_tol * 5  # lr * steps * g_tol * max|z| (5.77)
    # bitwise once the coefficients are injected: the logged g_q replayed on the base weights
    model = W.mlp(torch.bfloat16 if tag.startswith("bfloat16") else torch.float32)
    Z.replay(model, FineTuneLog.from_state(r0["log"]), backend=W.BACKEND)
    assert _equal_states(W.full_state(model), r0["state"]) == []


def test_spread_queries_gather_every_rank_queries(jobs):
    res = _result(jobs, "two", "spread")
    world, n_queries, steps = 2, 3, 3
    assert len({res[r]["digest"] for r in res}) == 1
    assert [res[r]["forwards"] for r in range(world)] == [2 * len(range(r, n_queries, world)) * steps
                                                         for r in range(world)]
    first = res[0]["grads"][0]
    per_rank = res[0]["per_rank_first_grads"]
    assert [first[q] for q in range(n_queries)] == [per_rank[q % world][q] for q in range(n_queries)]
    log = FineTuneLog.from_state(res[0]["log"])
    assert [r.grads for r in log.steps] == res[1]["grads"]


@pytest.mark.parametrize("probe", ["hooks", "inplace"])
def test_nonfinite_on_one_rank_skips_on_all(jobs, probe):
    res = _result(jobs, "two", "nonfinite")
    for r in res:
        assert res[r][probe]["skipped"] == [False, True, False]
        d = res[r][probe]["digests"]
        assert d[0] != d[2]
        if probe == "hooks":  # drift-free: the skipped step changed nothing (in-place bf16 restores round)
            assert d[1] == d[0]
    assert len({tuple(res[r][probe]["digests"]) for r in res}) == 1


# ----------------------------------------------------------------------------- sharded (FSDP2)
FSDP_RUNS = [("two", "fsdp", t) for t in ("float32_hooks", "bfloat16_hooks", "bfloat16_swap", "float32_inplace")] + \
            [("four", "fsdp", t) for t in ("float32_hooks", "bfloat16_hooks", "bfloat16_swap", "float32_inplace")] + \
            [("four", "hsdp", t) for t in ("bfloat16_hooks", "float32_inplace")]


@pytest.mark.parametrize("job, scenario, tag", FSDP_RUNS)
def test_fsdp_equals_unsharded_bitwise(jobs, job, scenario, tag):
    res = _result(jobs, job, scenario)
    r0 = res[0][tag]
    assert _equal_states(r0["state"], r0["ref"]["state"]) == []
    assert r0["losses"] == r0["ref"]["losses"] and r0["grads"] == r0["ref"]["grads"]
    assert r0["after"] == r0["ref"]["after"]  # a forward after step() reads the updated weights
    assert len({res[r][tag]["digest"] for r in res}) == 1
    assert r0["header_fingerprint_equal"]
    # the sharded run's log replays on the unsharded model
    model = W.mlp(torch.bfloat16 if tag.startswith("bfloat16") else torch.float32)
    Z.replay(model, FineTuneLog.from_state(r0["log"]), backend=W.BACKEND)
    assert _equal_states(W.full_state(model), r0["state"]) == []


def test_fsdp_trajectory_independent_of_rank_count(jobs):
    two, four = _result(jobs, "two", "fsdp")[0], _result(jobs, "four", "fsdp")[0]
    for tag in ("float32_hooks", "bfloat16_hooks"):
        assert _equal_states(two[tag]["state"], four[tag]["state"]) == []


@pytest.mark.parametrize("job, scenario, shard_world", [("two", "fsdp", 2), ("four", "fsdp", 4), ("four", "hsdp", 2)])
def test_fsdp_shard_offsets(jobs, job, scenario, shard_world):
    res = _result(jobs, job, scenario)
    for rank, out in res.items():
        r = rank % shard_world
        for name, rows, row_numel in (("0.weight", 33, 8), ("0.bias", 33, 1), ("2.weight", 5, 33), ("2.bias", 5, 1)):
            chunk = -(-rows // shard_world)
            start, n = min(r * chunk, rows), max(0, min(chunk, rows - r * chunk))
            _, local_shape, offset = out["offsets"][name]
            assert local_shape[0] == n, (rank, name, local_shape)
            assert offset == (start * row_numel if n else 0), (rank, name, offset)
    if job == "four" and scenario == "fsdp":
        assert res[3]["offsets"]["2.weight"][1] == (0, 33)  # an empty shard took part


def test_tensor_parallel_layouts(jobs):
    res = _result(jobs, "two", "layouts")
    assert res[0]["rows"] == (0, (17, 4), True) and res[1]["rows"] == (17 * 4, (16, 4), True)
    assert res[0]["replicate"] == (0, (33, 4)) == res[1]["replicate"]
    for r in res:
        assert "strided" in res[r]["cols"] and "Shard(dim=1)" in res[r]["cols"]


# ----------------------------------------------------------------------------- failures
def test_rank_death_fails_the_job_with_a_clear_error(jobs):
    j = jobs["two"]
    assert j["rcs"] == [17, 3], (j["rcs"], j["logs"])
    line = next((ln for ln in j["logs"][0].splitlines() if ln.startswith("RANK0 RAISED")), None)
    assert line is not None, j["logs"][0][-3000:]
    assert "DistributedStepError" in line and "all-reduce over 2 ranks failed" in line
    seconds = float(line.split("after ")[1].split("s:")[0])
    assert seconds < 60  # an error, not a hang until the timeout
