"""The CUDA path: mixed precision and channels_last training. Skips without a CUDA device."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fracture.config import load_params
from fracture.model import profile_data_config
from fracture.training import train
from tests.conftest import REPO
from tests.synthetic import make_dataset, training_frame
from tests.test_prepare import tensor_data

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_training_runs_on_cuda_with_mixed_precision(tmp_path):
    make_dataset(tmp_path, 8, 8)
    params = load_params(REPO)
    frame = training_frame(tmp_path)
    profile = dataclasses.replace(params.profiles["cpu"], image_size=64, epochs=1)
    config = profile_data_config(profile)
    data = tensor_data(tmp_path, frame, config)
    result = train(data, data, config, profile, dataclasses.replace(params.train, device="cuda"))
    assert result.device == "cuda"
    assert 0.0 <= result.best_val_roc_auc <= 1.0
