"""Lottery tickets with a training loop of your own: IMP on LeNet-300-100 and MNIST with sparse_lth.pruner.

The training loop below is plain PyTorch (a DataLoader, cross-entropy, an optimizer); sparse-lth contributes the
sparse layers (`sparsify`), the pruning and rewinding between rounds (`MagnitudePruner`) and optimizers that keep
pruned weights at zero (`sparse_lth.optim`). Swap in your own model, data and loop.

    python examples/imp_in_your_loop.py --data ../shared/data                # 12 rounds of 1,000 iterations, under a minute
    python examples/imp_in_your_loop.py --data ../shared/data --rounds 10 --iterations 3000 --csv rounds.csv

Each round prints the weights remaining, the test accuracy at the end of the round, and the time a training step
took; it keeps to one CPU thread unless told otherwise (--threads).
"""
import argparse
import csv
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparse_lth.optim
from sparse_lth.data import load_dataset
from sparse_lth.layers import sparsify
from sparse_lth.pruner import MagnitudePruner


def lenet300_100() -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                          nn.Linear(100, 10))
    model.output_layer = "5"  # not needed here (the last Linear is the output layer by default); shown for yours
    return model


def batches(loader: DataLoader):
    while True:  # as many iterations as asked, epoch after epoch
        yield from loader


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(1000), y.split(1000)))
    model.train()
    return correct / len(y)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="folder with MNIST/raw/*.gz (default $SPARSE_LTH_DATA)")
    ap.add_argument("--rounds", type=int, default=12, help="pruning rounds after the dense round (default 12)")
    ap.add_argument("--iterations", type=int, default=1000, help="training iterations per round (default 1000)")
    ap.add_argument("--batch-size", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1.2e-3)
    ap.add_argument("--prune", type=float, default=0.2, help="fraction of surviving fc weights pruned per round "
                    "(the output layer at half of it)")
    ap.add_argument("--train-limit", type=int, default=None, help="use the first N training images only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda, cuda:1, ... (default: cuda when there is a GPU)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", default=None, help="also write the table to this CSV file")
    args = ap.parse_args(argv)
    if args.rounds < 0 or args.iterations < 1:
        ap.error("--rounds must be >= 0 and --iterations >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this machine has no CUDA GPU (use --device cpu)")
    train = load_dataset("mnist", "train", root=args.data, limit=args.train_limit)
    test = load_dataset("mnist", "test", root=args.data, device=device)
    loader = DataLoader(TensorDataset(train.x, train.y), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    if len(loader) == 0:  # batches() would wait forever for a batch
        ap.error(f"{len(train.y)} training images make no batch of --batch-size {args.batch_size}")

    model = sparsify(lenet300_100().to(device))    # every nn.Linear -> SparseLinear, same outputs
    pruner = MagnitudePruner(model, fc=args.prune)  # output layer: args.prune / 2
    pruner.set_rewind_point()                      # θ0: the lottery ticket's starting weights
    print(f"{pruner}; weights remaining per round: "
          + ", ".join(f"{p:.3g}%" for p in pruner.schedule(args.rounds)))
    print(f"{'round':>5} {'% left':>8} {'test acc':>9} {'ms/step':>8}  paths")
    rows = []
    for r in range(args.rounds + 1):
        optimizer = sparse_lth.optim.Adam(model.parameters(), lr=args.lr)  # new masks, new parameters: new optimizer
        data = batches(loader)
        start = time.perf_counter()
        for _ in range(args.iterations):
            x, y = (t.to(device, non_blocking=True) for t in next(data))
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ms = 1000 * (time.perf_counter() - start) / args.iterations
        acc = accuracy(model, test.x, test.y)
        paths = "/".join(m.path[0] for m in model.modules() if hasattr(m, "set_mask"))  # d(ense) or s(parse)
        rows.append(dict(round=r, percent_remaining=round(pruner.percent_remaining, 3), test_acc=acc,
                         ms_per_step=round(ms, 3), paths=paths))
        print(f"{r:>5} {pruner.percent_remaining:>8.2f} {100 * acc:>9.2f} {ms:>8.2f}  {paths}", flush=True)
        if r < args.rounds:
            pruner.prune_and_rewind()  # prune the smallest survivors, reset the rest to θ0
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
