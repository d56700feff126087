"""The worker of test_pruner's DistributedDataParallel test (a module of its own: spawned processes import it)."""
import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

ROUNDS, STEPS, SHARD = 3, 12, 8  # rounds after the dense one, steps per round, examples per rank per step


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * STEPS * SHARD, 20, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def shard(step: int, rank: int) -> torch.Tensor:
    """The examples rank ``rank`` trains on at ``step`` (rank 0 and rank 1 together: ``shard(s, 0) + shard(s, 1)``)."""
    return torch.arange(SHARD) + SHARD * (2 * step + rank)


@contextlib.contextmanager
def _rank(rank: int, world: int, rendezvous: str):
    """One gloo rank of a worker: the body runs inside; then both ranks meet and the process leaves.

    Done, results saved: it leaves without gloo's teardown. destroy_process_group, or the exit's C++ destructors
    after it, aborted a rank now and then ("terminate called without an active exception": a clean-clone CI run in
    sessions 25 and 26, even with the wrapper dropped and a barrier first; the bf16 worker once in session 33),
    failing a test whose results were already written. os._exit skips that teardown; what the tests check is
    unchanged. A body that raises tears the group down and re-raises (the spawning test sees the error)."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        yield
        dist.barrier()  # both ranks done communicating before either leaves
    except BaseException:
        dist.destroy_process_group()
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    """IMP under DDP: every round the model is wrapped again (a mask change gives the layers new parameters) and
    trained on this rank's shard; rank 0 saves each round's starting and final state, the masks and the paths,
    and whether every rank ended every round with the same parameters."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sparse_lth.optim
    from sparse_lth.layers import sparsify
    from sparse_lth.pruner import MagnitudePruner
    with _rank(rank, world, rendezvous):
        model = sparsify(make_model())
        if rank == 1:  # this rank's automatic path choices contradict rank 0's (as timings either side of a tie
            # can on GPUs): the pruner puts every rank on rank 0's paths, or DDP(model) could not wrap them
            from sparse_lth import layers as L
            real = L._SparseLayer._auto_path

            def contrary(self, backend):
                path, _ = real(self, backend)
                return ("dense", None) if path == "sparse" else ("sparse", L.ALL_SPARSE)

            L._SparseLayer._auto_path = contrary
        pruner = MagnitudePruner(model, fc=0.6)
        pruner.set_rewind_point()
        x, y = data()
        rounds = []
        for r in range(ROUNDS + 1):
            start = {k: v.clone() for k, v in model.state_dict().items()}
            ddp = DDP(model)
            opt = sparse_lth.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            for step in range(STEPS):
                i = shard(step, rank)
                loss = nn.functional.cross_entropy(ddp(x[i]), y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            every = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(every, flat)
            rounds.append(dict(start=start, end={k: v.clone() for k, v in model.state_dict().items()},
                               masks=pruner.masks, percent=pruner.percent_remaining,
                               paths=[m.path for m in model if hasattr(m, "path")],
                               ranks_agree=all(torch.equal(every[0], f) for f in every)))
            if r < ROUNDS:
                pruner.prune_and_rewind()
        del ddp  # nothing may hold the process group when it goes
        if rank == 0:
            torch.save(rounds, out)


def half_worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    """A bf16 model with a pruned layer on the dense path, wrapped in DDP, one step: the layer's gradient mask (int16
    bits, which neither gloo nor NCCL takes) must not be one of the buffers DDP broadcasts."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparse_lth.layers import sparsify
    with _rank(rank, world, rendezvous):
        model = sparsify(make_model(), path="dense").to(torch.bfloat16)
        mask = torch.rand(64, 20, generator=torch.Generator().manual_seed(0)) < 0.5
        model[0].set_mask(mask, path="dense")
        ddp = DDP(model)
        x = torch.randn(4, 20, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
        ddp(x).float().square().mean().backward()
        g = model[0].weight.grad
        ok = bool((g[~mask] == 0).all()) and bool((g[mask] != 0).any())
        flat = torch.tensor([float(ok)])
        dist.all_reduce(flat)
        del ddp  # nothing may hold the process group when it goes
        if rank == 0:
            torch.save({"ok": flat.item() == world}, out)
