"""What a training run records about the machine it ran on."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fracture.tracking import hardware_tags


def test_hardware_tags_name_the_cpu_and_the_kernels_torch_chose():
    tags = hardware_tags("cpu")
    assert tags["device"] == "cpu" and tags["cuda_device"] == ""
    assert tags["cpu_capability"] == torch.backends.cpu.get_cpu_capability() != ""
    assert tags["torch_threads"] == str(torch.get_num_threads()) and tags["torch_version"] == torch.__version__
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux: the CPU's own name, as the kernel reports it
        assert tags["cpu_model"] == re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE).group(1).strip()
    assert tags["cpu_model"]
    assert all(isinstance(value, str) for value in tags.values())  # MLflow tags are strings
