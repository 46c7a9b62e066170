"""`edgepipe train`: train a zoo model on bundled or user data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.cli._common import check_outputs, handle_errors
from edgepipe.cli.choices import QatActivations


@handle_errors
def train(
    source: Annotated[Optional[Path], typer.Argument(help="A Hugging Face folder to fine-tune on --data: a classifier "
            "(text or image, with its tokenizer or preprocessor_config.json) or a token classifier (with its "
            "tokenizer) on labelled rows, or a causal language model (with tokenizer.json) on a .txt file. Without it, "
            "--model trains a zoo model from scratch.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Zoo: run directory (writes checkpoint.pt) or a .pt "
            "path. Fine-tuning and tiny-lm: the folder to write (new, or the interrupted one with --resume).")] = ...,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Zoo model: mlp, cnn, lstm or transformer; or "
            "tiny-lm (a 3M-parameter Llama-style language model over bytes, trained on the bundled text and written as "
            "a Hugging Face folder with a tokenizer).")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Zoo: digits, marker, or an .npz with x and y. Default: the "
            "model's usual dataset.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Fine-tuning: labelled rows (CSV/TSV, JSONL, Parquet, a "
            "save_to_disk folder, or an image folder with one subfolder per class; for a token classifier a row's "
            "words and their tags, as lists or space-separated, or a .conll file); without --eval-data 20% of them "
            "(seeded) judge each epoch.")] = None,
    eval_data: Annotated[Optional[Path], typer.Option(help="Fine-tuning: labelled rows that judge each epoch (all of "
            "--data then trains).")] = None,
    input_column: Annotated[Optional[list[str]], typer.Option(help="Fine-tuning: the text column (repeat for a pair), "
            "the words column (token classification) or the image column; default: found by its usual name.")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="Fine-tuning: the label column, or the tags column of a "
            "token classifier (names from config.json's label2id, or ids); default: label, labels, class, ... (tags: "
            "ner_tags, tags, labels, ...)")] = None,
    resume: Annotated[bool, typer.Option(help="Fine-tuning: continue the interrupted run in --output from its last "
                                              "checkpoint.")] = False,
    teacher: Annotated[Optional[Path], typer.Option(help="Distillation: a fine-tuned classifier folder whose logits "
            "the student (FOLDER, or --keep-every's cut of the teacher) learns beside the labels (temperature 2, half "
            "the loss).")] = None,
    keep_every: Annotated[Optional[int], typer.Option(help="Distillation without a student FOLDER: the student is the "
            "teacher with every k-th transformer layer kept (k >= 2), their weights copied.")] = None,
    mlm: Annotated[bool, typer.Option(help="Pre-train FOLDER's encoder as a masked language model on --data, a .txt "
                                           "file with one passage per line (15% of tokens masked); writes the "
                                           "classifier folder again, its encoder pre-trained and its head fresh, ready "
                                           "to fine-tune. FOLDER needs config.json and a tokenizer; without weights "
                                           "the encoder starts from random init.")] = False,
    qat: Annotated[bool, typer.Option(help="Fine-tuning: quantization-aware training. Every Linear and Conv2d trains "
                                           "through INT8 fake quantizers (weights symmetric per channel, inputs per "
                                           "tensor) so the weights settle where INT8 keeps them; judged epochs are "
                                           "simulated INT8. Best started from a fine-tuned folder, for an epoch or two "
                                           "at a low --lr; then export and quantize as usual.")] = False,
    qat_activations: Annotated[Optional[QatActivations], typer.Option(help="QAT: input quantizers zero-point-free INT8 "
            "(symmetric, the layout quantize leads with for transformers) or UINT8 with a zero point (asymmetric, its "
            "default for image models). Default: by the task.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (default: zoo 10, fine-tuning 3).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default: zoo 2e-3 with Adam; fine-tuning 5e-5 "
            "with AdamW, linear warm-up over 10% of the steps, then linear decay).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Mini-batch size (default: zoo 64, fine-tuning "
            "16).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for data split, init and shuffling.")] = 0,
    seconds: Annotated[float, typer.Option(help="tiny-lm: training time in seconds (AdamW, cosine decay to zero at the "
                                                "end).")] = 180.0,
    steps: Annotated[Optional[int], typer.Option(help="tiny-lm: train exactly this many steps instead of --seconds: "
            "the same model on any machine, however loaded (about 0.3 s a step on 2 cores).")] = None,
) -> None:
    """Fine-tune a Hugging Face classifier folder on your labelled rows, or train a zoo model
    from scratch.

    edgepipe train FOLDER --data train.csv -o OUT fine-tunes the folder (AdamW, warm-up and
    decay, gradient clipping, seeded), judges every epoch on held-out rows (accuracy with its
    95% interval; a token classifier's is the share of words tagged right, each word judged by
    its first token), keeps the best epoch and writes a save_pretrained folder with the source's
    tokenizer or image processor, ready for `edgepipe export`. A checkpoint is written every 50
    steps and when the run is interrupted: --resume continues it.

    A causal language model folder fine-tunes on --data text.txt (windows of 128 tokens, one
    in ten held out), judged by next-token accuracy, with perplexity before and after.

    --model trains a zoo model with Adam (seeded) and writes a safe checkpoint (config +
    state_dict, loadable with torch.load(weights_only=True)); it reports held-out accuracy.
    --model tiny-lm trains a small causal LM on Python's documentation texts (shipped with
    Python; one topic in eight held out) and writes a Hugging Face folder (config.json,
    model.safetensors, tokenizer.json) that `edgepipe export` takes; it reports held-out
    perplexity (nats per byte)."""
    from edgepipe.errors import InputError

    if mlm:
        return _pretrain(source, data, output, resume, epochs, lr, batch_size, seed, teacher or keep_every or qat)
    if source is not None and _is_causal_lm(source):
        return _finetune_lm(source, data, output, resume, epochs, lr, batch_size, seed,
                            teacher or keep_every or qat or eval_data)
    if source is not None or teacher is not None:
        if model is not None or dataset is not None:
            raise InputError("give either a folder to fine-tune (with --data) or --model to train from scratch, not "
                             "both")
        if (source is None) == (keep_every is None):
            raise InputError("distillation takes a student FOLDER or --keep-every K (the teacher with every k-th "
                             "layer kept), one of the two")
        return _finetune(source, output, data, eval_data, input_column, label_column, resume, epochs, lr,
                         batch_size, seed, teacher, keep_every, qat, qat_activations and qat_activations.value)
    if keep_every is not None:
        raise InputError("--keep-every cuts a student from --teacher FOLDER")
    if model is None:
        raise InputError("nothing to train: give a Hugging Face folder to fine-tune (edgepipe train FOLDER --data "
                         "rows.csv -o OUT) or --model (mlp, cnn, lstm, transformer, tiny-lm)")
    if data is not None or eval_data is not None or resume or qat:
        raise InputError("--data, --eval-data, --resume and --qat fine-tune a folder: edgepipe train FOLDER --data "
                         "rows.csv "
                         "-o OUT (a zoo model takes --dataset)")
    epochs, lr, batch_size = (10 if epochs is None else epochs), (2e-3 if lr is None else lr), \
        (64 if batch_size is None else batch_size)
    if model == "tiny-lm":
        return _train_lm(output, seconds, seed, steps)
    check_outputs(output if output.suffix in (".pt", ".pth") else output / "checkpoint.pt")
    from edgepipe.models.training import TrainConfig
    from edgepipe.models.training import train as train_stage
    from edgepipe.models.zoo import DEFAULT_DATASET, ZOO

    if model not in ZOO:
        raise InputError(f"unknown model '{model}'; the zoo has {', '.join(ZOO)}")
    path = output if output.suffix in (".pt", ".pth") else output / "checkpoint.pt"
    result = train_stage(model, dataset or DEFAULT_DATASET[model], path,
                         TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed), progress=True)
    rec = result.record
    typer.echo(f"{model} on {rec['dataset']['name']}: held-out accuracy {rec['test_accuracy']:.4f} "
               f"({rec['params']:,} params, {rec['train_seconds']} s) -> {path}")


def _finetune(source: Path, output: Path, data: Optional[Path], eval_data: Optional[Path],
              input_column: Optional[list[str]], label_column: Optional[str], resume: bool, epochs: Optional[int],
              lr: Optional[float], batch_size: Optional[int], seed: int, teacher: Optional[Path],
              keep_every: Optional[int], qat: bool, qat_activations: Optional[str]) -> None:
    from edgepipe.errors import InputError
    from edgepipe.models.finetune import FinetuneConfig, finetune

    if data is None:
        raise InputError(f"fine-tuning {source or teacher} needs labelled rows: --data rows.csv (or JSONL, Parquet, "
                         "a save_to_disk folder, an image folder)")
    defaults = FinetuneConfig()
    config = FinetuneConfig(epochs=defaults.epochs if epochs is None else epochs, lr=defaults.lr if lr is None else lr,
                            batch_size=defaults.batch_size if batch_size is None else batch_size, seed=seed,
                            input_columns=tuple(input_column or ()), label_column=label_column, qat=qat,
                            qat_activations=qat_activations)
    if qat_activations and not qat:
        raise InputError("--qat-activations chooses the layout of quantization-aware training: add --qat")
    check_outputs(folders=(output,))
    from edgepipe.runtime.workdirs import work_dir

    with work_dir("student") as scratch:
        if source is None:  # the student: the teacher with every k-th layer kept
            from edgepipe.models.distil import student_from_teacher

            source = student_from_teacher(teacher, scratch / f"{teacher.name}-every-{keep_every}", keep_every)
        rec = finetune(source, data, output, config, eval_data=eval_data, resume=resume, teacher=teacher,
                       progress=lambda m: typer.echo(f"  {m}", err=True)).report
    before, after = rec.eval_accuracy_before, rec.eval_accuracy
    typer.echo(f"fine-tuned {source.name} ({rec.task}, {rec.params:,} params) on {rec.rows['train']} rows in "
               f"{rec.train_seconds} s: held-out accuracy {after['value']:.4f} [{after['low']:.4f}, "
               f"{after['high']:.4f}] (before {before['value']:.4f}; epoch {rec.best_epoch} of "
               f"{len(rec.epochs)} kept) -> {output}")
    if rec.qat:
        typer.echo(f"quantization-aware ({rec.qat['activations']} activations): the held-out accuracies above are "
                   f"simulated INT8; FP32 before was {rec.qat['fp32_eval_accuracy']['value']:.4f}. Export the folder "
                   "and quantize it with the same rows")
    if rec.teacher:
        typer.echo(f"teacher {Path(rec.teacher['source']).name} ({rec.teacher['params']:,} params): held-out accuracy "
                   f"{rec.teacher['eval_accuracy']['value']:.4f}; the student has "
                   f"{rec.params / rec.teacher['params']:.0%} of its parameters")


def _is_causal_lm(folder: Path) -> bool:
    from edgepipe.models.hf import is_causal_lm_folder

    return is_causal_lm_folder(folder)


def _finetune_lm(source: Path, data: Optional[Path], output: Path, resume: bool, epochs: Optional[int],
                 lr: Optional[float], batch_size: Optional[int], seed: int, other: object) -> None:
    from edgepipe.errors import InputError
    from edgepipe.models.clm import finetune_lm

    if data is None or other:
        raise InputError(f"fine-tuning the language model {source} takes --data text.txt, without --eval-data, "
                         "--teacher, --keep-every or --qat")
    config = _text_config(epochs, lr or 1e-4, batch_size or 8, seed)
    check_outputs(folders=(output,))
    rec = finetune_lm(source, data, output, config, resume=resume,
                      progress=lambda m: typer.echo(f"  {m}", err=True)).report
    after, before = rec.eval_accuracy, rec.eval_accuracy_before
    typer.echo(f"fine-tuned {source.name} (causal LM, {rec.params:,} params) on {rec.rows['train']} windows in "
               f"{rec.train_seconds} s: held-out next-token accuracy {after['value']:.4f} [{after['low']:.4f}, "
               f"{after['high']:.4f}] (before {before['value']:.4f}); perplexity {rec.perplexity['before']} -> "
               f"{rec.perplexity['after']} -> {output}")


def _text_config(epochs: Optional[int], lr: Optional[float], batch_size: Optional[int], seed: int):
    """Training settings on plain text, the options given over PretrainConfig's defaults."""
    from edgepipe.models.mlm import PretrainConfig

    given = {"epochs": epochs, "lr": lr, "batch_size": batch_size}
    return PretrainConfig(seed=seed, **{k: v for k, v in given.items() if v is not None})


def _pretrain(source: Optional[Path], data: Optional[Path], output: Path, resume: bool, epochs: Optional[int],
              lr: Optional[float], batch_size: Optional[int], seed: int, other: object) -> None:
    from edgepipe.errors import InputError
    from edgepipe.models.mlm import pretrain_mlm

    if source is None or data is None or other:
        raise InputError("masked-LM pre-training takes a text classifier FOLDER and --data corpus.txt (one passage "
                         "per line), without --teacher, --keep-every or --qat")
    config = _text_config(epochs, lr, batch_size, seed)
    check_outputs(folders=(output,))
    rec = pretrain_mlm(source, data, output, config, resume=resume,
                       progress=lambda m: typer.echo(f"  {m}", err=True)).report
    after, before = rec.eval_accuracy, rec.eval_accuracy_before
    typer.echo(f"pre-trained {source.name}'s encoder ({rec.params:,} params) on {rec.rows['train']} passages in "
               f"{rec.train_seconds} s: held-out masked-token accuracy {after['value']:.4f} [{after['low']:.4f}, "
               f"{after['high']:.4f}] (before {before['value']:.4f}) -> {output}; fine-tune it: edgepipe train "
               f"{output} --data rows.csv -o ...")


def _train_lm(output: Path, seconds: float, seed: int, steps: Optional[int]) -> None:
    from edgepipe.models.lm import LMConfig, train_tiny_lm

    config = LMConfig(seconds=seconds, seed=seed, steps=steps)  # refused before a folder is made
    check_outputs(folders=(output,))
    rec = train_tiny_lm(output, config, progress=lambda m: typer.echo(f"  {m}", err=True)).record
    typer.echo(f"tiny-lm ({rec['params']:,} params, {rec['steps']} steps in {rec['train_seconds']} s): held-out "
               f"{rec['heldout_nll']:.3f} nats/byte (untrained {rec['heldout_nll_before']:.3f}) -> {output}")
