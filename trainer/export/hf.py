"""The export at the end of training: a plain Hugging Face folder (weights, tokenizer, label names, the run's
config and a model card) that `transformers.pipeline` loads without distrain. Adapter runs export the peft
adapter folder, and the merged model beside it when adapter.merge_on_export."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distrain.trainer.checkpoint.store import full_model_state, load_model_weights
from distrain.trainer.config import run_files
from distrain.trainer.config.schema import ExportWeights
from distrain.trainer.export.model_card import Pruning, model_card
from distrain.trainer.model import adapters
from distrain.trainer.parallel.apply import check_weights_finite, unwrap
from distrain.trainer.parallel.distributed import DistEnv
from distrain.trainer.tasks import Task
from distrain.trainer.train.prune import shrunk_state, sparsity_by_layer


class Exporter:
    def __init__(self, cfg: DictConfig, run_dir: Path, env: DistEnv, task: Task, model: torch.nn.Module,
                 adapter: adapters.AdapterRun | None):  # fmt: skip
        self.cfg, self.run_dir, self.env, self.task, self.model, self.adapter = cfg, run_dir, env, task, model, adapter
        self.target = run_dir / run_files.EXPORT

    def weights_step(self, step: int, best_step: int | None) -> int:
        """The step whose weights go into the export: the best dev step (train.export_weights=best), else the last."""
        best = self.cfg.train.export_weights == ExportWeights.best and best_step is not None
        return best_step if best else step

    def export(self, step: int, checkpoint: Path | None, dev_metrics: dict[str, Any] | None) -> Path:
        """Write export/ with the weights of `step`: the model's own, or those of `checkpoint` when given (the best
        step's, after the run went on); every rank takes part."""
        model = unwrap(self.model)
        if checkpoint is not None:
            load_model_weights(checkpoint, model)
        check_weights_finite(self.model, self.env, step, "export")
        state = full_model_state(self.model)
        if self.env.is_main:
            partial = self.run_dir / f"{run_files.EXPORT}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            # (a one-process run's full state comes back empty here; its model's own state is the same tensors)
            state = state or model.state_dict()
            # (measured before saving: save_pretrained may change the state dict it is given)
            pruning = Pruning(sparsity=sparsity_by_layer(state, model)) if self.cfg.prune.name == "magnitude" else None
            if self.adapter:
                self._export_adapter(partial, state)
            elif self.cfg.prune.name == "structured":
                pruning = self._export_smaller(partial, state)
            else:
                model.save_pretrained(partial, state_dict=state)
            self.task.tokenizer.save_pretrained(partial)
            self.task.finish_export(partial)
            shutil.copy(self.run_dir / run_files.CONFIG, partial / run_files.EXPORT_CONFIG)
            card = model_card(self.cfg, self.task, dev_metrics, pruning)
            (partial / "README.md").write_text(card, encoding="utf-8")
            shutil.rmtree(self.target, ignore_errors=True)
            partial.rename(self.target)
        self.env.barrier()
        return self.target

    def _export_smaller(self, folder: Path, state: dict[str, torch.Tensor]) -> Pruning:
        """Rank 0, prune=structured: the model without its pruned feed-forward neurons, with the smaller
        intermediate_size in its config."""
        model = unwrap(self.model)
        smaller, size = shrunk_state(state, model)
        parameters = (sum(t.numel() for t in state.values()), sum(t.numel() for t in smaller.values()))
        model.save_pretrained(folder, state_dict=smaller)
        config = copy.deepcopy(model.config)
        config.intermediate_size = size
        config.save_pretrained(folder)
        return Pruning(intermediate_size=(model.config.intermediate_size, size), parameters=parameters)

    def _export_adapter(self, folder: Path, state: dict[str, torch.Tensor]) -> None:
        """Rank 0: the adapter folder (peft), and the merged model beside it when adapter.merge_on_export; both
        loadable without distrain (the adapter's with its tokenizer and config, onto the recorded base)."""
        plain = self.adapter.rebuild()
        adapters.load_full_state(plain, state)
        target = folder / adapters.ADAPTER_DIR if self.cfg.adapter.merge_on_export else folder
        adapters.save_adapter(plain, target, self.adapter.base)
        shutil.copy(self.run_dir / run_files.HEAD, target)  # a new task head's labels (ner, classify)
        if target != folder:
            self.task.tokenizer.save_pretrained(target)
            shutil.copy(self.run_dir / run_files.CONFIG, target / run_files.EXPORT_CONFIG)
            adapters.merged(plain).save_pretrained(folder)
