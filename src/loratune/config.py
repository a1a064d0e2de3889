"""The typed configuration schema: nested dataclasses, one docstring per field.

A training config (``finetune_lora.py --config``, ``best_config.yaml``) is a ``FinetuneConfig``; an
optimization config is a ``StudyConfig``: the same four sections (the fixed parameters every trial
starts from) plus the study's own fields. ``schema.py`` builds them from YAML (``settings.py``), ``--set``
overrides and API keyword arguments, ``rules.py`` validates them; the config reference (docs/config.md) is
generated from here.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

DEMO_MODEL = "builtin:tiny-qwen2"
DEMO_TRAIN = "builtin:ai_director_train"
DEMO_VALIDATION = "builtin:ai_director_validation"
DEMO_TEST = "builtin:ai_director_test"


@dataclass
class ModelConfig:
    name: str = DEMO_MODEL
    """Hugging Face hub id, local directory, or ``builtin:tiny-qwen2`` (the offline demo model)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; ``auto`` follows the chosen precision (bf16/fp16 on GPU, fp32 on CPU)."""
    trust_remote_code: bool = False
    """Run code shipped with the model repository. Off unless you trust it."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """Load the base model quantized with bitsandbytes (QLoRA): on CUDA GPUs, and on the CPU with bitsandbytes
    0.50 or newer (``pip install 'loratune[quantization]'``); checked before a study starts."""
    gradient_checkpointing: bool = False
    """Trade compute for memory: recompute activations in the backward pass."""


@dataclass
class LoraConfig:
    rank: int = 16
    """LoRA rank r: the width of the low-rank update."""
    alpha: float = 32.0
    """LoRA alpha: the update is scaled by alpha/rank (alpha/sqrt(rank) with rsLoRA)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: ``all-linear`` or a list of names such as ``[q_proj, v_proj]``."""
    use_rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha/sqrt(rank)."""


@dataclass
class DataConfig:
    path: str = DEMO_TRAIN
    """Training data: a .jsonl/.json/.csv/.tsv/.parquet file (UTF-8, with or without a byte-order mark), a
    directory saved with datasets' ``save_to_disk``, a Hugging Face hub dataset id (``org/name``), or
    ``builtin:ai_director_train`` (the demo)."""
    split: str = "train"
    """The split to train on, for a hub dataset or a saved dataset with several splits."""
    subset: str | None = None
    """A hub dataset's named configuration (``load_dataset(path, name=subset)``)."""
    format: Literal["auto", "chat", "instruction", "completion"] = "auto"
    """Row form: chat (``messages``), instruction (``instruction``/``input``/``output``) or
    completion (``prompt``/``completion``); ``auto`` detects it from the columns."""
    columns: dict[str, str] | None = None
    """loratune's column names -> yours, e.g. ``{prompt: question, completion: answer}``."""
    train_on: Literal["all_assistant_turns", "last_assistant_turn"] = "all_assistant_turns"
    """Which assistant messages of a chat the loss covers (each up to its end-of-turn token); nothing
    of system, user or tool messages ever is."""
    validation_split: str | None = None
    """A named split of the same dataset to validate on (e.g. ``test``)."""
    validation_path: str | None = None
    """Validation data in the same form, from a file, directory or hub id; the demo's own with the demo data."""
    validation_size: float = 0.2
    """Held-out share (< 1) or count (>= 1) of the training data when neither a validation split nor a path is given."""
    test_path: str | None = None
    """Test data the search never sees, in the same form (a file, directory or hub id): only the best config and
    the baseline are scored on it, once the study has chosen. The demo's own with the demo data."""
    test_split: str | None = None
    """A named split of the same dataset to test on (e.g. ``test``), instead of ``test_path``."""
    test_size: float = 0
    """Share (< 1) or count (>= 1) of the training rows held out as the test split, drawn from the seed apart from
    the validation rows; 0: none (unless ``test_path`` or ``test_split`` gives one)."""
    max_length: int = 512
    """Longest tokenized example; longer ones are cut at the end. A prompt this long or longer is an error."""
    system_prompt: str | None = None
    """System message put before instruction/completion rows rendered with a chat template."""


EVAL_POINTS, EVAL_POINTS_FOR_EARLY_STOPPING = 5, 10  # curve points when training.eval_points is null


@dataclass
class TrainingConfig:
    epochs: float = 1.0
    """Passes over the training data; fractions such as 0.5 are allowed."""
    learning_rate: float = 2e-4
    """Peak AdamW learning rate."""
    batch_size: int = 1
    """Examples per device per forward pass."""
    gradient_accumulation: int | Literal["auto"] = "auto"
    """Forward passes per optimizer step; ``auto`` keeps batch_size x accumulation at effective_batch_size."""
    effective_batch_size: int = 4
    """Target examples per optimizer step when gradient_accumulation is ``auto``."""
    optimizer: Literal["adamw"] = "adamw"
    """Optimizer (AdamW, decoupled weight decay)."""
    warmup_ratio: float = 0.1
    """Share of optimizer steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """Learning-rate schedule after warmup."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables it)."""
    seed: int = 42
    """Seed for weights of the adapter, data order and the validation split."""
    eval_points: int | None = None
    """Points of the validation curve, evenly spread over training; null: 10 in a study with an early-stopping
    rule (the rules read the curve), else 5."""
    eval_subset: float = 0.25
    """Validation examples for the curve's points before the last: a share (<= 1, at least 8 examples) or a
    count (> 1), drawn once from the seed. The last point, the trial's result, always uses the whole set."""
    eval_batch_size: int = 8
    """Examples per forward pass when computing validation loss."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision; ``auto``: bf16 where the GPU supports it, fp16 with loss scaling otherwise, fp32 on CPU.
    bf16 and fp16 asked for by name run on CPU too (torch's autocast)."""

    def plan(self, n_train: int) -> tuple[int, int, list[int]]:
        """For ``n_train`` training examples: (gradient accumulation, optimizer steps, the steps after which
        the validation curve takes a point)."""
        import math

        accumulation = max(1, self.effective_batch_size // self.batch_size) if self.gradient_accumulation == "auto" \
            else self.gradient_accumulation
        micro_batches = math.ceil(self.epochs * math.ceil(n_train / self.batch_size))
        steps = max(1, math.ceil(micro_batches / accumulation))
        n = self.eval_points or EVAL_POINTS
        return accumulation, steps, sorted({max(1, round(steps * k / n)) for k in range(1, n + 1)})


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output_dir: str = "runs/finetune"
    """Where the adapter and metrics.json go. An existing run there is never overwritten."""
    save_adapter: bool = True
    """Write the trained LoRA adapter (adapter_model.safetensors) to output_dir/adapter."""


SECTIONS = ("model", "lora", "data", "training")


def default_search_space() -> dict:
    """The default search space: rank, alpha, learning rate and batch size as Module 4.5 gives them."""
    return {
        "lora_rank": [8, 16, 32, 64],
        "lora_alpha": [16, 32, 64, 128],
        "learning_rate": [1.0e-5, 5.0e-4],
        "batch_size": [1, 2, 4],
    }


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, flag: str | None = None,
            help: str | None = None, metavar: str | None = None, resume: bool = False) -> Any:
    """A study field that describes itself: its command-line ``flag``, and whether it may change when a study
    ``resume``s: how trials run may, what they measure may not. The flag's help is the first sentence of the
    field's docstring (``flag_help``); only a ``--no-...`` switch, which turns a true default off, says in
    ``help`` what it does. The CLI, the resume policy and the options table (docs/commands.md) are made from it."""
    return field(default=default, default_factory=default_factory,
                 metadata={"flag": flag, "help": help, "metavar": metavar, "resume": resume})


@dataclass
class EarlyStoppingConfig:
    threshold: float | Literal["baseline"] | None = None
    """Stop a trial whose validation loss is above this once it has done ``check_at`` of its training;
    ``baseline``: above the baseline trial's loss at the same point of its training."""
    check_at: float = 0.1
    """Share of training (0, 1] after which the threshold rule is applied."""
    percentile: float | None = None
    """Ax learning-curve stopping: stop a trial whose loss is worse than this percentile of the other
    trials at the same point (e.g. 50). Off when null."""
    min_progression: float = 0.3
    """Share of training a trial must reach before the percentile rule looks at it."""
    min_curves: int = 5
    """Trials with curves at a point needed before the percentile rule compares against them."""


@dataclass
class ScoringConfig:
    scores: list[str] = field(default_factory=list)
    """Task scores of generated answers to compute: built-in ``exact_match``, ``token_f1``, ``rouge_l``,
    ``plan_accuracy`` (the demo's), or the names of ``scorers``. An objective or outcome constraint naming a
    score adds it. Every trial answers the validation prompts greedily and is scored; the best config and
    the baseline are scored on the test split too."""
    scorers: dict[str, str] = field(default_factory=dict)
    """Your own scores: name -> ``package.module:function``, where ``function(prediction, reference)`` returns
    a number (or ``function(predictions, references)`` for a corpus-level score)."""
    subset: int = 64
    """Validation prompts each trial answers and is scored on, drawn once from the seed (all of them when there
    are fewer); 0: none during the search, only the final test."""
    max_new_tokens: int | None = None
    """Longest generated answer; null: the longest reference's length plus a quarter, plus 8 tokens."""


@dataclass
class StudyConfig:
    trials: int = setting(20, flag="--trials", metavar="N")
    """Trials to run in all, the baseline included."""
    seed: int | None = setting(0, flag="--seed", metavar="N")
    """Seed of the search (Ax) and of every trial's training: the same seed gives the same trials and losses on
    one machine with one worker (docs/search.md); null for a random search seed."""
    search_space: dict = field(default_factory=default_search_space)
    """Parameter -> range ``[low, high]`` (floats), choice ``[a, b, c]``, fixed ``[v]``, or a mapping
    ``{low, high, log}`` / ``{values: [...]}``. Names are training-config fields."""
    constraints: list[str] = field(default_factory=list)
    """Parameter constraints, linear or a product: ``lora_rank * batch_size <= 128``."""
    objectives: list[str] = field(default_factory=lambda: ["loss"])
    """Metrics to optimize: loss, inference_time, train_time, peak_memory_gb, trainable_params, or a task score
    (see ``scoring``)."""
    minimize: list[bool] = field(default_factory=lambda: [True])
    """One flag per objective."""
    outcome_constraints: list[str] = field(default_factory=list)
    """Bounds on measured metrics, e.g. ``peak_memory_gb <= 15``."""
    baseline: bool = True
    """Run the current config (the training section's values of the searched parameters) first."""
    init_trials: int | None = None
    """Trials of the initial design (the centre of the space, then Sobol points) before Bayesian
    optimization starts; the baseline comes on top (when it is the centre, the centre is not run twice).
    null: Ax's default, 5."""
    parameterization: Literal["lora", "raw"] = setting("raw", flag="--parameterization", metavar="{lora,raw}")
    """How Ax sees the learning rate: ``lora``, as LoRA's effective step lr x alpha / rank; ``raw``, as written.
    With ``lora`` (alpha / sqrt(rank) with rsLoRA), alpha and rank are searched as base-2 exponents; trials,
    results and plots keep your parameters, and no learning rate outside its bounds is proposed. Where the
    space does not allow ``lora`` (the learning rate is not a range, or alpha and rank are choices that are not
    consecutive powers of two) the study searches as written and says why."""
    warm_start: list[str] = setting(default_factory=list, flag="--warm-start", metavar="DIR[,DIR]")
    """Earlier studies (directories, of the same objectives) whose completed trials Ax learns from before its
    first suggestion. They replace as many points of the initial design, are never run again and are not the
    new study's trials. A trial outside the new search space is left out, and said."""
    workers: int = setting(1, flag="--workers", metavar="N", resume=True)
    """Trials running at once (each gets its own GPU set where there are GPUs)."""
    gpus_per_trial: int = setting(1, flag="--gpus-per-trial", metavar="N", resume=True)
    """GPUs handed to each trial (CUDA_VISIBLE_DEVICES) when the machine has GPUs."""
    gpus: list[str] | None = setting(None, flag="--gpus", metavar="0,1,2,3", resume=True)
    """Which local GPUs trials may use (ids as CUDA_VISIBLE_DEVICES takes them); null: all visible."""
    executor: Literal["local", "ray"] = setting("local", flag="--executor", metavar="{local,ray}", resume=True)
    """Where trials run: child processes here, or Ray actors on a cluster (``pip install 'loratune[ray]'``). It
    may change when a study resumes (a study started here can go on on a cluster): where a trial runs does not
    change what it measures."""
    ray_address: str | None = setting(None, flag="--ray-address", metavar="ADDR", resume=True)
    """Ray cluster to join (e.g. ``ray://head:10001`` or ``auto``); null starts Ray on this machine."""
    shared_dir: str | None = setting(None, flag="--shared-dir", metavar="PATH", resume=True)
    """With Ray: a path every node shares where trials write their files; null ships them back to the driver."""
    reuse_model: bool = setting(True, flag="--no-reuse-model", resume=True,
                                help="a fresh process per trial instead of workers that keep the base model loaded")
    """Each worker keeps the base model loaded and runs trial after trial on it with a fresh adapter
    (same results as a fresh process per trial, without reloading the model); false: a fresh process per trial."""
    pack: int | Literal["auto"] = setting("auto", flag="--pack", metavar="K", resume=True)
    """Trials each worker trains together, in one pass over one loaded base model (``auto``: 4 for a small model
    on the CPU, where it measured faster; else 1). Packed trials each keep their own adapter, optimizer, seed,
    data order and curve, and get the loss they get alone. ``auto`` is 4 where trials train on the CPU and the
    model has under 10M parameters (the demo model's 20-trial study ran in about two thirds of its unpacked
    time, the same best loss; per trial, points chosen four at a time searched worse on one benchmark
    surface), else 1: SmolLM2-135M on a CPU gained nothing, and no GPU has measured it yet (docs/benchmarks.md,
    "Packed trials"). On Ray, each actor trains up to ``pack`` trials together; ``auto`` is 1 there (the nodes'
    devices are not known to the driver). A study of a ``command`` or an ``evaluate=`` function, one without
    ``reuse_model``, or one whose objectives or constraints measure a trial's own time or memory (train_time,
    peak_memory_gb, tokens_per_s) runs one trial per worker, and says so when more were asked for."""
    trials_per_worker: int = setting(50, resume=True)
    """Trials a worker runs before a fresh one replaces it (with ``reuse_model``); a failed trial replaces it at once."""
    max_failures_in_a_row: int = setting(3, resume=True)
    """Stop the study after this many failed trials in a row."""
    keep_adapters: Literal["best", "all", "none"] = setting("best", resume=True)
    """Which trial adapters to keep on disk."""
    retrain_epochs: float = setting(3, resume=True)
    """Epochs written into best_config.yaml for the full retrain."""
    report: bool = setting(True, flag="--no-report", resume=True,
                           help="skip OPTIMIZATION_RESULTS.md at the end (`loratune report` writes it any time)")
    """Write OPTIMIZATION_RESULTS.md and its plots when the study ends."""
    command: str | None = setting(None, flag="--command", metavar="CMD")
    """External training command with {parameter} placeholders (or ``loratune.integrations.trial_params()``); its
    metrics: its last JSON line on stdout, else the last evaluation its trainer's ``LoratuneCallback`` reported
    (which also makes each evaluation a curve point that early stopping judges)."""
    tracking: Literal["none", "mlflow"] = setting("none", flag="--tracking", metavar="{none,mlflow}", resume=True)
    """Log the study to an experiment tracker: ``mlflow``, a parent run and a child run per trial (``pip install
    'loratune[mlflow]'``)."""
    tracking_uri: str | None = setting(None, flag="--tracking-uri", metavar="URI", resume=True)
    """The MLflow tracking URI (a server such as ``http://mlflow.internal:5000``); null: a local store in the
    output directory (``sqlite:///<output>/mlflow.db``, artifacts in ``mlartifacts/``)."""
    tracking_experiment: str = setting("loratune", resume=True)
    """The MLflow experiment the study's runs go to."""
    trial_timeout: float | None = setting(None, flag="--trial-timeout", metavar="SECONDS", resume=True)
    """Seconds a trial may run; a trial still running then is stopped and recorded as failed ("timeout"), and
    the study goes on. Null: no limit."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def base(self) -> FinetuneConfig:
        """The fixed parameters: the training config every trial starts from."""
        return FinetuneConfig(model=self.model, lora=self.lora, data=self.data, training=self.training)


# ---------------------------------------------------------------------------------------------


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def get_field(obj: Any, dotted: str) -> Any:
    """``get_field(cfg, "training.learning_rate")``."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------
# The reference: every field with its type, default and docstring


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls`` (Python keeps none at run time)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def flag_help(f: dataclasses.Field, markdown: bool = False) -> str:
    """The help of a study field's flag: its ``help`` (a ``--no-`` switch), else the first sentence of its
    docstring, with ``code`` as plain text (or as Markdown code): ``--help`` and the options table cannot drift
    from the field's own words."""
    text = f.metadata.get("help")
    if text is None:  # a sentence of the docstring, written as the other options' help: lower case, no full stop
        text = re.split(r"(?<=\.)\s+(?=[A-Z])", field_docs(StudyConfig)[f.name], maxsplit=1)[0].removesuffix(".")
        first = text.split(" ", 1)[0]
        text = text if first in ("Ray", "GPUs", "MLflow") else text[0].lower() + text[1:]
    return text.replace("``", "`" if markdown else "")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def reference_markdown() -> str:
    """The config reference (docs/config.md): one table per section, from the dataclasses themselves."""
    import yaml

    def show(value: Any) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
        return "`" + text.strip().removesuffix("...").strip() + "`"

    parts = []
    sections = [("Study fields (optimization config, top level)", StudyConfig), ("`model`", ModelConfig),
                ("`lora`", LoraConfig), ("`data`", DataConfig), ("`training`", TrainingConfig),
                ("`early_stopping` (optimization config)", EarlyStoppingConfig),
                ("`scoring` (optimization config)", ScoringConfig),
                ("Training config, top level", FinetuneConfig)]
    for title, cls in sections:
        docs = field_docs(cls)
        rows = [f"| `{f.name}` | {show(_default(f))} | {docs.get(f.name, '')} |" for f in dataclasses.fields(cls)
                if not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])]
        parts.append("\n".join([f"**{title}**", "", "| field | default | meaning |", "|---|---|---|", *rows]))
    return "\n\n".join(parts) + "\n"
