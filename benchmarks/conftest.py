"""pytest-benchmark set-up: torch threads, and versions in the saved machine info."""

from __future__ import annotations

import os

import torch

if os.environ.get("FUSED_TRIM_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FUSED_TRIM_BENCH_THREADS"]))


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
