"""The accelerate config files in configs/: each one loads with accelerate's own loader and says
what its comments say; the CPU one runs; and two "machines" on this host (two launchers, one
process each, with --num_machines 2) train exactly as two processes on one machine do."""

import os
import subprocess
import sys

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from conftest import assert_same_weights, free_port, read_records, train_args, without_timings
from models import ROOT

CONFIGS = ROOT / "configs"
EXPECTED = {  # file: (distributed_type, mixed_precision, machines, processes)
    "one_gpu_bf16.yaml": ("NO", "bf16", 1, 1),
    "ddp_bf16.yaml": ("MULTI_GPU", "bf16", 1, 4),
    "fsdp2_bf16.yaml": ("FSDP", "bf16", 1, 4),
    "deepspeed_zero2_bf16.yaml": ("DEEPSPEED", "bf16", 1, 4),  # run on a CPU in tests/test_deepspeed.py
    "deepspeed_zero3_bf16.yaml": ("DEEPSPEED", "bf16", 1, 4),
    "two_machines_ddp.yaml": ("MULTI_GPU", "bf16", 2, 8),
    "cpu_two_processes.yaml": ("MULTI_GPU", "no", 1, 2),  # see its comment: CPU processes via torchrun
}
QUICK = ("--max_steps", "6", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3",
         "--plots", "false")


def test_every_config_file_is_listed_here():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_loads_each_config_as_documented(name):
    config = load_config_from_file(str(CONFIGS / name))
    distributed, precision, machines, processes = EXPECTED[name]
    assert (config.distributed_type.value, config.mixed_precision.value if hasattr(config.mixed_precision, "value")
            else config.mixed_precision, config.num_machines, config.num_processes) == (distributed, precision,
                                                                                           machines, processes)
    if name == "fsdp2_bf16.yaml":
        fsdp = config.fsdp_config
        assert (fsdp["fsdp_version"], fsdp["fsdp_transformer_layer_cls_to_wrap"], fsdp["fsdp_state_dict_type"]) == (
            2, "BertLayer", "SHARDED_STATE_DICT")
    if name.startswith("deepspeed_"):
        ds = config.deepspeed_config
        # Clipping and accumulation come from --max_grad_norm and --gradient_accumulation_steps (one source
        # of truth: training.engines.configure_deepspeed), so the shipped files set neither.
        assert ds["zero_stage"] == int(name[14])
        assert "gradient_clipping" not in ds and "gradient_accumulation_steps" not in ds
        assert ds.get("zero3_save_16bit_model", False) == (name == "deepspeed_zero3_bf16.yaml")


def test_the_slurm_script_parses_and_names_a_shipped_config():
    script = CONFIGS / "slurm_two_machines.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "--config_file configs/two_machines_ddp.yaml" in script.read_text()


def launcher(out, tiny_bert, csv_data, *launch_flags, extra=()):
    return subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", *launch_flags, "train_loop.py",
         *train_args(tiny_bert, csv_data, out, *QUICK, *extra)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


def finished(*processes):
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-3000:]
    return outputs


def test_the_cpu_config_runs_two_processes(tiny_bert, csv_data, tmp_path):
    out = tmp_path / "cpu"
    output, = finished(launcher(out, tiny_bert, csv_data, "--config_file", str(CONFIGS / "cpu_two_processes.yaml"),
                                "--main_process_port", str(free_port())))
    assert "examples 64 | processes 2 | device cpu" in output
    assert "engine DDP: each of the 2 processes holds the whole model; gradients averaged across them" in output
    assert [r["step"] for r in read_records(out) if "loss" in r and "eval_loss" not in r][:6] == [1, 2, 3, 4, 5, 6]


def test_two_machines_on_this_host_train_as_two_processes_on_one(tiny_bert, csv_data, tmp_path):
    """The multi-node path: two launchers, ranks 0 and 1, meeting at 127.0.0.1, one process each."""
    port = free_port()
    machines = [launcher(tmp_path / "machines", tiny_bert, csv_data, "--config_file",
                         str(CONFIGS / "cpu_two_processes.yaml"), "--num_machines", "2", "--num_processes", "2",
                         "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port))
                for rank in (0, 1)]
    finished(*machines)
    one = tmp_path / "one"
    finished(launcher(one, tiny_bert, csv_data, "--config_file", str(CONFIGS / "cpu_two_processes.yaml"),
                      "--main_process_port", str(free_port())))
    assert_same_weights(tmp_path / "machines", one)
    assert without_timings(read_records(tmp_path / "machines")) == without_timings(read_records(one))
    checkpoint = tmp_path / "machines" / "results" / "checkpoint-3"
    from accelerate.utils import RNG_STATE_NAME

    assert sorted(p.name for p in checkpoint.glob(f"{RNG_STATE_NAME}_*.pkl")) == [f"{RNG_STATE_NAME}_0.pkl",
                                                                                 f"{RNG_STATE_NAME}_1.pkl"]
    # Resumed on the two "machines" from their checkpoint: the same end again.
    resumed = [launcher(tmp_path / "machines", tiny_bert, csv_data, "--config_file",
                        str(CONFIGS / "cpu_two_processes.yaml"), "--num_machines", "2", "--num_processes", "2",
                        "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port + 0),
                        extra=("--resume_from_checkpoint", str(checkpoint)))
               for rank in (0, 1)]
    finished(*resumed)
    assert_same_weights(tmp_path / "machines", one)
    assert without_timings(read_records(tmp_path / "machines")) == without_timings(read_records(one))


def test_processes_that_would_each_train_alone_are_refused(tiny_bert, csv_data, tmp_path):
    """Launched as two, set up as one each (no ACCELERATE_USE_CPU on a machine without a GPU, so
    accelerate finds nothing to run together on): two runs on the same folders. Refused, exit 2."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    exits = tmp_path / "exits"  # tests/record_exit.py writes each process's own exit code here
    exits.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_two_processes.yaml"),
         "--main_process_port", str(free_port()), "tests/record_exit.py", "train_loop.py",
         *train_args(tiny_bert, csv_data, tmp_path, *QUICK)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**env, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT), "RECORD_EXIT_DIR": str(exits)})
    # Each process exited 2 (bad input); the launcher's own code is accelerate's and torchrun's business.
    assert {p.name: p.read_text() for p in exits.iterdir()} == {"exit-0.txt": "2", "exit-1.txt": "2"}, done.stderr[-3000:]
    assert done.returncode != 0
    assert done.stderr.count("error: 2 processes were launched, but accelerate set up 1") == 2
    assert not (tmp_path / "results").exists()


def test_machines_that_do_not_share_the_output_folder_are_refused(tiny_bert, csv_data, tmp_path):
    """Two "machines" whose --output_dir is not the same folder (as on two hosts without a shared
    filesystem): refused before training, on both, with the reason."""
    port = free_port()
    exits = tmp_path / "exits"  # tests/record_exit.py writes each process's own exit code here (by RANK)
    exits.mkdir()
    machines = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_two_processes.yaml"),
         "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", str(port), "tests/record_exit.py", "train_loop.py",
         *train_args(tiny_bert, csv_data, tmp_path / f"host{rank}", *QUICK)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
             "RECORD_EXIT_DIR": str(exits)}) for rank in (0, 1)]
    outputs = [m.communicate(timeout=300)[0] for m in machines]
    # Each process exited 2 (bad input, refused by require()); each launcher only has to fail.
    assert {p.name: p.read_text() for p in exits.iterdir()} == {"exit-0.txt": "2", "exit-1.txt": "2"}, outputs[0][-2000:]
    assert all(m.returncode != 0 for m in machines), outputs[0][-2000:]
    for output in outputs:
        assert "1 of the 2 processes do not see the folder the main process writes in" in output, output[-2000:]
    assert not list((tmp_path / "host0" / "results").glob("checkpoint-*"))
    assert not list((tmp_path / "host0" / "results").glob(".shared-check-*"))  # the probe is cleaned up
