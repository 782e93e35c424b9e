"""The smallest complete TVLARS run: a small CNN on scikit-learn's digits, one process, CPU.

    python launch/quickstart_digits.py --epochs 30

Shows the direct way in: build ``tvlars_scale.TVLARS`` from the model's parameters and call
``step()``; no scheduler (TVLARS decays its own factor phi(t), described over the run's
``total_steps``, so the same arguments give the same phi at any batch size).
"""

from __future__ import annotations

import argparse
import math

import torch
from sklearn.datasets import load_digits
from torch import nn
from tqdm import tqdm

import tvlars_scale


def digits_tensors(seed: int):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 16, 10),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=30, help="passes over the 1,500 training images"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="batch size")
    parser.add_argument("--lr", type=float, default=4.0, help="TVLARS target learning rate")
    parser.add_argument(
        "--final-factor", type=float, default=0.05, help="TVLARS factor phi at the last step"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = digits_tensors(args.seed)
    model = small_cnn()
    total_steps = args.epochs * math.ceil(len(y_train) / args.batch_size)
    schedule = tvlars_scale.TVLARSSchedule(total_steps, final_factor=args.final_factor)
    optimizer = tvlars_scale.TVLARS(
        model.parameters(), lr=args.lr, total_steps=total_steps, final_factor=args.final_factor
    )
    loss_fn = nn.CrossEntropyLoss()

    progress = tqdm(range(args.epochs), desc="TVLARS digits")
    for _epoch in progress:
        model.train()
        for batch in torch.randperm(len(y_train)).split(args.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
        phi = schedule(optimizer.param_groups[0]["step"].item())
        progress.set_postfix(loss=f"{loss.item():.3f}", phi=f"{phi:.3f}")

    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"test accuracy: {accuracy:.4f} on {len(y_test)} held-out digits")


if __name__ == "__main__":
    main()
