"""What the training benchmarks measure against: the FLOPs a training row costs, and the machine's
practical matmul peak. MFU (model FLOPs utilisation) is the first over time, divided by the second.

    n = count_parameters(model, embeddings=False)          # model_utils: N, without embedding tables
    flops = training_flops(lengths, model.config, n)         # per row, for a tensor of row lengths
    mfu = flops.sum() / seconds / matmul_peak("cuda", torch.bfloat16, size=8192)
"""

import time

import torch


def training_flops(length, config, nonembedding_params):
    """Training FLOPs for one row of `length` real tokens (forward + backward = 3x forward);
    `length` may be an int or a tensor of lengths.

    Matmuls with the weights: 2 FLOPs per weight per token forward -> 6 * N * T for training.
    Attention scores QK^T and the weighted sum AV: 2 * T^2 * d each per layer forward -> 12 * L * d * T^2.
    Embedding lookups are not matmuls and are left out (N counts no embedding tables).
    """
    return 6 * nonembedding_params * length + 12 * config.num_hidden_layers * config.hidden_size * length**2


def matmul_peak(device="cpu", dtype=torch.float32, size=2048, seconds=2.0, trials=3):
    """Best FLOP/s of a large square matmul over `trials` timings of `seconds` each.

    The thread count is the caller's (torch.set_num_threads). On a GPU, kernels are queued and run
    later: the clock is read only after torch.cuda.synchronize(), and matmuls are queued ten at a
    time so the wait does not dominate.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    on_gpu = a.device.type == "cuda"
    per_round = 10 if on_gpu else 1
    best = 0.0
    for _ in range(trials):
        a @ b  # warm-up: thread pool, caches, cuBLAS handles
        synchronize(on_gpu)
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            for _ in range(per_round):
                a @ b
            synchronize(on_gpu)
            count += per_round
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start))
    return best


def synchronize(on_gpu):
    if on_gpu:
        torch.cuda.synchronize()
