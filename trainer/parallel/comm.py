"""Gradient communication between data-parallel ranks: DDP's hook `parallel.comm_hook` chooses (torch.distributed's
own) and the state it keeps between steps (PowerSGD's error feedback), which checkpoints carry; and, for DDP and
FSDP, the bytes sent per step.

Bytes per step are what this rank puts into gradient all-reduces: the element count of each reduced buffer times its
element size, summed over the step's buckets (an all-reduce moves about twice that over a ring, whatever the
payload). `none` and `fp16`/`bf16` reduce every gradient element (4 or 2 bytes); PowerSGD reduces its low-rank
factors P (rows x rank) and Q (columns x rank) plus, whole, the tensors not worth compressing (vectors, small
matrices), as its own statistics count them (`total_numel_after_compression`); before `start_step` it reduces
every element in fp32.

The input word embedding is not in DDP's buckets (`row_sparse_embedding`): a step's batch touches a few hundred of
its rows (MiniLM: 30,522 x 384, half the model's parameters), every other row's gradient is zero on every rank,
so `reduce_embedding_rows` all-reduces only the rows some rank touched (and a mask of them first), with DDP's own
arithmetic (x 1/world, then the sum): the same gradient as the dense all-reduce, for ~2% of the bytes. DDP's
dense bucket of it came last in the backward and its wait was the largest exposed cost of a MiniLM step. Under a
hook the rows still go apart, exact and in fp32; the hook takes the other gradients.

Without a hook, on one host with CPU tensors (`parallel.shm_allreduce`), DDP's buckets are summed through shared
memory (parallel/shared_memory.py) instead of gloo's loopback TCP, the same arithmetic again; the bytes are counted
as for `none`.

FSDP has no DDP hooks: it reduce-scatters gradient shards in the dtype of its MixedPrecisionPolicy, which
`apply_fsdp` takes from `fsdp_dtypes` (parallel/apply.py): fp32 unless `comm_hook=fp16|bf16` asks for half the
bytes (each reduced shard is cast back to fp32, so master weights and optimizer state stay fp32). Its bytes are
the reduce-scatter inputs, counted as FSDP passes them to the collective (set_custom_reduce_scatter): every
gradient element of the step's groups, each parameter's first dimension padded to a multiple of the dp degree, times
the reduce dtype's size. PowerSGD and periodic syncs are DDP's only, and TP has no gradient reduction across
data-parallel ranks: the launcher refuses those (cli/validate.py); TP's activation all-reduces are not counted.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from distrain.trainer.parallel.shared_memory import SharedMemoryAllReduce, on_one_host

ELEMENT_BYTES = {"none": 4, "fp16": 2, "bf16": 2, "powersgd": 4, "local": 4}


def row_sparse_embedding(model: torch.nn.Module, parallel: DictConfig) -> str | None:
    """The name of the word embedding whose gradient DDP leaves to `reduce_embedding_rows`, or None: trainable,
    not tied to an output layer (then every row has a gradient), and only when gradients cross at every step (a
    periodic sync keeps them on their rank). A hook compresses the other gradients: the exact rows cost fewer bytes
    than PowerSGD's factors of the whole table or its fp16 copy."""
    if not parallel.sparse_embedding_grads or parallel.sync != "every_step":
        return None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embedding, torch.nn.Embedding) or not embedding.weight.requires_grad:
        return None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and output.weight is embedding.weight:
        return None
    return next(name for name, p in model.named_parameters() if p is embedding.weight)


class GradientComm:
    """The hook of a DDP model and its byte count; FSDP's reduce-scatter byte count; for other layouts, nothing
    (kind None: no bytes, no state)."""

    def __init__(self, model: torch.nn.Module, parallel: DictConfig, seed: int):
        from torch.distributed.fsdp import FSDPModule

        fsdp = [module for module in model.modules() if isinstance(module, FSDPModule)]
        ddp = isinstance(model, DistributedDataParallel)
        self.kind = str(parallel.comm_hook) if ddp else None
        if fsdp:
            self.kind = "fsdp"  # its reduce dtype is its MixedPrecisionPolicy (apply_fsdp); bytes counted here
        elif self.kind is not None and parallel.sync != "every_step":
            self.kind = "local"  # parallel.sync: gradients stay on their rank after the warm-up (parallel/sync.py)
        self.sent = 0  # bytes put into gradient all-reduces since the last take()
        self.state: Any = None  # PowerSGD's (error feedback, warm-start factors, iteration)
        inner, ignored = (model.module, model.parameters_to_ignore) if ddp else (model, set())
        self.row_sparse = [p for name, p in inner.named_parameters() if name in ignored]
        self.dense_grads: dict[torch.nn.Parameter, torch.Tensor] = {}  # row_sparse's gradients, kept between steps
        self.rows: dict[torch.nn.Parameter, torch.Tensor] = {}  # the rows of each that this step's gradient has
        self.group = model.process_group if ddp else None
        self.bucketed_elements = sum(p.numel() for name, p in inner.named_parameters()
                                     if p.requires_grad and name not in ignored)  # fmt: skip
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.layouts: dict[int, list[tuple[str, torch.Size]]] = {}  # bucket index -> its gradients, in order
        self.pending: dict[str, torch.Tensor] = {}  # restored per-parameter memories, placed at the next hook call
        if self.kind == "fsdp":
            self._count_reduce_scatters(fsdp)
        if self.kind == "none" and parallel.shm_allreduce and _cpu(model) and on_one_host(self.group):
            shared = SharedMemoryAllReduce.open(self.group)
            if shared is not None:
                world = torch.distributed.get_world_size(self.group)
                model.register_comm_hook(None, lambda _, bucket: _done(shared.all_reduce(bucket.buffer(), 1 / world)))
        if self.kind in (None, "none", "fsdp"):
            return
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, post_localSGD_hook, powerSGD_hook

        if self.kind == "local":
            # torch's post-local-SGD hook: all-reduce until start_localSGD_iter, then within `subgroup` only, here
            # each rank alone (a group of one: no traffic).
            alone, _ = torch.distributed.new_subgroups(group_size=1)
            warmup = parallel.sync_warmup if parallel.sync == "local_sgd" else 0
            self.state = post_localSGD_hook.PostLocalSGDState(process_group=None, subgroup=alone,
                                                              start_localSGD_iter=warmup)  # fmt: skip
            hook = post_localSGD_hook.post_localSGD_hook
        elif self.kind == "powersgd":
            self.state = powerSGD_hook.PowerSGDState(
                process_group=None, matrix_approximation_rank=parallel.powersgd.rank,
                start_powerSGD_iter=parallel.powersgd.start_step, random_seed=seed,
            )  # fmt: skip
            hook = powerSGD_hook.powerSGD_hook
        else:
            hook = default_hooks.fp16_compress_hook if self.kind == "fp16" else default_hooks.bf16_compress_hook
        model.register_comm_hook(self.state, self._counted(hook))

    def _count_reduce_scatters(self, modules: list[Any]) -> None:
        # FSDP's public set_custom_reduce_scatter takes a ReduceScatter; subclassing its default one (a private
        # module) keeps FSDP's own buffers and call, so only the count is added.
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

        comm = self

        class Counted(DefaultReduceScatter):
            def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
                comm.sent += input_tensor.numel() * input_tensor.element_size()
                return super().__call__(output_tensor, input_tensor, group, op, async_op)

        for module in modules:
            module.set_custom_reduce_scatter(Counted())

    def _counted(self, hook: Any) -> Any:
        size = ELEMENT_BYTES[self.kind]

        def counted(state, bucket):  # no annotations: DDP compares them with its own
            if self.kind == "local":
                self.sent += size * bucket.buffer().numel() if state.iter < state.start_localSGD_iter else 0
                return hook(state, bucket)
            if self.kind == "powersgd":
                pairs = zip(bucket.parameters(), bucket.gradients(), strict=True)
                layout = [(self.names[id(p)], g.shape) for p, g in pairs]
                if self.layouts.get(bucket.index(), layout) != layout:  # DDP rebuilt its buckets
                    self.pending |= self.tensors()
                    self.layouts.clear()
                    for memory in (state.error_dict, state.p_memory_dict, state.q_memory_dict):
                        memory.clear()
                self.layouts[bucket.index()] = layout
                if self.pending:
                    self._place(bucket.index(), layout)
            before = getattr(state, "total_numel_after_compression", None)
            future = hook(state, bucket)
            if self.kind == "powersgd":
                # PowerSGD issues a bucket's P and Q all-reduces from the callbacks of the one before, on gloo's
                # threads: with two buckets in flight the ranks could enqueue their collectives in different orders
                # (gloo aborted a 2-host run at step 5: "Received data size doesn't match expected size"). Ending
                # each bucket's exchange before DDP hands over the next keeps one order on every rank.
                future.wait()
            after = getattr(state, "total_numel_after_compression", None)
            # PowerSGD counts what it reduced once it compresses; before that (and the other hooks) the bucket.
            self.sent += size * (after - before if after != before else bucket.buffer().numel())
            return future

        return counted

    def reduce_embedding_rows(self) -> None:
        """After the backward DDP synced: all-reduce the rows of the word embedding's gradient that any rank
        touched, and make it the dense gradient the optimizer takes.

        The embedding's backward is sparse (apply_ddp sets `sparse`): the rows it touched and their gradients, not
        a zeroed copy of the whole table, and no search of the table for its nonzero rows (together ~15% of a
        MiniLM step). They are added into a dense buffer kept from step to step (a fresh table-sized gradient
        every step cost page faults; only the last step's rows need zeroing) in the order torch's dense backward
        adds them, so the result is DDP's bit for bit. A row that no rank touched sums to zero as in the dense
        all-reduce; NaN values poison their rows, and so every rank's gradient norm (train/step.py)."""
        for param in self.row_sparse:
            dense = self.dense_grads.get(param)
            if dense is None:
                dense = self.dense_grads[param] = torch.zeros_like(param)
            else:  # only the last step's rows are nonzero (clip_grad_norm scales only those)
                dense.index_fill_(0, self.rows[param], 0.0)
            touched = torch.zeros(param.shape[0], device=param.device)
            if param.grad is not None:
                grad = param.grad
                if grad.is_sparse:
                    rows, values = grad._indices()[0], grad._values()
                    dense.index_add_(0, rows, values)
                    touched.index_fill_(0, rows, 1.0)
                else:  # a dense gradient (a model whose embedding ignores `sparse`)
                    dense.copy_(grad)
                    touched = grad.ne(0).any(dim=1).float()
            torch.distributed.all_reduce(touched, group=self.group)
            rows = touched.nonzero().squeeze(1)
            world = torch.distributed.get_world_size(self.group)
            values = dense.index_select(0, rows).mul_(1.0 / world)  # DDP multiplies by 1/world, then sums
            torch.distributed.all_reduce(values, group=self.group)
            dense.index_copy_(0, rows, values)
            param.grad = dense
            self.rows[param] = rows
            self.sent += 4 * (touched.numel() + values.numel())

    def take(self, synced: bool) -> int:
        """The bytes sent since the last call (a step: `synced` when it reduced gradients); resets the count."""
        if self.kind == "none" and synced:
            self.sent += 4 * self.bucketed_elements  # DDP's built-in all-reduce: every bucketed element in fp32
        sent, self.sent = self.sent, 0
        return sent

    # --- checkpoint: the iteration in trainer_state.json, the tensors per rank (tensors()) -------------------
    # PowerSGD keeps its memories per DDP bucket, flat. A new process's DDP buckets its parameters in
    # registration order for the first step and then rebuilds the buckets in the order gradients arrived, so a
    # bucket's layout after a resume is not the saver's: the memories are saved per parameter and put back into
    # the layout of the bucket the hook is given (so are they when buckets are rebuilt in one process: the first
    # step after a resume runs PowerSGD on the registration-order buckets).
    def _segments(self, layout: list[tuple[str, torch.Size]]) -> list[tuple[str, int, int, int]]:
        """(name, error length, P length, Q length) per gradient, in the order PowerSGD lays each memory out
        (errors in bucket order; P and Q grouped by shape, as its batching by shape orders them)."""
        from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

        factors: dict[str, tuple[int, int]] = {}
        by_shape: dict[torch.Size, list[str]] = {}
        for name, shape in layout:
            n, m = shape[0], math.prod(shape[1:])
            r = min(n, m, self.state.matrix_approximation_rank)
            if _should_compress(n, m, r, self.state.min_compression_rate)[0]:
                factors[name] = (n * r, m * r)
                by_shape.setdefault(torch.Size((n, m)), []).append(name)
        in_factor_order = [name for names in by_shape.values() for name in names]
        return [(name, math.prod(shape), *factors.get(name, (0, 0))) for name, shape in layout] + [
            (name, 0, 0, 0) for name in in_factor_order
        ]

    def state_dict(self) -> dict[str, Any]:
        return {f"{self.kind}_hook_iter": self.state.iter} if self.kind in ("powersgd", "local") else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if f"{self.kind}_hook_iter" in state:
            self.state.iter = state[f"{self.kind}_hook_iter"]

    def tensors(self) -> dict[str, torch.Tensor]:
        """This rank's PowerSGD memories per parameter: its own compression error, and the factors it
        warm-starts from (the same on every rank after their all-reduce)."""
        if self.kind != "powersgd":
            return {}
        out = dict(self.pending)  # restored but not yet placed (a stop right after a resume)
        s = self.state
        for index, layout in self.layouts.items():
            segments = self._segments(layout)
            plain, factor_order = segments[: len(layout)], [name for name, *_ in segments[len(layout) :]]
            lengths = {name: (p, q) for name, _, p, q in plain}
            if index in s.error_dict:
                out |= _split(s.error_dict[index], [(f"error/{n}", e) for n, e, _, _ in plain])
            if index in s.p_memory_dict:
                out |= _split(s.p_memory_dict[index], [(f"p/{n}", lengths[n][0]) for n in factor_order])
                out |= _split(s.q_memory_dict[index], [(f"q/{n}", lengths[n][1]) for n in factor_order])
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.kind == "powersgd":
            self.pending = dict(tensors)

    def _place(self, index: int, layout: list[tuple[str, torch.Size]]) -> None:
        segments = self._segments(layout)
        plain, factor_order = segments[: len(layout)], [name for name, *_ in segments[len(layout) :]]
        s, pending = self.state, self.pending
        if all(f"error/{name}" in pending for name, *_ in plain):
            s.error_dict[index] = torch.cat([pending.pop(f"error/{name}") for name, *_ in plain])
        if factor_order and all(f"p/{name}" in pending for name in factor_order):
            s.p_memory_dict[index] = torch.cat([pending.pop(f"p/{name}") for name in factor_order])
            s.q_memory_dict[index] = torch.cat([pending.pop(f"q/{name}") for name in factor_order])


def _cpu(model: torch.nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


def _done(tensor: torch.Tensor) -> torch.futures.Future:
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(tensor)
    return future


def _split(flat: torch.Tensor, pieces: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for key, length in pieces:
        out[key] = flat[offset : offset + length].clone()
        offset += length
    return out
