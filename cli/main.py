"""`distrain <command> [overrides]`: dispatches to the command's Hydra app."""

from __future__ import annotations

import difflib
import importlib
import sys

from distrain.trainer.exit import exit_now

COMMANDS = {
    "train": ("distrain.cli.train", "compose + validate a config, write a run dir, train with torchrun workers"),
    "eval": ("distrain.cli.eval", "evaluate a checkpoint, export or run dir on a split (ckpt=... split=...)"),
    "predict": ("distrain.cli.predict", "batch inference, one JSON line per input line (ckpt=... input=FILE|-)"),
    "export": ("distrain.cli.export", "an ONNX graph (fp32 or int8) checked against torch (ckpt=... quantize=int8)"),
    "parity": ("distrain.cli.parity", "train N steps under each strategy; compare losses (strategies=[...] steps=N)"),
    "plan": ("distrain.cli.plan", "per-rank memory and FLOPs of a layout and its alternatives, without training"),
    "report": ("distrain.cli.report", "rank the runs of a sweep (or a run) by dev metric; write report.csv (DIR)"),
    "bench": ("distrain.cli.bench", "training throughput vs HF Trainer, start-up; `bench inference`: latency (--help)"),
}

USAGE = """usage: distrain <command> [key=value ...] [hydra flags]

commands:
{commands}

examples:
  distrain train +experiment=wnut_ner
  distrain train +experiment=conll_ner data.dir=/data/conll2003 launcher.nproc_per_node=2
  distrain train -m +experiment=wnut_ner optim.lr=5e-5,1e-4
  distrain eval ckpt=runs/wnut_ner/<run>/export split=test
  echo "Obama visited Paris" | distrain predict ckpt=runs/wnut_ner/<run>
  distrain export ckpt=runs/wnut_ner/<run> format=onnx quantize=int8
  distrain parity model=bert_tiny strategies=[single,ddp,fsdp,tp,fsdp_tp:1x2] steps=5
  distrain plan +experiment=conll_ner parallel=fsdp launcher.nproc_per_node=2
  distrain train +experiment=wnut_ner hparams_search=ner_optuna && distrain report runs/wnut_ner/ner_optuna
  distrain bench --data-dir /data/conll2003 --repeats 3 --steps 60

`distrain <command> --help` lists the config groups and keys; `--cfg job` prints the composed config."""


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        usage = USAGE.format(commands="\n".join(f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items()))
        print(usage, file=sys.stdout if args else sys.stderr)
        if not args:  # no command: a usage error, as for an unknown one
            raise SystemExit(2)
        return
    if args[0] not in COMMANDS:
        near = difflib.get_close_matches(args[0], COMMANDS, n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        print(f"distrain: unknown command {args[0]!r}{hint} (expected one of {', '.join(COMMANDS)})", file=sys.stderr)
        raise SystemExit(2)
    module, _ = COMMANDS[args[0]]
    # Hydra reads sys.argv: hand it the command's own arguments.
    sys.argv = [f"distrain {args[0]}", *args[1:]]
    importlib.import_module(module).main()
    exit_now()  # skip the teardown of what the command loaded (torch, transformers: seconds)


if __name__ == "__main__":
    main()
