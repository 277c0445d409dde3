"""The parallel layout of a run: data-parallel degree `dp` x tensor-parallel degree `tp` = world size.

One object reads `parallel.*` and the world size, checks the degrees (before any worker starts, with the keys to
fix), checks the model's head counts against tp, and builds the ("dp", "tp") device mesh in the workers. It is the
only place that knows what a strategy means: everything else asks its predicates (`fsdp_enabled`, `tp_enabled`,
`ddp_enabled`, `sharded`) and its degrees.

    single   1 process                          dp=1, tp=1
    ddp      DistributedDataParallel            dp=world, tp=1
    fsdp     FSDP2 over all processes           dp=world, tp=1
    tp       tensor parallel over all processes dp=1, tp=world
    fsdp_tp  tensor parallel inside, FSDP over dp: dp x tp = world (parallel.tp, or parallel.dp, sets the split)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from distrain.trainer.config.schema import Strategy


@dataclass(frozen=True)
class ParallelDims:
    strategy: Strategy
    dp: int
    tp: int

    @property
    def fsdp_enabled(self) -> bool:
        """Parameters, gradients and optimizer state are sharded over the dp ranks (FSDP2)."""
        return self.strategy in (Strategy.fsdp, Strategy.fsdp_tp)

    @property
    def tp_enabled(self) -> bool:
        """Attention and MLP matrices are split over the tp ranks."""
        return self.tp > 1

    @property
    def ddp_enabled(self) -> bool:
        """A full model per rank, gradients all-reduced (DistributedDataParallel)."""
        return self.strategy == Strategy.ddp

    @property
    def sharded(self) -> bool:
        """Parameters are DTensors (FSDP and/or TP): every rank must take part in every forward pass."""
        return self.fsdp_enabled or self.tp_enabled

    @staticmethod
    def resolve(parallel: DictConfig, world_size: int) -> tuple[ParallelDims | None, list[str]]:
        """The layout for this config and world size, or the problems (each naming its key)."""
        strategy = Strategy(parallel.name)
        dp, tp = parallel.dp, parallel.tp
        given = f"launcher.nproc_per_node x launcher.nnodes = {world_size}"
        if strategy == Strategy.single:
            if world_size != 1:
                return None, [f"parallel.name: 'single' runs one process but {given}; use parallel=ddp or fsdp"]
            dp, tp = dp or 1, tp or 1
        elif strategy in (Strategy.ddp, Strategy.fsdp):
            if tp not in (None, 1):
                return None, [f"parallel.tp: {strategy.value} has no tensor parallelism; expected 1 or null, got {tp}"]
            dp, tp = dp or world_size, 1
        elif strategy == Strategy.tp:
            if dp not in (None, 1):
                return None, [f"parallel.dp: tp alone does not replicate over data; expected 1 or null, got {dp} "
                              "(use parallel=fsdp_tp for dp > 1)"]  # fmt: skip
            dp, tp = 1, tp or world_size
        else:  # fsdp_tp
            if tp is None and dp is None:
                return None, ["parallel.tp: fsdp_tp needs parallel.tp (or parallel.dp) to split the processes"]
            # The key that is set and does not divide the processes is the one to name, not the one derived
            for key, value in (("dp", dp), ("tp", tp)):
                if value is not None and value >= 1 and world_size % value:
                    return None, [f"parallel.{key}: expected an integer >= 1 that divides {given}, got {value}"]
            if tp is None:
                tp = world_size // dp if dp else 0
            if dp is None:
                dp = world_size // tp if tp else 0
        problems = []
        for key, value in (("dp", dp), ("tp", tp)):
            if value < 1:
                problems.append(f"parallel.{key}: expected an integer >= 1 that divides {world_size}, got {value}")
        if not problems and dp * tp != world_size:
            problems.append(f"parallel.dp x parallel.tp: expected {world_size} ({given}), got {dp} x {tp} = {dp * tp}")
        return (None if problems else ParallelDims(strategy, dp, tp)), problems

    @staticmethod
    def candidates(world_size: int) -> list[dict[str, Any]]:
        """Every strategy that runs on this many processes, as `parallel.*` settings (fsdp_tp with its smallest
        2-D split), for `distrain plan` to compare."""
        if world_size == 1:
            return [{"name": Strategy.single.value, "dp": None, "tp": None}]
        return [{"name": s.value, "dp": None, "tp": 2 if s == Strategy.fsdp_tp else None}
                for s in Strategy if s != Strategy.single]  # fmt: skip

    def model_problems(self, model_config: Any) -> list[str]:
        """Head counts must split evenly over the tensor-parallel ranks."""
        if self.tp == 1 or model_config is None:
            return []
        problems = []
        for field in ("num_attention_heads", "num_key_value_heads"):
            heads = getattr(model_config, field, None)
            if heads is not None and heads % self.tp:
                problems.append(f"parallel.tp: {field}={heads} of the model is not divisible by tp={self.tp}")
        return problems

    def build_mesh(self, device_type: str) -> Any:
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, (self.dp, self.tp), mesh_dim_names=("dp", "tp"))
