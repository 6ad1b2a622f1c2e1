"""Benchmarks and device checks. Run from the repository root:

    python -m bench.train_speed     training and evaluation speed: Trainer against our loop (CPU)
    python -m bench.serve_speed     the web app against one pipeline() call per request
    python -m bench.soak            the live server's memory over 50,000 requests (and training's over a long run)
    python -m bench.memory_suspects where a server's memory goes, one suspect at a time
    bash bench/gpu_check.sh         train_loop.py on a GPU in fp32, fp16 and bf16

measure.py holds what both training benchmarks measure against: FLOPs per row and the matmul peak.
Results go into BENCHMARKS.md, with the command, date and machine.
"""
