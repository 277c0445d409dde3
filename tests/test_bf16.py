"""precision=bf16 against fp32: MiniLM (pretrained, bundled) on WNUT-16, one process, the same seed and batches.
bf16 autocasts the matmuls (oneDNN's AVX512-BF16/AMX GEMMs where the CPU has them) and keeps fp32 master weights
and optimizer state, so its loss curve follows fp32's within bf16's rounding; the GEMM peak behind MFU is
measured at the precision the matmuls run at."""

from __future__ import annotations

import json

import pytest
from conftest import run_distrain, train_losses
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader

STEPS = 20
# A pretrained model, so the losses are those of a real fine-tune; dropout off so that only precision differs.
MINILM = ["model=minilm", "model.dropout=0.0", "train.micro_batch_size=16", f"train.max_steps={STEPS}",
          "train.log_every=1", "data.max_train_samples=320", "data.max_eval_samples=16", "logger=[]",
          f"train.save_every={STEPS}", "train.export_weights=last"]  # fmt: skip
# bf16 keeps 8 significant bits: one rounding is 2^-9 = 0.2% relative. The logits pass through 6 layers of bf16
# GEMMs whose errors mostly cancel in a loss averaged over ~200 tokens, and fp32 master weights keep rounding from
# accumulating in the weights; the gap can only grow with the steps as the trajectories drift apart. Measured
# 2026-12-06: step 1 within 0.001%, every step within 0.08%, the last 10 steps' mean within 0.04% of fp32's. The
# bounds are 5 roundings (1%) for any step and 2.5 for the mean of the last 10: 12-14x the gaps seen, room for
# other CPUs' kernels.
STEP_TOLERANCE = 0.01
TAIL_TOLERANCE = 0.005


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("bf16")
    for precision in ("fp32", "bf16"):
        run_distrain("train", *MINILM, f"precision={precision}", f"data.cache_dir={cache_dir}",
                     f"run.dir={root / precision}")  # fmt: skip
    return root


@pytest.mark.slow  # two MiniLM runs of 20 steps: under a minute on 2 idle cores
def test_bf16_loss_curve_follows_fp32_within_bf16_rounding(runs):
    fp32, bf16 = train_losses(runs / "fp32"), train_losses(runs / "bf16")
    assert sorted(fp32) == sorted(bf16) == list(range(1, STEPS + 1))
    gaps = {step: abs(bf16[step] - fp32[step]) / fp32[step] for step in fp32}
    assert max(gaps.values()) <= STEP_TOLERANCE, gaps
    tail = range(STEPS - 9, STEPS + 1)
    fp32_tail, bf16_tail = sum(fp32[s] for s in tail), sum(bf16[s] for s in tail)
    assert abs(bf16_tail - fp32_tail) / fp32_tail <= TAIL_TOLERANCE, (fp32_tail / 10, bf16_tail / 10)
    assert fp32[STEPS] < 0.5 * fp32[1] and bf16[STEPS] < 0.5 * bf16[1]  # both learn: the comparison means something
    assert gaps[1] > 0  # bf16 really ran: the first forward pass sees the same weights, only rounding differs


@pytest.mark.slow
def test_bf16_keeps_fp32_weights_and_optimizer_state_and_measures_the_bf16_peak(runs):
    with safe_open(str(runs / "bf16" / "export" / "model.safetensors"), "pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118 (no __iter__)
    assert dtypes == {"F32"}
    (checkpoint,) = (runs / "bf16" / "checkpoints").glob("step_*")
    stored = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    moments = {k: v for k, v in stored.items() if k.endswith((".exp_avg", ".exp_avg_sq"))}
    assert moments and {str(v.properties.dtype) for v in moments.values()} == {"torch.float32"}
    env = {p: json.loads((runs / p / "env.json").read_text()) for p in ("fp32", "bf16")}
    assert env["fp32"]["peak_flops_dtype"] == "float32" and env["bf16"]["peak_flops_dtype"] == "bfloat16"
