"""One rank of the multi-process tests in test_distributed.py (gloo on CPU).

Run as `python tests/dist_worker.py OUTDIR SCENARIO[,SCENARIO...]` with torchrun's environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Each scenario saves `OUTDIR/<scenario>.rank<r>.pt`
(tensors and numbers only); the test process compares them. References that need a single process
run on rank 0 with a group of size 1 (so ZOSGD uses no collective) under the same thread settings.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import zokernels as Z  # noqa: E402
from zokernels import distributed as D  # noqa: E402

BACKEND = "reference"
TIMEOUT_S = float(os.environ.get("ZOK_TEST_TIMEOUT_S", "60"))


def mlp(dtype: torch.dtype, hidden: int = 33) -> nn.Module:
    """Linear(8, 33) -> tanh -> Linear(33, 5): 33 rows shard unevenly over 2 and 4 ranks, 5 rows
    leave rank 3 of 4 an empty shard."""
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 5)).to(dtype)


def batch(seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def closure_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype):
    return lambda: F.cross_entropy(model(x.to(dtype)).float(), y)


def train(model, x, y, dtype, steps, group=None, **kw) -> tuple[list[float], "Z.ZOSGD"]:
    kw = {"lr": 5e-2, "eps": 1e-3, "n_queries": 2, "seed": 2024, "weight_decay": 0.01, **kw}
    opt = Z.ZOSGD(model, backend=BACKEND, process_group=group, **kw)
    closure = closure_for(model, x, y, dtype)
    losses = [float(opt.step(closure)) for _ in range(steps)]
    return losses, opt


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if D.is_dtensor(p) else p
        out[n] = t.detach().clone()
    return out


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for n in sorted(state):
        t = state[n].contiguous()
        h.update(n.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bfloat16
                 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def grads_of(opt) -> list[tuple[float, ...]]:
    return [r.grads for r in opt.log.steps]


# ----------------------------------------------------------------------------- scenarios
def scenario_dp(rank: int, world: int, solo) -> dict:
    """Data parallel: own micro-batch per rank, seed=None (rank 0's is broadcast). Rank 0 also trains
    one process on the concatenated W-times larger batch with the same seed."""
    out = {}
    for dtype, probe in ((torch.float32, "hooks"), (torch.bfloat16, "hooks"), (torch.float32, "inplace")):
        tag = f"{str(dtype).split('.')[-1]}_{probe}"
        model = mlp(dtype)
        base = full_state(model)
        x, y = batch(100 + rank)
        opt = Z.ZOSGD(model, lr=5e-2, eps=1e-3, n_queries=2, weight_decay=0.01, backend=BACKEND, probe=probe)
        closure = closure_for(model, x, y, dtype)
        losses = [float(opt.step(closure)) for _ in range(5)]
        state = full_state(model)
        out[tag] = {"digest": digest(state), "losses": losses, "grads": grads_of(opt), "seed": opt.base_seed}
        if rank == 0:
            out[tag]["state"] = state
            out[tag]["base"] = base
            out[tag]["log"] = opt.log.state()
            xs, ys = zip(*(batch(100 + r) for r in range(world)))
            ref = mlp(dtype)
            ref_losses, ref_opt = train(ref, torch.cat(xs), torch.cat(ys), dtype, 5, group=solo,
                                        seed=opt.base_seed, probe=probe)
            out[tag]["ref"] = {"losses": ref_losses, "grads": grads_of(ref_opt), "state": full_state(ref)}
    return out


def scenario_spread(rank: int, world: int, solo) -> dict:
    """AdaZeta-style: 2W - 1 queries spread over the ranks (rank r: q = r, r + W, ...)."""
    model = mlp(torch.float32)
    x, y = batch(200 + rank)
    n_queries = 2 * world - 1
    calls = []
    opt = Z.ZOSGD(model, lr=5e-2, eps=1e-3, n_queries=n_queries, seed=77, backend=BACKEND,
                  spread_queries=True)
    closure = closure_for(model, x, y, torch.float32)

    def counted():
        calls.append(1)
        return closure()
    losses = [float(opt.step(counted)) for _ in range(3)]
    out = {"digest": digest(full_state(model)), "losses": losses, "grads": grads_of(opt), "forwards": len(calls)}
    if rank == 0:
        out["log"] = opt.log.state()
    # rank r's query q, evaluated alone on rank r's batch (same weights, same seed), gives the same g_q
    if rank == 0:
        xs, ys = zip(*(batch(200 + r) for r in range(world)))
        per_rank = []
        for r in range(world):
            m = mlp(torch.float32)
            o = Z.ZOSGD(m, lr=5e-2, eps=1e-3, n_queries=n_queries, seed=77, backend=BACKEND, process_group=solo)
            o.step(closure_for(m, xs[r], ys[r], torch.float32))
            per_rank.append(o.log.steps[0].grads)
        out["per_rank_first_grads"] = per_rank
    return out


def _fsdp_model(dtype, mesh):
    from torch.distributed.fsdp import fully_shard
    model = mlp(dtype)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root owns model[2]: FSDP2 keeps root params unsharded after forward
    return model


FSDP_CASES = ((torch.float32, "hooks"), (torch.bfloat16, "hooks"), (torch.bfloat16, "swap"),
              (torch.float32, "inplace"))


def scenario_fsdp(rank: int, world: int, solo, mesh_shape=None, cases=FSDP_CASES) -> dict:
    """FSDP2 with the same data on every rank equals the unsharded single-process run bitwise."""
    from torch.distributed.device_mesh import init_device_mesh
    shape = mesh_shape or (world,)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard")[-len(shape):])
    out = {"offsets": {}}
    x, y = batch(7)
    for dtype, probe in cases:
        tag = f"{str(dtype).split('.')[-1]}_{probe}"
        model = _fsdp_model(dtype, mesh)
        with torch.no_grad():  # an eval forward first: FSDP2 leaves the root unsharded after it
            model(x.to(dtype))
        losses, opt = train(model, x, y, dtype, 4, probe=probe)
        for n, p in model.named_parameters():
            out["offsets"][n] = (repr(p.placements), tuple(p._local_tensor.shape),
                                 opt._table.offsets[opt._names.index(n)])
        state = full_state(model)
        # a forward after step() must see the updated (not a stale perturbed) full weights
        with torch.no_grad():
            after = float(closure_for(model, x, y, dtype)())
        out[tag] = {"losses": losses, "grads": grads_of(opt), "digest": digest(state), "after": after}
        if rank == 0:
            out[tag]["state"] = state
            out[tag]["log"] = opt.log.state()
            ref = mlp(dtype)
            ref_losses, ref_opt = train(ref, x, y, dtype, 4, group=solo, probe=probe)
            with torch.no_grad():
                ref_after = float(closure_for(ref, x, y, dtype)())
            out[tag]["ref"] = {"losses": ref_losses, "grads": grads_of(ref_opt), "state": full_state(ref),
                               "after": ref_after}
            out[tag]["header_fingerprint_equal"] = (opt.log.header["base_fingerprint"]
                                                    == ref_opt.log.header["base_fingerprint"])
    return out


def scenario_hsdp(rank: int, world: int, solo) -> dict:
    """2 x 2 mesh (replicate x shard): 33 rows over a shard group of 2, placements (Replicate, Shard(0))."""
    return scenario_fsdp(rank, world, solo, mesh_shape=(world // 2, 2), cases=FSDP_CASES[1:2] + FSDP_CASES[3:])


def scenario_nonfinite(rank: int, world: int, solo) -> dict:
    """Rank 1's loss is NaN in step 1 only: every rank skips that step (weights unchanged everywhere)."""
    out = {}
    for probe in ("hooks", "inplace"):
        model = mlp(torch.bfloat16)
        x, y = batch(400 + rank)
        opt = Z.ZOSGD(model, lr=5e-2, seed=5, backend=BACKEND, probe=probe)
        closure = closure_for(model, x, y, torch.bfloat16)
        states = []
        for step in range(3):
            bad = rank == 1 and step == 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step((lambda: torch.tensor(float("nan"))) if bad else closure)
            states.append(digest(full_state(model)))
        out[probe] = {"digests": states, "skipped": [r.skipped for r in opt.log.steps]}
    return out


def scenario_layouts(rank: int, world: int, solo) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(33 * 4, dtype=torch.float32).reshape(33, 4)
    out = {}
    rows = distribute_tensor(full, mesh, [Shard(0)])
    local, off = D.local_shard("rows", rows)
    out["rows"] = (off, tuple(local.shape), bool(torch.equal(local.reshape(-1), full.reshape(-1)[off:off + local.numel()])))
    rep = distribute_tensor(full, mesh, [Replicate()])
    local, off = D.local_shard("rep", rep)
    out["replicate"] = (off, tuple(local.shape))
    cols = distribute_tensor(torch.zeros(4, 8), mesh, [Shard(1)])
    try:
        D.local_shard("cols", cols)
        out["cols"] = "accepted"
    except D.UnsupportedLayout as err:
        out["cols"] = str(err)
    return out


def scenario_die(rank: int, world: int, solo) -> dict:
    """Rank world-1 dies inside its second step's closure; the others must fail with a clear error."""
    model = mlp(torch.float32)
    x, y = batch(300 + rank)
    opt = Z.ZOSGD(model, lr=1e-2, backend=BACKEND)
    closure = closure_for(model, x, y, torch.float32)
    opt.step(closure)
    calls = []

    def dying():
        calls.append(1)
        if rank == world - 1 and len(calls) == 2:
            os._exit(3)
        return closure()
    t0 = time.monotonic()
    try:
        opt.step(dying)
    except Exception as err:  # noqa: BLE001 - reported to the test
        print(f"RANK{rank} RAISED after {time.monotonic() - t0:.1f}s: {type(err).__name__}: {err}",
              file=sys.stderr, flush=True)
        os._exit(17)
    return {"unexpected": "step returned"}


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def main() -> None:
    out_dir, names = sys.argv[1], sys.argv[2].split(",")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    rank, world = dist.get_rank(), dist.get_world_size()
    solo = dist.new_group([0])  # every rank joins new_group; only rank 0 uses it (size 1: no collectives)
    for name in names:
        t0 = time.monotonic()
        result = SCENARIOS[name](rank, world, solo)
        result["seconds"] = time.monotonic() - t0
        torch.save(result, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
