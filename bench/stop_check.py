"""What the loop's per-step stop check costs with several processes: one max all-reduce of one
integer over a CPU (gloo) group, as faults.StopRequest.agreed does at every step boundary.

    python -m bench.stop_check                    # 2 processes, 2,000 checks, 3 repeats
    python -m bench.stop_check --processes 4 --checks 5000

With one process the check is a Python attribute read and a one-element tensor: nothing to measure.
"""

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PROG = "python -m bench.stop_check"


def checks_per_second(rank, world_size, checks, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    group = dist.new_group(backend="gloo")  # as StopRequest makes it
    for _ in range(50):  # warm-up: connections, buffers
        dist.all_reduce(torch.zeros(1, dtype=torch.int32), op=dist.ReduceOp.MAX, group=group)
    start = time.perf_counter()
    for _ in range(checks):
        flag = torch.tensor([0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        int(flag)
    if rank == 0:
        results.put((time.perf_counter() - start) / checks)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--checks", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    context = mp.get_context("spawn")
    per_check = []
    for repeat in range(args.repeats):
        results = context.SimpleQueue()
        mp.start_processes(checks_per_second, args=(args.processes, args.checks, 29500 + repeat, results),
                           nprocs=args.processes, start_method="spawn")
        per_check.append(results.get())
    micros = [1e6 * s for s in per_check]
    print(f"| processes | checks | µs per step (median) | min | max |\n|---|---|---|---|---|\n"
          f"| {args.processes} | {args.checks:,} | {statistics.median(micros):.0f} | {min(micros):.0f} | {max(micros):.0f} |")


if __name__ == "__main__":
    main()
