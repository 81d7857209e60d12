"""What must hold on a CUDA device (``gpu`` mark: skipped without one; ``tools/gpu_check.sh`` runs them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TECHNIQUES, run_cli, summary, technique_args
from models import MLP
from models.latency import measure_latency

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_latency_waits_for_the_device():
    model = MLP((1, 28, 28), 10, hidden=[4096, 4096]).cuda()
    result = measure_latency(model, torch.zeros(1, 1, 28, 28, device="cuda"), batch_sizes=(256,), warmup=2, repeats=5)
    # 256 x (784x4096 + 4096x4096 + ...) multiply-adds cannot finish in 10 us: an unsynchronised timer would say so
    assert result["ms"]["256"] > 0.01


@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_every_technique_fits_and_tests_on_the_gpu(technique, tmp_path):
    args = [*technique_args(technique), "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.max_epochs=2",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
            "--deploy.program=true", "--deploy.onnx=true"]
    cli = run_cli("fit", *args)
    assert next(cli.model.parameters()).device.type == "cuda"
    result = summary(Path(cli.trainer.log_dir))
    assert result["stage"] == "test" and result["deploy"]["onnx"]["argmax_agree"]
