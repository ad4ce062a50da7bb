"""Which examples a trainer sees and in which order: the training and held-out splits, and a
deterministic, rank-sharded order over epochs (so a resumed run sees what an uninterrupted one would)."""

from __future__ import annotations

import torch

from posttrain.errors import PosttrainError


def data_splits(task, cfg) -> tuple[list, list]:
    """(training examples, held-out examples for evaluations during training). With
    ``validation_size`` the held-out ones are the train split's last N problems, kept apart from the
    training slice ``[train_offset, train_offset + train_limit)``; otherwise the test split."""
    rows = task.examples("train")
    pool = rows[: len(rows) - cfg.validation_size]
    train = pool[cfg.train_offset: cfg.train_offset + cfg.train_limit if cfg.train_limit else None]
    if not train:
        raise PosttrainError(f"no training examples left: the train split has {len(rows)}, of which validation_size takes "
                             f"{cfg.validation_size} and train_offset skips {cfg.train_offset}; lower them")
    return train, rows[len(pool):] if cfg.validation_size else task.examples("test")



def epoch_indices(n: int, step: int, per_rank: int, stream_seed: int, rank: int, world: int) -> list[int]:
    """Indices into ``n`` items for this rank at ``step``: a fresh permutation each epoch (sampling
    without replacement; tiny datasets cycle), sharded by rank, so ``world`` ranks of ``per_rank`` see
    exactly the items one rank of ``world × per_rank`` would. Deterministic: a resumed run sees the
    data an uninterrupted one would."""
    global_per_step = per_rank * world
    steps_per_epoch = max(1, n // global_per_step)
    epoch, i = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed + epoch)).tolist()
    if len(order) < global_per_step:
        order = order * -(-global_per_step // len(order))
    return order[i * global_per_step:(i + 1) * global_per_step][rank::world]
