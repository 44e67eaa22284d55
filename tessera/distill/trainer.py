"""The distillation loop: a frozen teacher, a student, one KD loss, and exact resumption.

`distill(config)` runs a whole `RunConfig` and returns its report:

1. check the output directory (a different run there is an error; the same run resumes),
   the corpus and the teacher, before any heavy work;
2. load the teacher (frozen: eval mode, no gradients), build the student
   (`tessera.distill.student`), tokenize and pack the corpus (`tessera.data`);
3. with several ranks (`torchrun`), shard the student (and optionally the teacher) with
   FSDP2 via `tessera.parallel.parallelize`; optionally checkpoint activations and
   `torch.compile` each layer; build AdamW with linear warmup and a cosine decay;
4. resume from the newest good checkpoint if there is one (`checkpointing.find_latest`);
5. evaluate on held-out sequences, train for `max_steps` optimizer steps (each one
   global batch, as gradient-accumulated micro-batches), evaluate and checkpoint as
   configured, stop cleanly on SIGTERM/SIGINT (after the current step, with a checkpoint);
6. evaluate again, write the student as an HF directory (`output_dir/student`), and
   `report.json`, `metrics.csv`, `eval.csv` and `loss_curve.png` beside it.

Every micro-batch loss is normalised by the token counts of the whole global batch (added
over micro-batches and ranks), so k accumulated micro-batches give the gradient of the one
big batch, and N ranks give the gradient of one process. Packed documents do not attend to
each other (see `evaluate.run_batch`). On CUDA the forward runs under bf16 autocast; the
student's master weights and the optimizer stay in float32. A hard-label-only run
(`kd_weight 0`, no hidden matching) skips the teacher's forward pass in training.

The KD (+ CE) term runs through one call, `registry.get("fused_linear_kd_loss", device)`
(the LM heads applied inside the loss: the Triton kernel on CUDA, its torch reference on
CPU), or on whole logits through `distill_loss`, as `loss.fused` says; its default `auto`
fuses on CUDA with unsharded models (`uses_fused_loss`). Setup logs the path taken.

One optimizer step syncs the device with the host once, deliberately, to log its loss.
"""

from __future__ import annotations

import gc
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.distill import checkpointing as ckpt
from tessera.distill.evaluate import eval_batches, evaluate, flat_view, open_split, run_batch
from tessera.distill.hidden import HiddenStateMatcher
from tessera.distill.losses import FUSED_AUTO, LossParts, distill_loss_parts
from tessera.distill.report import (
    REPORT,
    ScalarLog,
    format_comparison,
    plot_loss_curve,
    write_json_atomic,
)
from tessera.distill.run_config import (
    NON_IDENTITY_KEYS,
    RunConfig,
    TrainerConfig,
    run_fingerprint,
)
from tessera.distill.student import (
    build_student,
    describe_counts,
    parameter_counts,
    resolve_student_config,
)
from tessera.errors import ConfigError, DataError
from tessera.kernels import registry
from tessera.kernels.fused_kd_loss import FUSED_LOSSES
from tessera.parallel import fsdp

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
STUDENT_DIR = "student"
FUSED_LOSS_OP = "fused_linear_kd_loss"  # registered by tessera.kernels.fused_kd_loss
Echo = Callable[[str], None]


@dataclass
class Run:
    """Everything the loop needs, set up once."""

    config: RunConfig
    env: fsdp.DistributedEnv
    out: Path
    teacher: Any  # LoadedModel
    student: nn.Module
    student_config: Any  # ModelConfig
    layers: list[int] | None
    matcher: HiddenStateMatcher | None
    trainable: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: Any  # SequenceSampler
    train_data: Any  # PackedSequences
    val_batches: list
    counts: dict[str, Any]
    step: int = 0
    history: dict[str, Any] = field(default_factory=lambda: {
        "evals": [], "train_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0, "tokens": 0})
    log: ScalarLog | None = None

    @property
    def device(self) -> torch.device:
        return self.env.device


# --------------------------------------------------------------------------- entry point
def distill(config: RunConfig, *, echo: Echo = print) -> dict[str, Any]:
    """Run (or resume) the distillation `config` describes; returns the report."""
    try:
        return _distill(config, echo)
    finally:
        # NOTE: the sharded models hold the process group through reference cycles; freed
        # here, its worker threads stop while the interpreter is whole. Left to the
        # interpreter's exit, a gloo rank sometimes aborted there ("terminate called
        # without an active exception").
        gc.collect()


def _distill(config: RunConfig, echo: Echo) -> dict[str, Any]:
    started = time.perf_counter()
    env = fsdp.init_distributed(config.trainer.device)
    say = echo if env.is_main else (lambda _msg: None)
    stop = StopFlag()
    try:
        out = check_output_dir(config)
        preflight_corpus(config)
        run = setup(config, env, out, say)
        record_run(config, env, out)
        run.history.setdefault("setup_s", time.perf_counter() - started)
        resume(run, say)
        stop.install()
        result = train_and_finish(run, stop, say, started)
        fsdp.barrier()  # every rank is done before any leaves the process group
        return result
    finally:
        stop.restore()
        fsdp.shutdown()


# --------------------------------------------------------------------------- preflight
def check_output_dir(config: RunConfig) -> Path:
    """Refuse an output directory that holds another run or something else (read-only)."""
    out = Path(config.output_dir)
    run_file = out / RUN_FILE
    if run_file.exists():
        previous = _read_run_file(run_file)
        if previous.get("fingerprint") != run_fingerprint(config):
            changed = config_diff(previous.get("config", {}), config.to_dict())
            raise ConfigError(
                f"output_dir {out} holds a different run (it differs in: "
                f"{', '.join(changed) or 'the config format'}); choose another output_dir, "
                "or delete that directory to start over")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"output_dir {out} exists, is not empty and holds no Tessera run "
                          f"({RUN_FILE}); choose another output_dir")
    return out


def record_run(config: RunConfig, env: fsdp.DistributedEnv, out: Path) -> None:
    """Claim the output directory for this run, once everything has been checked."""
    run_file = out / RUN_FILE
    fsdp.barrier()
    if env.is_main and not run_file.exists():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_file, {"fingerprint": run_fingerprint(config),
                                     "config": config.to_dict()})
    fsdp.barrier()


def _read_run_file(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); delete the directory or choose "
                          "another output_dir") from None


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ (ignoring keys that do not define the run)."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    keys = sorted(set(flat_old) | set(flat_new))
    return [k for k in keys if flat_old.get(k) != flat_new.get(k) and
            not any(k == skip or k.startswith(skip + ".") for skip in NON_IDENTITY_KEYS)]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value, sort_keys=True, default=str)
    return out


def preflight_corpus(config: RunConfig) -> None:
    """Fail fast on a corpus with no files, or no document in the train or val split."""
    from tessera.data import iter_documents

    data = config.data
    for split in ("train", "val"):
        docs = iter_documents(data.corpus, text_field=data.text_field, split=split,
                              val_fraction=data.val_fraction)
        if next(docs, None) is None:
            raise DataError(f"corpus {data.corpus} has no non-empty document in the {split} "
                            f"split (val_fraction={data.val_fraction}); add text or change "
                            "data.val_fraction")


# --------------------------------------------------------------------------- setup
def setup(config: RunConfig, env: fsdp.DistributedEnv, out: Path, say: Echo) -> Run:
    tc = config.trainer
    seed_everything(tc.seed)
    teacher = load_teacher(config.teacher, env.device)
    student_config, _layers = resolve_student_config(config.student, teacher.config)
    student, layers = build_student(config.student, teacher.model, seed=tc.seed,
                                    device=env.device)
    if not tc.train_embeddings:  # tied models freeze their LM head with it
        student.model.embed_tokens.weight.requires_grad_(False)
    counts = {"teacher": parameter_counts(teacher.model), "student": parameter_counts(student)}
    say(describe_counts(f"teacher {config.teacher}", counts["teacher"]))
    say(describe_counts(f"student ({_describe_student(layers)})", counts["student"]))
    train_data, val_batches = open_data(config, teacher.tokenizer, env)
    sampler = make_sampler(config, len(train_data), env)
    matcher = make_matcher(config, student_config, teacher.config, env.device)
    prepare_models(teacher.model, student, matcher, tc, env)
    trainable = nn.ModuleDict({"student": student} | ({"matcher": matcher} if matcher else {}))
    optimizer = make_optimizer(trainable, tc)
    scheduler = make_scheduler(optimizer, tc)
    run = Run(config=config, env=env, out=out, teacher=teacher, student=student,
              student_config=student_config, layers=layers, matcher=matcher,
              trainable=trainable, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
              train_data=train_data, val_batches=val_batches, counts=counts)
    say(f"loss: {describe_loss_path(run)}")
    return run


def _describe_student(layers: list[int] | None) -> str:
    if layers is None:
        return "fresh"
    return f"teacher layers {layers}"


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def load_teacher(source: str, device: torch.device) -> Any:
    """The teacher as a frozen `LoadedModel` (bf16 on CUDA, float32 elsewhere)."""
    import tessera

    teacher = tessera.load(source, device=device)
    if teacher.tokenizer is None:
        raise ConfigError(f"teacher {source} has no tokenizer; distillation reads the corpus "
                          "with the teacher's tokenizer (add tokenizer.json to the directory)")
    teacher.model.requires_grad_(False).eval()
    return teacher


def open_data(config: RunConfig, tokenizer: Any, env: fsdp.DistributedEnv
              ) -> tuple[Any, list]:
    data = config.data
    options = {"seq_len": data.seq_len, "val_fraction": data.val_fraction,
               "text_field": data.text_field, "shard_dir": data.shard_dir,
               "document_masking": data.document_masking, "num_workers": data.num_workers,
               "is_main": env.is_main}
    train = open_split(data.corpus, tokenizer, "train", **options)
    val = open_split(data.corpus, tokenizer, "val", **options)
    batches = eval_batches(val, config.eval.num_sequences, config.eval.micro_batch_size,
                           rank=env.rank, world_size=env.world_size)
    return train, batches


def make_sampler(config: RunConfig, num_sequences: int, env: fsdp.DistributedEnv) -> Any:
    from tessera.data import SequenceSampler

    tc = config.trainer
    return SequenceSampler(num_sequences, global_batch_size=tc.global_batch_size,
                           micro_batch_size=tc.micro_batch_size, world_size=env.world_size,
                           rank=env.rank, seed=tc.seed, shuffle=tc.shuffle)


def make_matcher(config: RunConfig, student_config: Any, teacher_config: Any,
                 device: torch.device) -> HiddenStateMatcher | None:
    loss = config.loss
    if loss.hidden_weight == 0:
        return None
    for s, t in loss.layer_map.items():
        if s > student_config.num_layers or t > teacher_config.num_layers:
            raise ConfigError(f"loss.layer_map {s}: {t} is outside the student's 0.."
                              f"{student_config.num_layers} or the teacher's 0.."
                              f"{teacher_config.num_layers} hidden states")
    return HiddenStateMatcher(student_config.hidden_size, teacher_config.hidden_size,
                              loss.layer_map, loss.hidden_kind).to(device)


def prepare_models(teacher: nn.Module, student: nn.Module, matcher: nn.Module | None,
                   tc: TrainerConfig, env: fsdp.DistributedEnv) -> None:
    """Activation checkpointing, compilation, then FSDP sharding (in that order). With
    several ranks everything trained is sharded (the student, and the hidden-state
    projections when there are any), so every gradient is averaged over ranks."""
    if tc.activation_checkpointing:
        fsdp.apply_activation_checkpointing(student)
    if tc.compile:
        for layer in [*student.model.layers, *teacher.model.layers]:
            layer.compile()
    if env.is_distributed:
        mesh = fsdp.make_mesh(env)
        fsdp.parallelize(student, mesh)
        if tc.teacher_sharding == "shard":
            fsdp.parallelize(teacher, mesh)
        if matcher is not None and next(matcher.parameters(), None) is not None:
            fsdp.shard_whole(matcher, mesh)


def make_optimizer(module: nn.Module, tc: TrainerConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, biases) do not."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    other = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay},
              {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)


def lr_factor(step: int, tc: TrainerConfig) -> float:
    """Linear warmup over `warmup_steps`, then a cosine from 1 down to `min_lr_ratio`."""
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    span = max(tc.max_steps - tc.warmup_steps - 1, 1)
    progress = min((step - tc.warmup_steps) / span, 1.0)
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, tc: TrainerConfig
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, tc))


# --------------------------------------------------------------------------- resume
def resume(run: Run, say: Echo) -> None:
    """Load the newest good checkpoint, if any, and open the scalar logs accordingly."""
    root = run.out / CHECKPOINTS
    path = fsdp.broadcast_object(ckpt.find_latest(root, warn=say) if run.env.is_main else None)
    if path is not None:
        state = ckpt.load_checkpoint(path, run.trainable, run.optimizer)
        if state.get("run_fingerprint") != run_fingerprint(run.config):
            raise ConfigError(f"checkpoint {path} belongs to a different run")
        run.scheduler.load_state_dict(state["scheduler"])
        run.sampler.load_state_dict(state["sampler"])
        run.step, run.history = state["step"], state["history"]
        if state["rng"] is not None:
            ckpt.restore_rng(state["rng"])
        say(f"resumed from {path} (step {run.step})")
    if run.env.is_main:
        run.log = ScalarLog(run.out, resume_step=run.step if path is not None else None,
                            tensorboard=run.config.trainer.tensorboard, note=say)


def save(run: Run) -> Path:
    started = time.perf_counter()
    state = {"run_fingerprint": run_fingerprint(run.config),
             "scheduler": run.scheduler.state_dict(), "sampler": run.sampler.state_dict(),
             "history": run.history}
    path = ckpt.save_checkpoint(run.out / CHECKPOINTS, run.step, run.trainable, run.optimizer,
                                state, keep_last=run.config.trainer.keep_last)
    run.history["checkpoint_s"] += time.perf_counter() - started
    return path


# --------------------------------------------------------------------------- one step
def autocast_for(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext


def global_counts(batches: list, device: torch.device) -> torch.Tensor:
    """float32 `[2]`: masked tokens and masked tokens with a label, over micro-batches
    and ranks (the loss denominators of the whole global batch)."""
    counts = torch.zeros(2, dtype=torch.float32, device=device)
    for batch in batches:
        counts[0] += batch.loss_mask.sum()
        counts[1] += (batch.loss_mask & (batch.labels != -100)).sum()
    return fsdp.all_reduce_sum(counts)


def uses_fused_loss(run: Run) -> bool:
    """Whether the logit loss goes through the fused op FUSED_LOSS_OP (the LM heads applied
    inside the loss, chunk by chunk) rather than through `distill_loss` on whole logits.

    `loss.fused: true` always, `false` never; `auto` on CUDA only: there the op's Triton
    kernel never materialises the `[N, V]` logits; on CPU memory is plentiful and the op's
    torch reference would recompute both heads in the backward pass. Sharded (FSDP) models
    take the same path: their roots keep the LM head whole from the forward to the end of
    the backward (`tessera.parallel.fsdp.parallelize`).
    """
    fused = run.config.loss.fused
    if fused == FUSED_AUTO:
        return run.device.type == "cuda"
    return fused


def describe_loss_path(run: Run) -> str:
    """One line saying how the training loss is computed (logged at setup, in the report)."""
    cfg = run.config.loss
    if not needs_teacher(cfg):
        return "hard-label cross-entropy on whole logits (no teacher forward in training)"
    if not uses_fused_loss(run):
        return f"{cfg.loss} on whole logits (loss.fused={_yaml_value(cfg.fused)})"
    backend = registry.select(FUSED_LOSS_OP, run.device).backend
    line = f"{cfg.loss} through the fused LM head + KD op ({FUSED_LOSS_OP}, {backend} backend)"
    if backend != "torch" and cfg.loss not in FUSED_LOSSES:
        line += f"; the kernel has no {cfg.loss}, the op runs its torch reference"
    return line


def _yaml_value(value: bool | str) -> str:
    return str(value).lower() if isinstance(value, bool) else value


def micro_step(run: Run, batch: Any, counts: torch.Tensor, step: int) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns detached [loss, soft, ce, hidden]."""
    with autocast_for(run.device, run.config.trainer.autocast)():
        if needs_teacher(run.config.loss):
            loss, parts = _distill_loss(run, batch, counts, step)
        else:
            loss, parts = _hard_label_loss(run, batch, counts)
    # FSDP averages gradients over ranks; the loss is already a global mean.
    (loss * run.env.world_size).backward()
    return parts


def needs_teacher(loss: Any) -> bool:
    """A hard-label-only run (kd_weight 0, no hidden matching) trains without the teacher;
    it is still evaluated against it."""
    return loss.kd_weight > 0 or loss.hidden_weight > 0


def _distill_loss(run: Run, batch: Any, counts: torch.Tensor, step: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = run.config.loss
    _ids, _pos, labels, mask = flat_view(batch)
    fused = uses_fused_loss(run)
    s_layers = list(cfg.layer_map) if run.matcher else []
    t_layers = list(cfg.layer_map.values()) if run.matcher else []
    with torch.no_grad():
        t_out = run_batch(run.teacher.model, batch, hidden_layers=t_layers,
                          compute_logits=not fused)
    s_out = run_batch(run.student, batch, hidden_layers=s_layers, compute_logits=not fused)
    kwargs = cfg.loss_kwargs(step, run.config.trainer.max_steps) | {
        "labels": labels, "num_tokens": counts[0], "num_label_tokens": counts[1]}
    parts = logit_loss_parts(run, s_out, t_out, mask, kwargs, fused=fused)
    loss, hidden = parts.loss, torch.zeros((), device=run.device)
    if run.matcher is not None:
        share = mask.sum() / counts[0].clamp_min(1)  # local mean -> global mean
        hidden = run.matcher(s_out.hidden_states, t_out.hidden_states, mask) * share
        loss = loss + cfg.hidden_weight * hidden
    return loss, torch.stack([loss.detach(), parts.soft, parts.ce, hidden.detach()]).float()


def logit_loss_parts(run: Run, s_out: Any, t_out: Any, mask: torch.Tensor,
                     kwargs: dict[str, Any], *, fused: bool) -> LossParts:
    """The KD (+ hard-label CE) term of one micro-batch from the student's and the teacher's
    `ModelOutput`s: through FUSED_LOSS_OP (from their last hidden states and LM head
    weights; the Triton kernel on CUDA, its torch reference elsewhere) or through
    `distill_loss_parts` (from their logits). Both take the same options and reduce by the
    global batch's token counts given in `kwargs` (`num_tokens`, `num_label_tokens`), so
    they return the same loss and gradients up to rounding."""
    if not fused:
        return distill_loss_parts(s_out.logits, t_out.logits, mask, **kwargs)
    op = registry.get(FUSED_LOSS_OP, run.device)
    return op(s_out.last_hidden, run.student.lm_head.weight, mask,
              teacher_hidden=t_out.last_hidden,
              teacher_lm_head_weight=run.teacher.model.lm_head.weight, **kwargs)


def _hard_label_loss(run: Run, batch: Any, counts: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """ce_weight * cross-entropy on the next tokens, a mean over the global batch."""
    _ids, _pos, labels, mask = flat_view(batch)
    logits = run_batch(run.student, batch).logits
    valid = (mask & (labels != -100)).reshape(-1)
    rows = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                           torch.where(valid, labels.reshape(-1), 0), reduction="none")
    ce = torch.where(valid, rows, torch.zeros_like(rows)).sum() / counts[1].clamp_min(1)
    loss = run.config.loss.ce_weight * ce
    zero = torch.zeros((), device=run.device)
    return loss, torch.stack([loss.detach(), zero, ce.detach(), zero]).float()


def train_step(run: Run) -> dict[str, float]:
    """One optimizer step over the next global batch."""
    started = time.perf_counter()
    indices = run.sampler.next_step()
    batches = [run.train_data.batch(ix).to(run.device) for ix in indices]
    counts = global_counts(batches, run.device)
    totals = torch.zeros(4, device=run.device)
    for index, batch in enumerate(batches):
        fsdp.set_accumulating(run.trainable.values(), index < len(batches) - 1)
        totals += micro_step(run, batch, counts, run.step)
    fsdp.all_reduce_sum(totals)
    params = [p for p in run.trainable.parameters() if p.requires_grad]
    max_norm = run.config.trainer.grad_clip or float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    num_tokens = sum(b.input_ids.numel() for b in batches) * run.env.world_size
    values = totals.tolist()  # NOTE: the one deliberate device->host sync of a step
    elapsed = time.perf_counter() - started
    return {"loss": values[0], "soft": values[1], "ce": values[2], "hidden": values[3],
            "lr": lr, "grad_norm": _to_float(grad_norm), "tokens": num_tokens,
            "temperature": run.config.loss.temperature_at(run.step, run.config.trainer.max_steps),
            "step_s": elapsed, "tokens_per_s": num_tokens / elapsed}


def _to_float(value: torch.Tensor) -> float:
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


# --------------------------------------------------------------------------- loop
def run_eval(run: Run, tag: str) -> dict[str, Any]:
    started = time.perf_counter()
    metrics = evaluate(run.student, run.val_batches, teacher=run.teacher.model,
                       device=run.device, chunk_size=run.config.loss.chunk_size,
                       autocast=autocast_for(run.device, run.config.trainer.autocast))
    run.history["eval_s"] += time.perf_counter() - started
    record = {"step": run.step, "tag": tag, **metrics}
    run.history["evals"].append(record)
    if run.log is not None:
        run.log.log_eval(run.step, {k: v for k, v in metrics.items()})
    return record


def train_and_finish(run: Run, stop: StopFlag, say: Echo, started: float) -> dict[str, Any]:
    tc = run.config.trainer
    if run.step >= tc.max_steps and (run.out / REPORT).exists():
        say(f"run in {run.out} is already complete ({run.step} steps)")
        report = json.loads((run.out / REPORT).read_text())
        say(comparison_table(report["metrics"]))
        return report
    if not run.history["evals"]:
        say(f"evaluating the student at init on {len(run.val_batches)} held-out batches ...")
        run_eval(run, "init")
    stopped = train_loop(run, stop, say)
    if stopped is not None:
        path = save(run)
        say(f"stopped by {stopped} after step {run.step}; checkpoint saved to {path}. "
            "Run the same command again to resume.")
        return {"status": "interrupted", "step": run.step, "checkpoint": str(path)}
    return finish(run, say, started)


def train_loop(run: Run, stop: StopFlag, say: Echo) -> str | None:
    """Steps until `max_steps`; returns the signal name if stopped early, else None."""
    tc = run.config.trainer
    bar = _progress_bar(run)
    while run.step < tc.max_steps:
        stats = train_step(run)
        run.step += 1
        run.history["train_s"] += stats["step_s"]
        run.history["tokens"] += stats["tokens"]
        _log_step(run, stats, bar)
        if tc.eval_every and run.step % tc.eval_every == 0 and run.step < tc.max_steps:
            record = run_eval(run, f"step {run.step}")
            bar.write(f"step {run.step}: held-out ppl {record['ppl']:.3f}, "
                      f"agreement {100 * record['agreement']:.1f}%") if bar else None
        signal_name = stop.agreed(run.device)
        if signal_name is not None:
            bar.close() if bar else None
            return signal_name
        if tc.checkpoint_every and run.step % tc.checkpoint_every == 0:
            save(run)
    bar.close() if bar else None
    return None


def _progress_bar(run: Run):
    if not (run.env.is_main and run.config.trainer.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=run.config.trainer.max_steps, initial=run.step, unit="step",
                desc="distill", dynamic_ncols=True)


def _log_step(run: Run, stats: dict[str, float], bar) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{stats['tokens_per_s']:.0f}")
    if run.log is not None and (run.step % run.config.trainer.log_every == 0
                                or run.step == run.config.trainer.max_steps):
        run.log.log(run.step, stats)


# --------------------------------------------------------------------------- finish
def finish(run: Run, say: Echo, started: float) -> dict[str, Any]:
    if not (run.history["evals"] and run.history["evals"][-1]["step"] == run.step):
        say("evaluating the trained student ...")
        run_eval(run, "final")
    saved = ckpt.list_checkpoints(run.out / CHECKPOINTS) if run.env.is_main else []
    if fsdp.broadcast_object(not saved or saved[-1][0] != run.step):
        save(run)
    student_dir = save_student(run)
    report = None
    if run.env.is_main:
        report = build_report(run, student_dir, time.perf_counter() - started)
        write_json_atomic(run.out / REPORT, report)
        plot_loss_curve(run.out, note=say)
        run.log.close()
        say(comparison_table(report["metrics"]))
        say(f"student written to {student_dir}; report in {run.out / REPORT}")
    return fsdp.broadcast_object(report)


def save_student(run: Run) -> Path:
    """The trained student as an HF directory (tokenizer and chat template included)."""
    import tessera
    from tessera.checkpoint.loader import LoadedModel
    from tessera.model.transformer import build_model

    model = run.student
    if fsdp.is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        model = build_model(run.student_config, init=False)
        if run.env.is_main:
            result = model.load_state_dict(state, strict=False)  # a tied head comes once
            assert set(result.missing_keys) <= {"lm_head.weight"}, result.missing_keys
            model.tie_weights()
    path = run.out / STUDENT_DIR
    if run.env.is_main:
        loaded = LoadedModel(model=model, tokenizer=run.teacher.tokenizer,
                             config=run.student_config, source=str(path))
        tessera.save(loaded, path)
    fsdp.barrier()
    return path


def build_report(run: Run, student_dir: Path, total_s: float) -> dict[str, Any]:
    evals = run.history["evals"]
    before, after = evals[0], evals[-1]
    train_s = run.history["train_s"]
    return {
        "status": "complete",
        "config": run.config.to_dict(),
        "run_fingerprint": run_fingerprint(run.config),
        "teacher": {"source": run.config.teacher, "parameters": run.counts["teacher"]},
        "student": {"layers": run.layers, "config": run.student_config.to_dict(),
                    "parameters": run.counts["student"], "output": str(student_dir)},
        "metrics": {"before": _student_metrics(before), "after": _student_metrics(after),
                    "teacher": _teacher_metrics(after), "history": evals},
        "steps": run.step,
        "tokens_seen": run.history["tokens"],
        "world_size": run.env.world_size,
        "device": str(run.device),
        "loss_path": describe_loss_path(run),
        "torch": torch.__version__,
        "timings": {"setup_s": run.history.get("setup_s"), "train_s": train_s,
                    "eval_s": run.history["eval_s"],
                    "checkpoint_s": run.history["checkpoint_s"], "total_s": total_s,
                    "train_tokens_per_s": run.history["tokens"] / train_s if train_s else None},
    }


def _student_metrics(record: dict[str, Any]) -> dict[str, Any]:
    return {"step": record["step"], "ppl": record["ppl"], "kl": record["kl"],
            "agreement": record["agreement"], "tokens": record["tokens"]}


def _teacher_metrics(record: dict[str, Any]) -> dict[str, Any]:
    return {"ppl": record["teacher_ppl"], "kl": None, "agreement": None,
            "tokens": record["tokens"]}


def comparison_table(metrics: dict[str, Any]) -> str:
    before, after = metrics["before"], metrics["after"]
    rows = [("student at init", before), (f"student after {after['step']} steps", after),
            ("teacher", metrics["teacher"])]
    return "held-out evaluation:\n" + format_comparison(rows)


# --------------------------------------------------------------------------- signals
class StopFlag:
    """SIGTERM/SIGINT ask the loop to stop after the current step (a second SIGINT
    interrupts at once)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> str | None:
        """The signal name if any rank was signalled (all ranks stop at the same step)."""
        if not fsdp.is_multiprocess():
            return self.signal_name
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        if fsdp.all_reduce_sum(flag).item() == 0:
            return None
        return self.signal_name or "a signal to another rank"
