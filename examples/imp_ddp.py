"""Lottery tickets with DistributedDataParallel: IMP on LeNet-300-100 and MNIST, one process per GPU (or CPU).

The loop of `imp_in_your_loop.py`, data-parallel. What DDP adds to IMP is one rule: a mask change gives the
pruned layers new parameters, so the model is wrapped in DDP again (and the optimizer built again) every round.
Every rank runs the same `MagnitudePruner` on the same synchronized weights, so all ranks compute the same masks
with no communication.

    python examples/imp_ddp.py --data ../shared/data --procs 2                    # two CPU processes (gloo)
    torchrun --nproc_per_node 8 examples/imp_ddp.py --data ../shared/data          # eight GPUs (nccl)

Each rank trains on its own part of every epoch (DistributedSampler), --batch-size examples per step; rank 0
prints each round's weights remaining and test accuracy and checks that every rank holds the same weights.
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imp_in_your_loop import accuracy, lenet300_100  # noqa: E402

import sparse_lth.optim  # noqa: E402
from sparse_lth.data import load_dataset  # noqa: E402
from sparse_lth.layers import sparsify  # noqa: E402
from sparse_lth.pruner import MagnitudePruner  # noqa: E402


def same_on_every_rank(model: nn.Module) -> bool:
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def run(rank: int, world: int, args) -> list[dict]:
    """One rank's IMP: returns the rows rank 0 printed (every rank returns them)."""
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the same θ0 on every rank (DDP would broadcast rank 0's anyway)
    train = load_dataset("mnist", "train", root=args.data, limit=args.train_limit)
    test = load_dataset("mnist", "test", root=args.data, device=device, limit=args.test_limit)
    sampler = DistributedSampler(TensorDataset(train.x, train.y), num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    loader = DataLoader(TensorDataset(train.x, train.y), batch_size=args.batch_size, sampler=sampler,
                        drop_last=True)
    if len(loader) == 0:  # the loop below would wait forever for a batch; every rank's shard is as large
        raise ValueError(f"{len(sampler)} training images per rank make no batch of --batch-size {args.batch_size}")

    model = sparsify(lenet300_100().to(device))
    pruner = MagnitudePruner(model, fc=args.prune)
    pruner.set_rewind_point()
    rows = []
    if rank == 0:
        print(f"{world} processes on {device.type}; weights remaining per round: "
              + ", ".join(f"{p:.3g}%" for p in pruner.schedule(args.rounds)), flush=True)
        print(f"{'round':>5} {'% left':>8} {'test acc':>9} {'ms/step':>8}  ranks agree", flush=True)
    for r in range(args.rounds + 1):
        ddp = DDP(model, device_ids=[device.index] if cuda else None)  # new parameters: wrap again
        optimizer = sparse_lth.optim.Adam(ddp.parameters(), lr=args.lr)
        step, epoch, start = 0, 0, time.perf_counter()
        while step < args.iterations:
            sampler.set_epoch(r * 10_000 + epoch)
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = nn.functional.cross_entropy(ddp(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if step == args.iterations:
                    break
            epoch += 1
        if cuda:
            torch.cuda.synchronize(device)
        ms = 1000 * (time.perf_counter() - start) / args.iterations
        agree = same_on_every_rank(model)
        acc = accuracy(model, test.x, test.y)
        rows.append(dict(round=r, percent_remaining=pruner.percent_remaining, test_acc=acc, ms_per_step=ms,
                         ranks_agree=agree))
        if rank == 0:
            print(f"{r:>5} {pruner.percent_remaining:>8.2f} {100 * acc:>9.2f} {ms:>8.2f}  {agree}", flush=True)
        if r < args.rounds:
            pruner.prune_and_rewind()  # the same masks on every rank: the weights are the same
        del ddp
    dist.barrier()  # every rank done communicating before any tears its process group down
    return rows


def _spawned(rank: int, world: int, args, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _main_of_rank(rank, world, args)


def _main_of_rank(rank: int, world: int, args) -> list[dict]:
    cuda = torch.cuda.is_available() and not args.cpu
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        rows = run(rank, world, args)
    finally:
        dist.destroy_process_group()
    if not all(row["ranks_agree"] for row in rows):
        raise RuntimeError(f"rank {rank}: the ranks' weights differ after a round")
    return rows


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="folder with MNIST/raw/*.gz (default $SPARSE_LTH_DATA)")
    ap.add_argument("--procs", type=int, default=2, help="processes to spawn when not started by torchrun")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=500, help="training iterations per round")
    ap.add_argument("--batch-size", type=int, default=30, help="examples per step on each rank")
    ap.add_argument("--lr", type=float, default=1.2e-3)
    ap.add_argument("--prune", type=float, default=0.2)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (gloo) even where there are GPUs")
    args = ap.parse_args(argv)
    if args.rounds < 0 or args.iterations < 1 or args.procs < 1:
        ap.error("--rounds must be >= 0, --iterations and --procs >= 1")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: this process is one rank
        _main_of_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return 0
    import socket
    with socket.socket() as s:  # a free port for the processes to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.procs, args, port), nprocs=args.procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
