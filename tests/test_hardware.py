"""bf16 on CPUs (training/hardware.py): what the CPU multiplies in hardware, said in the training
banner, the server's startup log and GET /info."""

import logging
from pathlib import Path

import pytest
import torch

import train_loop
from conftest import train_args
from test_app import serve, wait_ready
from training import hardware


@pytest.mark.parametrize("flags, expected", [({"amx_bf16": True, "avx512_bf16": True}, "AMX-BF16"),
                                             ({"avx512_bf16": True}, "AVX512-BF16"),
                                             ({"avx2": True}, None)])
def test_the_instructions_are_named_from_torchs_cpu_capabilities(flags, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"cpu_name": "a CPU", **flags})
    assert hardware.cpu_bf16_instructions() == expected


def test_this_cpus_answer_agrees_with_the_kernels_flags():
    """The same CPU flags as /proc/cpuinfo (what `lscpu` prints), read through torch."""
    words = set(Path("/proc/cpuinfo").read_text().split())
    expected = "AMX-BF16" if "amx_bf16" in words else "AVX512-BF16" if "avx512_bf16" in words else None
    assert hardware.cpu_bf16_instructions() == expected


def banner_cpu_line(capsys, tiny_bert, csv_data, out, *flags):
    train_loop.main(train_args(tiny_bert, csv_data, out, "--max_steps", "1", "--eval_split", "", "--eval_strategy", "no",
                               "--plots", "false",
                               "--save_strategy", "no", *flags))
    banner = capsys.readouterr().out.split("***** training *****")[1]
    return next(line.strip() for line in banner.splitlines() if line.startswith("  CPU "))


@pytest.mark.parametrize("found, precision, expected", [
    ("AMX-BF16", "no", "multiplies bf16 in hardware (AMX-BF16): --bf16 true trains faster"),
    ("AVX512-BF16", "bf16", "multiplies bf16 in hardware (AVX512-BF16)"),
    (None, "bf16", "warning: a CPU has no bf16 multiply instructions"),
    (None, "no", "no bf16 multiply instructions, fp32 is the fast choice here"),
])
def test_the_banner_says_what_bf16_does_on_this_cpu(found, precision, expected, tiny_bert, csv_data, tmp_path,
                                                    capsys, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: found)
    monkeypatch.setattr(hardware, "cpu_name", lambda: "a CPU")
    line = banner_cpu_line(capsys, tiny_bert, csv_data, tmp_path, "--mixed_precision", precision)
    assert expected in line, line
    assert ("--mixed_precision no" in line) == (found is None and precision == "bf16")  # the fix, when one is due


@pytest.mark.parametrize("found, dtype, warned", [(None, "bfloat16", "bfloat16 serves far slower than float32 here"),
                                                  ("AMX-BF16", "float32", "--dtype bfloat16 may serve faster"),
                                                  (None, "float32", None), ("AMX-BF16", "bfloat16", None)])
def test_the_server_says_it_at_startup_and_in_info(found, dtype, warned, tiny_dir, monkeypatch, caplog):
    monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: found)
    with caplog.at_level(logging.INFO, logger="app"), serve(tiny_dir, dtype=dtype) as c:
        wait_ready(c)
        info = c.get("/info").json()
    assert info["cpu_bf16"] == found and info["dtype"] == dtype
    notes = [r.getMessage() for r in caplog.records if "bf16 multiply" in r.getMessage() or "in hardware" in r.getMessage()]
    if warned is None:
        assert notes == []
    else:
        assert len(notes) == 1 and warned in notes[0], notes
