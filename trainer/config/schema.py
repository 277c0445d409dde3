"""Typed schema of a distrain run: one dataclass per config group, nested in `DistrainConfig`.

Pure data: no project imports, no checks beyond types. Registered in Hydra's ConfigStore as the schema of
`configs/train.yaml`, so a value of the wrong type, an unknown key or a choice outside an enum fails at
composition with its full key. The defaults live here only: the YAML files set what an option changes. What types
cannot say (ranges, rules between fields, files that must exist) is checked by the launcher
(`distrain.cli.validate`) before any worker starts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf


class Choice(str, enum.Enum):
    """A closed choice: compares equal to its value and prints as it, so configs and messages read plainly."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class TaskName(Choice):
    ner = "ner"
    classify = "classify"
    mlm = "mlm"
    clm = "clm"
    dpo = "dpo"  # preference tuning of a causal LM (prompt, chosen, rejected) against a frozen reference
    chat = "chat"  # causal LM fine-tuned on conversations, trained on the assistant's turns (trainer/tasks/chat.py)


class DataFormat(Choice):
    conll = "conll"
    jsonl = "jsonl"
    csv = "csv"
    text = "text"
    folders = "folders"  # one sub-folder of .txt files per class
    chat = "chat"  # jsonl, one conversation per line: {"messages": [{"role", "content"}, ...]} or prompt/response


class TextUnit(Choice):
    file = "file"
    paragraph = "paragraph"  # blank-line separated
    line = "line"


class LabelSubwords(Choice):
    first = "first"  # only a word's first sub-word has a target; the others are ignored
    all = "all"  # every sub-word has one: continuation pieces of a B-X word get I-X


class Strategy(Choice):
    single = "single"
    ddp = "ddp"
    fsdp = "fsdp"
    tp = "tp"
    fsdp_tp = "fsdp_tp"


class CommHook(Choice):
    none = "none"  # fp32 gradients: DDP's all-reduce, FSDP's reduce-scatter
    fp16 = "fp16"  # gradients cast to fp16 for the all-reduce or reduce-scatter (half the bytes)
    bf16 = "bf16"  # ... to bf16
    powersgd = "powersgd"  # ddp only: low-rank (PowerSGD) compression with error feedback


class SyncMode(Choice):
    every_step = "every_step"  # gradients all-reduced at every step
    local_sgd = "local_sgd"  # after sync_warmup steps each rank steps alone; weights averaged every sync_every
    diloco = "diloco"  # inner optimizer for sync_every steps, then an outer Nesterov step on the averaged change


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class OptimName(Choice):
    adamw = "adamw"
    sgd = "sgd"  # with optim.momentum and optim.nesterov
    adagrad = "adagrad"
    rmsprop = "rmsprop"
    adafactor = "adafactor"  # factored second moments: single and ddp only


class Schedule(Choice):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


class ExportWeights(Choice):
    best = "best"
    last = "last"


class WandbMode(Choice):
    offline = "offline"  # files only, uploaded later with `wandb sync`
    online = "online"
    disabled = "disabled"


class StartMethod(Choice):
    auto = "auto"  # fork for CPU workers, exec for CUDA ones
    fork = "fork"
    exec = "exec"


class Backend(Choice):
    gloo = "gloo"
    nccl = "nccl"


class AdapterName(Choice):
    none = "none"  # every weight is trained
    lora = "lora"  # the base is frozen; low-rank adapters (peft) are trained


class PruneName(Choice):
    none = "none"
    magnitude = "magnitude"  # unstructured: the smallest weights of the base model's Linear layers are zeroed
    structured = "structured"  # whole feed-forward neurons removed: the export is a smaller dense model


# global: one magnitude threshold over every pruned weight; layer: each weight matrix pruned to the sparsity on its
# own. (The functional form: `global` is a Python keyword, and OmegaConf finds members by name.)
PruneScope = Choice("PruneScope", [("global", "global"), ("layer", "layer")])


class SamplerName(Choice):
    tpe = "tpe"  # Bayesian (tree-structured Parzen estimator) after sweep.n_startup_trials random trials
    random = "random"
    grid = "grid"  # every combination of the choice(...)/range(...) values of the space
    cmaes = "cmaes"  # CMA-ES: numeric spaces, after sweep.n_startup_trials random trials


class PrunerName(Choice):
    none = "none"
    median = "median"  # stop a trial whose dev metric is worse than the median of earlier trials at that step
    asha = "asha"  # asynchronous successive halving: keep the best 1/3 of the trials at each rung


class Device(Choice):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class ModelConfig:
    name: str = MISSING  # short name, used in run names
    name_or_path: str | None = None  # local folder, pkg://<package>/<folder>, or a Hub id; null = random init
    tokenizer: str | None = None  # defaults to name_or_path
    architecture: dict[str, Any] | None = None  # transformers config fields for a random-init model
    revision: str | None = None  # Hub revision
    trust_remote_code: bool = False  # run model code shipped with a Hub repo: only for repos you trust
    gguf_file: str | None = None  # a GGUF file inside name_or_path: dequantized once into cache_dir
    train_tokenizer_vocab: int | None = None  # random-init models: train a BPE tokenizer of this size on the data
    dropout: float | None = None  # hidden and attention dropout of the model (names per family); null = its own
    cache_dir: str = "~/.cache/distrain"  # converted GGUF models
    init_from: str | None = None  # start as a copy of this trained model (run dir, checkpoint, export, HF folder)
    keep_layers: list[int] | None = None  # with init_from: the teacher's blocks kept, in order; null = all


@dataclass
class MixtureSource:
    """One source of a weighted mixture of training data (data.mixture); unset fields come from data.*."""

    name: str = MISSING  # how metrics name it (samples_by_source)
    weight: float = 1.0  # relative: a sample comes from this source with probability weight / sum of weights
    dir: str | None = None  # folder of its files; null with hub_name: a Hub dataset
    files: str | None = None  # its training files (glob) inside dir
    format: DataFormat | None = None
    text_unit: TextUnit | None = None
    hub_name: str | None = None
    hub_config: str | None = None
    hub_revision: str | None = None
    hub_split: str = "train"
    text_column: str | None = None  # its column names, mapped onto data.text_column etc.
    label_column: str | None = None
    tokens_column: str | None = None
    tags_column: str | None = None


@dataclass
class DataConfig:
    name: str = MISSING
    format: DataFormat = DataFormat.conll
    dir: str | None = None  # folder (or pkg://...) holding the files below; null = use hub_name
    files: dict[str, str] = field(default_factory=dict)  # split -> file (glob) inside dir; "all" + split: cut one
    split: dict[str, float] | None = None  # fractions to cut files.all into train/dev/test, fixed seed
    split_seed: int = 0
    hub_name: str | None = None  # Hub dataset used when dir is null (needs network)
    hub_config: str | None = None
    hub_revision: str | None = None
    hub_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "dev": "validation", "test": "test"})
    text_column: str = "text"  # jsonl / csv / Hub columns
    label_column: str = "label"
    tokens_column: str = "tokens"
    tags_column: str = "ner_tags"
    prompt_column: str = "prompt"  # chat: a record without messages is this user turn ...
    response_column: str = "response"  # ... answered by this assistant turn
    chat_template: str | None = None  # chat: null = the tokenizer's own template; chatml = a named one (no own)
    labels: list[str] | None = None  # the label set, in id order; null = the labels seen in training data
    label_subwords: LabelSubwords = LabelSubwords.all  # ner: which sub-words of a word are trained (README: why all)
    text_unit: TextUnit = TextUnit.file  # text format: one document per file, paragraph or line
    packing: bool = False  # mlm/clm: fill blocks of max_length tokens from consecutive documents, no padding
    document_boundaries: bool = True  # clm packing: attention and targets stay inside each document
    pack_examples: bool = False  # ner/clm training: whole examples end to end in rows of <= max_length, positions
    # and attention kept per example (trainer/data/packing.py); not with data.packing (its blocks are full)
    max_length: int = 256  # sub-word tokens per sequence, longer ones are truncated
    augment: list[str] = field(default_factory=list)  # training-sample augmentation ops per epoch (data/augment.py)
    augment_p: float = 0.1  # data.augment: probability per token, entity or segment (NER) or word (classify)
    max_train_samples: int | None = None  # take the first N (after the split) for quick runs
    max_eval_samples: int | None = None
    group_by_length: bool = False  # batches of similar length: less padding, same samples per epoch
    cache_dir: str = "~/.cache/distrain"  # tokenized datasets, keyed by file contents and settings
    num_workers: int = 0  # DataLoader worker processes per rank
    streaming: bool = False  # read, tokenize and pack the training data on the fly: no cache (train.max_steps needed)
    shuffle_buffer: int = 1000  # streaming: samples in the seeded shuffle buffer (part of each checkpoint)
    mixture: list[MixtureSource] = field(default_factory=list)  # weighted training sources instead of files.train


@dataclass
class TaskConfig:
    name: TaskName = TaskName.ner
    metric: str = "f1"  # dev metric for the best checkpoint and early stopping; one of the task's metrics
    mask_probability: float = 0.15  # mlm: fraction of tokens to predict (80% [MASK], 10% random, 10% kept)
    class_weights: Any = "none"  # ner/classify loss weight per label: none, balanced (from train labels) or [w, ...]
    train_on_prompt: bool = False  # chat: also train on system and user turns and headers (default: assistant only)


@dataclass
class AdapterConfig:
    name: AdapterName = AdapterName.none
    r: int = 8  # rank of the low-rank update B @ A
    alpha: float = 16  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input (0 keeps runs comparable across strategies)
    target_modules: list[str] | None = None  # Linear layers to adapt; null = attention and MLP projections per family
    merge_on_export: bool = True  # export/ holds the merged model; the adapter folder is always in export/adapter


@dataclass
class PruneConfig:
    name: PruneName = PruneName.none
    # final fraction of pruned weights set to zero (structured: of each layer's feed-forward neurons), in [0, 1)
    sparsity: float = 0.5
    # global: one threshold for all pruned weights; layer: per matrix (structured: per layer, the only choice)
    scope: PruneScope = PruneScope["global"]
    start_step: int = 0  # the schedule's first step (sparsity 0 there)
    end_step: int | None = None  # the step that reaches prune.sparsity (cubic ramp between); null = the last step
    every: int = 50  # steps between re-choosing the masks (in between, zeros stay zero)


@dataclass
class PowerSGDConfig:
    rank: int = 4  # rank of the low-rank factors P and Q (more: closer to the full gradient, more bytes)
    start_step: int = 10  # steps of plain all-reduce first, compressed after (>= 2: error feedback needs one)


@dataclass
class DiLoCoConfig:
    outer_lr: float = 0.7  # the outer SGD's learning rate on the averaged change (DiLoCo's paper: 0.7)
    outer_momentum: float = 0.9  # its Nesterov momentum


@dataclass
class ParallelConfig:
    name: Strategy = Strategy.single  # see trainer/parallel/dims.py
    dp: int | None = None  # data-parallel degree; null = derived from the world size and tp
    tp: int | None = None  # tensor-parallel degree; null = derived (tp: the world size; others: 1)
    reshard_after_forward: bool = True  # fsdp: free gathered parameters after forward (less memory, more comm)
    cpu_offload: bool = False  # fsdp: keep sharded parameters, gradients and optimizer state in CPU memory
    backend: Backend | None = None  # null: nccl on CUDA, gloo on CPU
    # ddp, fsdp, fsdp_tp: how gradients are reduced (trainer/parallel/comm.py); sync=diloco: fp16/bf16 outer gradients
    comm_hook: CommHook = CommHook.none
    powersgd: PowerSGDConfig = field(default_factory=PowerSGDConfig)  # comm_hook=powersgd
    # ddp, comm_hook=none: all-reduce only the word-embedding rows a step touched (same gradient, ~2% of its bytes)
    sparse_embedding_grads: bool = True
    # ddp, comm_hook=none, CPU, one host: gradient buckets summed through shared memory, not gloo's loopback TCP
    shm_allreduce: bool = True
    sync: SyncMode = SyncMode.every_step  # ddp: when ranks communicate (trainer/parallel/sync.py)
    sync_every: int = 8  # local_sgd, diloco: steps between syncs (H)
    sync_warmup: int = 0  # local_sgd: steps of every-step all-reduce before local steps begin
    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)  # sync=diloco


@dataclass
class PrecisionConfig:
    name: Precision = Precision.fp32  # fp32 | bf16 (autocast) | fp16 (autocast + loss scaling)


@dataclass
class OptimConfig:
    name: OptimName = OptimName.adamw  # the optimizer (trainer/optim/registry.py knows its state per parameter)
    lr: float = 5e-5
    weight_decay: float = 0.01  # not applied to biases and norm weights
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = 1e-8  # adamw, adagrad, rmsprop: added to the denominator
    momentum: float = 0.0  # sgd, rmsprop: momentum factor (configs/optim/sgd.yaml sets 0.9)
    nesterov: bool = False  # sgd: Nesterov momentum (needs momentum > 0)
    alpha: float = 0.99  # rmsprop: smoothing constant of the squared-gradient average
    beta2_decay: float = -0.8  # adafactor: the second moment's decay rate is 1 - step^beta2_decay
    clip_threshold: float = 1.0  # adafactor: clipping threshold d of the update's RMS
    warmup_ratio: float = 0.0  # fraction of the steps with linear warmup
    schedule: Schedule = Schedule.linear
    max_grad_norm: float | None = 1.0  # null disables clipping


@dataclass
class LauncherConfig:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int | None = None  # only for static rendezvous; null lets c10d assign it
    rdzv_endpoint: str | None = None  # host:port of the rendezvous, required when nnodes > 1
    rdzv_id: str | None = None  # same on every node of one job; null = derived from run.dir
    max_restarts: int = 0  # restarts of the worker group after a failure (resumes from the last checkpoint)
    join_timeout_s: float = 600  # multi-node: seconds for every node to join (at start, after a failure)
    # fork: workers are forked from the launcher, which imported torch and transformers once (seconds faster
    # per start); exec: each worker is a fresh `python -m distrain.trainer.worker` (torchrun's --module);
    # auto: fork, unless the workers use CUDA (a process forked after the launcher queried CUDA cannot use it)
    start_method: StartMethod = StartMethod.auto
    monitor_interval: float = 0.1  # seconds between the agent's checks of its workers (torchrun's default)
    collective_timeout_s: float = 600  # a rank with no progress (or a collective) for this long fails the run
    threads_per_process: int | None = None  # torch threads per worker; null = CPU cores / nproc_per_node
    preempt_signal: str = "USR1"  # asks for a checkpoint and a stop (e.g. #SBATCH --signal=USR1@120); so does TERM
    requeue: bool = True  # under SLURM, requeue the job after such a stop (scontrol requeue)


@dataclass
class TrainLoopConfig:
    micro_batch_size: int = 16  # per rank, per forward pass
    grad_accum_steps: int = 1
    epochs: int = 3
    max_steps: int | None = None  # when set, overrides epochs
    stop_at_step: int | None = None  # end this run after step N with a checkpoint; rerun to resume
    log_every: int = 10
    eval_every: int = 0  # steps between dev evaluations; 0 = at the end of every epoch
    eval_at_start: bool = False  # also evaluate before the first step (a baseline for fine-tuning)
    eval_batch_size: int | None = None  # default 2 x micro_batch_size
    save_every: int = 0  # steps between checkpoints; 0 = only on a new best and at the end
    keep_last: int = 2  # newest checkpoints kept, besides the best
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    max_nonfinite_steps: int = 3  # steps in a row with a non-finite loss or gradient norm (skipped) before "diverged"
    export_weights: ExportWeights = ExportWeights.best  # weights put in export/: best dev metric or last step
    seed: int = 0
    device: Device = Device.auto
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    compile: bool = False  # torch.compile each block (off by default: no gain on CPU, a long first step)
    profile_steps: list[int] | None = None  # [first, last]: record these steps with torch.profiler on every rank


@dataclass
class CheckpointConfig:
    """Where a run starts from, besides its own newest checkpoint."""

    step: int | None = None  # resume from this step's checkpoint of the run dir instead of the newest
    init_from: str | None = None  # a fresh run starts with these weights (a run dir, checkpoint or export)
    # with init_from: take the body's weights only and start the task head afresh (seeded): transfer from a run on
    # another label set (CoNLL-2003's 9 tags to WNUT-16's 21). ner and classify only
    new_head: bool = False


@dataclass
class DistillConfig:
    """Knowledge distillation: the student (the run's model) also learns the teacher's softened outputs."""

    teacher: str | None = None  # a distrain run dir, checkpoint or export, or a Hugging Face folder; null = off
    alpha: float = 0.5  # loss = (1 - alpha) * hard loss + alpha * temperature^2 * KL(teacher || student)
    temperature: float = 2.0  # both distributions are softmax(logits / temperature) in the soft loss
    # weight of the hidden-state loss: per target token, the mean over mapped layers of the mean squared difference
    # of the student's and teacher's block outputs (same hidden size); 0 = off. Token targets only (not classify)
    hidden_weight: float = 0.0
    # the teacher block each student block learns from (0-based); null: model.keep_layers for a student built from
    # the teacher, else evenly spaced (student block j of n -> teacher block (j + 1) * m // n - 1)
    layers: list[int] | None = None


@dataclass
class DpoConfig:
    """Preference tuning (task=dpo): the sigmoid DPO loss against a frozen reference model."""

    beta: float = 0.1  # the loss is -log sigmoid(beta * (policy - reference log-ratio of chosen minus rejected))
    reference: str | None = None  # a run dir, checkpoint, export or HF folder; null = the starting weights


@dataclass
class TensorBoardConfig:
    flush_secs: int = 30  # seconds between writes of the event file


@dataclass
class MLflowConfig:
    tracking_uri: str | None = None  # any URI MLflow accepts; null = sqlite:///<runs root>/mlflow.db
    experiment: str | None = None  # null = run.name


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline  # online needs network and `wandb login`
    project: str | None = None  # null = run.name
    entity: str | None = None


@dataclass
class LoggerConfig:
    """The trackers a run writes to besides metrics.jsonl; an option of the `logger` group fills its entry."""

    tensorboard: TensorBoardConfig | None = None
    mlflow: MLflowConfig | None = None
    wandb: WandbConfig | None = None


@dataclass
class SweepConfig:
    """A hyper-parameter search (hparams_search=...): distrain's Optuna sweeper (trainer/search)."""

    params: dict[str, str] = field(default_factory=dict)  # the space: key -> interval(a, b), choice(...), ...
    sampler: SamplerName = SamplerName.tpe
    pruner: PrunerName = PrunerName.none  # stops hopeless trials at their dev evaluations (status "pruned")
    n_trials: int = 10  # finished (complete or pruned) trials the study reaches, across reruns
    n_jobs: int = 1  # trials at once: local child processes splitting the cores, or SLURM jobs
    seed: int = 0  # the sampler's seed
    n_startup_trials: int = 5  # random trials before TPE/CMA-ES model the results; trials before pruning starts
    min_resource: int | None = None  # asha: step of its first rung; null = train.eval_every (Optuna's estimate if 0)
    max_failures: int = 3  # failed trials (not pruned) in one invocation before the sweep gives up
    study_name: str = "study"  # the study in the storage; a rerun with the same name continues it
    # null: SQLite file <sweep dir>/study.db; journal: Optuna's journal file <sweep dir>/study.journal (NFS);
    # journal:PATH: a journal file elsewhere; any other value: an RDB URL (postgresql://..., mysql://...)
    storage: str | None = None
    trial: int | None = None  # set by the sweeper for each trial's run: its number in the study (pruning reports)


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = MISSING  # the run directory; a rerun in the same directory resumes


@dataclass
class DistrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    run: RunConfig = field(default_factory=RunConfig)


def register_configs() -> None:
    """Register the schema so that configs/train.yaml composes on top of it (`defaults: [distrain_schema]`)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="distrain_schema", node=DistrainConfig)


def load_run_config(path: str | Path) -> DictConfig:
    """Load a resolved config.yaml onto the schema, so workers and `distrain eval` get typed values."""
    schema = OmegaConf.structured(DistrainConfig)
    return OmegaConf.merge(schema, OmegaConf.load(path))
