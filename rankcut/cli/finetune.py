"""``rankcut finetune``: train a checkpoint on labelled data and/or a teacher's outputs; keep its structure."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Optional

import typer
from rich.table import Table

from rankcut import dist
from rankcut.files.checkpoint import CheckpointMeta, load_with_meta
from rankcut.cli.console import Reporter
from rankcut.run.data import folder_classes, open_data, subset
from rankcut.run.evaluate import check_dataset_labels, check_peer, output_classes
from rankcut.files.fileio import check_output
from rankcut.run.train import DEFAULT_WARMUP, TrainConfig, fit, saver, schedule
from rankcut.cli.options import BatchSize, Checkpoint, Data, Device, Force, Json, Output, Quiet, Samples, Seed, Workers


def _record_classes(meta: CheckpointMeta, train_set, classes: int) -> CheckpointMeta:
    """The checkpoint learns its class names from the ImageFolder it is trained on, when it has none yet."""
    names = folder_classes(train_set)
    if meta.classes is None and names is not None and len(names) == classes:
        return meta.with_classes(names)
    return meta


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def finetune(
    checkpoint: Checkpoint,
    data: Data,
    output: Output,
    epochs: Annotated[int, typer.Option("--epochs", "-e", help="Passes over the training data.")] = 1,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (after warm-up; cosine decay to 0).")] = 1e-3,
    optimizer: Annotated[str, typer.Option("--optimizer", help="sgd or adamw.")] = "adamw",
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum, or AdamW's beta1.")] = 0.9,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="Decay of weights (not biases or norms).")] = 0.0,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Label smoothing of the cross-entropy.")] = 0.0,
    warmup: Annotated[float, typer.Option("--warmup", help="Linear warm-up, as a fraction of all optimiser steps (AdamW's first steps move every weight by about --lr).")] = DEFAULT_WARMUP,
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="Distil from this checkpoint (same input, same classes).")] = None,
    kd_alpha: Annotated[Optional[float], typer.Option("--kd-alpha", help="Weight of the distillation loss (default 0.5 with --teacher; 1: labels not needed).")] = None,
    kd_temperature: Annotated[float, typer.Option("--kd-temperature", help="Softmax temperature of distillation.")] = 2.0,
    amp: Annotated[bool, typer.Option("--amp", help="bf16 autocast (CPU, or a GPU with bf16).")] = False,
    eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="Held-out data: report accuracy after each epoch.")] = None,
    save_every: Annotated[int, typer.Option("--save-every", help="Also write the output every N epochs (0: only at the end).")] = 0,
    samples: Samples = None,
    batch_size: BatchSize = 64,
    workers: Workers = 0,
    device: Device = "auto",
    seed: Seed = 0,
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Fine-tune a checkpoint (or train a freshly initialised one), optionally distilling from a teacher."""
    cfg = TrainConfig(epochs=epochs, lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay,
                      batch_size=batch_size, label_smoothing=label_smoothing, warmup=warmup,
                      kd_alpha=(0.5 if teacher else 0.0) if kd_alpha is None else kd_alpha,
                      kd_temperature=kd_temperature, amp=amp, save_every=save_every, seed=seed, workers=workers)
    check_output(output, [checkpoint, teacher, data, eval_data], force)
    ctx = dist.setup(device)
    try:
        report = Reporter(quiet, json_out, primary=ctx.primary)
        model, meta = load_with_meta(checkpoint, ctx.device)
        classes = output_classes(model, meta.input)
        teacher_model = None
        if teacher is not None:
            teacher_model, teacher_meta = load_with_meta(teacher, ctx.device)
            check_peer(teacher_model, teacher_meta.input, f"the teacher {teacher}", meta.input, classes, "the student")
        train_set = subset(open_data(data, meta.input, train=True, num_classes=classes, seed=seed,
                                     classes=meta.classes), samples, seed)
        meta = _record_classes(meta, train_set, classes)
        check_dataset_labels(train_set, classes, cfg.kd_alpha < 1, f"the training data {data}")
        eval_set = None
        if eval_data is not None:
            eval_set = open_data(eval_data, meta.input, train=False, num_classes=classes, seed=seed,
                                 classes=meta.classes)
            check_dataset_labels(eval_set, classes, False, f"the evaluation data {eval_data}")
        details = {**cfg.to_dict(), "data": data, "samples": len(train_set), "teacher": teacher,
                   "processes": ctx.world}
        with report.progress() as progress:
            summaries = fit(model, train_set, cfg, ctx, classes=classes, teacher=teacher_model, eval_set=eval_set,
                            save=saver(meta, output, details), progress=progress, log=report.log)
    finally:
        dist.teardown(ctx)
    table = Table("epoch", "loss", "train acc", "teacher agr.", "eval top-1", "eval loss", "img/s",
                  title=f"wrote {output}", title_justify="left", caption=schedule(cfg), caption_justify="left")
    for s in summaries:
        table.add_row(str(s.epoch), f"{s.loss:.4f}", _percent(s.acc), _percent(s.agree),
                      _percent(s.eval and s.eval["top1"]),
                      "-" if s.eval is None or s.eval["loss"] is None else f"{s.eval['loss']:.4f}",
                      f"{s.images_per_s:,.0f}")
    report.result({"output": output, "input": checkpoint, "config": details,
                   "epochs": [asdict(s) for s in summaries]}, table)
