"""Data-parallel products: 2 CPU processes (gloo) reproduce the single-process operator."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from backpack_attention.models import addition_data
from backpack_attention.operators import AttentionGGNLinearOperator, AttentionHessianLinearOperator
from cases import addition_model


def _problem():
    model = addition_model(seed=0)
    X, y = addition_data(7, seed=5)
    batches = [(X[:3], y[:3]), (X[3:5], y[3:5]), (X[5:], y[5:])]
    params = [p for a in model.attention_layers() for p in a.parameters()]
    v = torch.randn(sum(p.numel() for p in params), 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, nn.CrossEntropyLoss(), params, batches, v


def _worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, loss_func, params, batches, v = _problem()
        shard = batches[rank::world]  # rank 0: batches 0, 2; rank 1: batch 1
        G = AttentionGGNLinearOperator(model, loss_func, params, shard) @ v
        H = AttentionHessianLinearOperator(model, loss_func, params, shard) @ v
        if rank == 0:
            torch.save({"G": G, "H": H}, out_file)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(2, init_file, out_file), nprocs=2, join=True)
        got = torch.load(out_file)
    model, loss_func, params, batches, v = _problem()
    G = AttentionGGNLinearOperator(model, loss_func, params, batches) @ v
    H = AttentionHessianLinearOperator(model, loss_func, params, batches) @ v
    # a shard alone differs from the full data, so the comparison is not vacuous
    G_shard = AttentionGGNLinearOperator(model, loss_func, params, batches[::2]) @ v
    assert (G_shard - G).norm() > 1e-3 * G.norm()
    assert (got["G"] - G).norm() < 1e-10 * G.norm()
    assert (got["H"] - H).norm() < 1e-10 * H.norm()
