"""Does this CPU multiply bf16 in hardware? fp32 against bf16, side by side, in one run.

    python -m bench.cpu_bf16

Rows: a square matmul in each dtype; a MiniLM-sized nn.Linear (2048 x 384 -> 1536) in fp32 and
under torch.autocast("cpu", torch.bfloat16), as `--bf16 true` runs it. The peaks of both number
formats, for the MFU of a run in either (bench/train_speed.py). BENCHMARKS.md, "bf16 on CPUs".
"""

import argparse
import time

import torch

from training.hardware import cpu_bf16_instructions, cpu_name


def gflops(fn, flops, min_seconds):
    fn()  # warm-up: oneDNN picks and caches its kernel
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        fn()
        runs += 1
    return flops * runs / (time.perf_counter() - start) / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="the square matmul's n")
    parser.add_argument("--min_seconds", type=float, default=2.0, help="time each row at least this long")
    args = parser.parse_args(argv)
    n = args.size
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        rows.append((f"{n}x{n} matmul, {dtype}", gflops(lambda: a @ b, 2 * n**3, args.min_seconds)))
    linear, x = torch.nn.Linear(384, 1536), torch.randn(2048, 384)
    flops = 2 * 2048 * 384 * 1536
    with torch.no_grad():
        rows.append(("nn.Linear 2048x384 -> 1536, fp32", gflops(lambda: linear(x), flops, args.min_seconds)))
        with torch.autocast("cpu", torch.bfloat16):
            rows.append(("the same under autocast bf16", gflops(lambda: linear(x), flops, args.min_seconds)))
    found = cpu_bf16_instructions()
    print(f"{cpu_name()}: bf16 multiply instructions: {found or 'none (torch emulates bf16)'}; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print(f"| {'what':<36} | {'GFLOP/s':>8} | {'vs fp32':>7} |\n|{'-' * 38}|{'-' * 10}|{'-' * 9}|")
    for i, (what, value) in enumerate(rows):
        base = rows[0][1] if i < 2 else rows[2][1]
        print(f"| {what:<36} | {value:8.1f} | {value / base:7.3g}x |")


if __name__ == "__main__":
    main()
