"""Training of the caption decoder p(d|E) and the language model p(d).

The encoder is frozen, so every exemplar is encoded once up front and the decoder
trains on the cached (U, k, D) matrices. One training example is one (unit,
description) pair.

- Decoder: teacher-forced NLL over non-padding targets plus attention
  regularisation w · mean_i (1 − Σ_t α_{t,i})² (w = 1, sum over non-padding steps),
  AdamW (lr 1e-3), batches of 64; early stopping on validation corpus BLEU-4 of
  the top beam (λ = 0), ties broken by validation loss, restoring the best
  epoch's weights.
- Language model: NLL of the training units' descriptions; early stopping on
  validation loss, restoring the best weights.

Training is deterministic for a given seed and leaves the global RNG untouched.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress, TaskID
from torch import Tensor, nn

from services.captioner.bleu import corpus_bleu
from services.captioner.captioner import Captioner
from services.captioner.decoder import CaptionDecoder
from services.captioner.decoding import beam_search, evaluating
from services.captioner.encoder import MaskedPoolingEncoder
from services.captioner.language_model import LanguageModel
from services.captioner.milannotations import AnnotatedUnit, Milannotations
from services.captioner.vocabulary import Vocabulary, tokenize
from services.common.errors import InvalidArgument


@dataclass(frozen=True)
class ModelDimensions:
    """Sizes shared by the decoder and the language model (spec values by default)."""

    embedding_dim: int = 128
    hidden_dim: int = 512
    attention_dim: int = 512
    dropout: float = 0.5


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation and early-stopping settings."""

    max_epochs: int = 100
    patience: int = 4  # epochs without improvement before stopping
    batch_size: int = 64
    learning_rate: float = 1e-3
    attention_regularization: float = 1.0
    validation_fraction: float = 0.1
    validation_beam_size: int = 5
    max_tokens: int = 15
    encoder_batch_size: int = 64
    device: str = "cpu"
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_epochs", "patience", "batch_size", "validation_beam_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"is {getattr(self, name)}; must be at least 1", name)


@dataclass
class EpochRecord:
    """Losses and metrics after one epoch."""

    epoch: int
    train_loss: float  # mean over the epoch's batches
    val_loss: float
    val_bleu: float | None = None  # decoder only

    def summary(self) -> str:
        """One line for the progress bar."""
        bleu = "" if self.val_bleu is None else f" val_bleu={self.val_bleu:.4f}"
        return f"train_loss={self.train_loss:.4f} val_loss={self.val_loss:.4f}{bleu}"


@dataclass
class ModelReport:
    """How one model trained."""

    model: str  # "decoder" | "language_model"
    monitor: str  # "val_bleu" (ties broken by val_loss) | "val_loss"
    best_epoch: int = 0
    stopped_early: bool = False
    epochs: list[EpochRecord] = field(default_factory=list)


@dataclass
class TrainingReport:
    """What `train_captioner` did, writable as JSON."""

    train_units: int
    val_units: int
    vocabulary_size: int
    feature_dim: int
    backbone: dict[str, Any]
    config: dict[str, Any]
    dimensions: dict[str, Any]
    decoder: ModelReport
    language_model: ModelReport
    train_seconds: float  # wall time of encoding and both fits
    val_unit_ids: list[tuple[str, int]]  # (layer, unit) of the held-out units

    def to_json(self) -> dict[str, Any]:
        """Plain dict of the whole report."""
        return asdict(self)

    def write_json(self, path: Path) -> None:
        """Write the report to `path` as indented JSON."""
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


@dataclass(frozen=True)
class CaptionSet:
    """Encoded units and their descriptions."""

    features: Tensor  # (U, k, D)
    descriptions: tuple[tuple[str, ...], ...]  # U entries


def padded_sequences(
    sequences: Sequence[Sequence[int]], vocabulary: Vocabulary
) -> tuple[Tensor, Tensor]:
    """Teacher-forcing inputs and targets for token-id sequences.

    Returns inputs `start w1 … wn` and targets `w1 … wn stop`, both (B, T) int64
    padded with pad to the longest sequence (T = n_max + 1).
    """
    length = max(len(s) for s in sequences) + 1
    inputs = torch.full((len(sequences), length), vocabulary.pad)
    targets = torch.full((len(sequences), length), vocabulary.pad)
    for row, ids in enumerate(sequences):
        inputs[row, : len(ids) + 1] = torch.tensor([vocabulary.start, *ids])
        targets[row, : len(ids) + 1] = torch.tensor([*ids, vocabulary.stop])
    return inputs, targets


def decoder_loss(
    decoder: CaptionDecoder,
    features: Tensor,
    inputs: Tensor,
    targets: Tensor,
    attention_regularization: float,
) -> Tensor:
    """NLL over non-padding targets + w · mean_i (1 − Σ_t α_{t,i})².

    features: (B, k, D); inputs, targets: (B, T) from `padded_sequences`.
    """
    log_probs, alphas = decoder(features, inputs)
    nll = F.nll_loss(
        log_probs.flatten(0, 1), targets.flatten(), ignore_index=decoder.vocabulary.pad
    )
    counted = (targets != decoder.vocabulary.pad).to(alphas.dtype)  # (B, T)
    attention_mass = (alphas * counted[:, :, None]).sum(dim=1)  # (B, k)
    return nll + attention_regularization * ((1.0 - attention_mass) ** 2).mean()


def language_model_loss(language_model: LanguageModel, inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean NLL over non-padding targets; inputs, targets (B, T) from `padded_sequences`."""
    log_probs = language_model(inputs)
    return F.nll_loss(
        log_probs.flatten(0, 1), targets.flatten(), ignore_index=language_model.vocabulary.pad
    )


def validation_bleu(decoder: CaptionDecoder, data: CaptionSet, config: TrainingConfig) -> float:
    """Corpus BLEU-4 of each unit's top beam (λ = 0) against all its descriptions."""
    with evaluating(decoder):
        beams = beam_search(decoder, data.features, config.validation_beam_size, config.max_tokens)
    hypotheses = [decoder.vocabulary.words(ids) for ids in beams.tokens[:, 0].tolist()]
    references = [[tokenize(text) for text in texts] for texts in data.descriptions]
    return corpus_bleu(hypotheses, references)


def _improvement_key(record: EpochRecord) -> tuple[float, ...]:
    """Larger is better: validation BLEU, ties broken by validation loss; or loss alone.

    The tie-break matters early on, when an undertrained decoder's top beam is the
    empty caption (BLEU 0) for several epochs while its loss still falls.
    """
    if record.val_bleu is None:
        return (-record.val_loss,)
    return (record.val_bleu, -record.val_loss)


# The loss of one batch, given the batch's indices into the training examples.
BatchLoss = Callable[[Tensor], Tensor]
# Validation loss and, for the decoder, validation BLEU of the current weights.
Evaluation = Callable[[], tuple[float, float | None]]


def _fit(
    model: nn.Module,
    report: ModelReport,
    n_examples: int,
    batch_loss: BatchLoss,
    evaluate: Evaluation,
    config: TrainingConfig,
    progress: Progress | None,
    generator: torch.Generator | None,
) -> None:
    """Train `model` with AdamW and early stopping, filling `report`, restoring the best."""
    progress = progress or Progress(disable=True)
    generator = generator or torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    best_key: tuple[float, ...] = (-math.inf, -math.inf)
    best_state = copy.deepcopy(model.state_dict())
    n_batches = math.ceil(n_examples / config.batch_size)
    task: TaskID = progress.add_task(report.model, total=n_batches)
    for epoch in range(1, config.max_epochs + 1):
        progress.reset(task, total=n_batches, description=f"{report.model} epoch {epoch}")
        model.train()
        order = torch.randperm(n_examples, generator=generator)
        total = 0.0
        for batch in order.split(config.batch_size):
            loss = batch_loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            progress.advance(task)
        record = EpochRecord(epoch, total / n_batches, *evaluate())
        report.epochs.append(record)
        key = _improvement_key(record)
        if key > best_key:
            best_key, report.best_epoch = key, epoch
            best_state = copy.deepcopy(model.state_dict())
        progress.update(task, description=f"{report.model} epoch {epoch} {record.summary()}")
        if epoch - report.best_epoch >= config.patience:
            report.stopped_early = epoch < config.max_epochs
            break
    model.load_state_dict(best_state)
    model.eval()


def _examples(
    descriptions: Sequence[Sequence[str]], vocabulary: Vocabulary
) -> Iterator[tuple[int, list[int]]]:
    for unit, texts in enumerate(descriptions):
        for text in texts:
            yield unit, vocabulary.encode(text)


def train_decoder(
    decoder: CaptionDecoder,
    train: CaptionSet,
    val: CaptionSet,
    config: TrainingConfig,
    progress: Progress | None = None,
    generator: torch.Generator | None = None,
) -> ModelReport:
    """Fit the decoder on `train`, early-stopping on BLEU over `val`; best weights kept.

    `progress` shows a bar per epoch (none when omitted); `generator` shuffles the
    examples (seeded from `config.seed` when omitted).
    """
    vocabulary = decoder.vocabulary
    units, sequences = zip(*_examples(train.descriptions, vocabulary), strict=True)
    unit_index = torch.tensor(units)
    val_units, val_sequences = zip(*_examples(val.descriptions, vocabulary), strict=True)
    val_inputs, val_targets = padded_sequences(val_sequences, vocabulary)
    val_features = val.features[torch.tensor(val_units)]

    def batch_loss(batch: Tensor) -> Tensor:
        inputs, targets = padded_sequences([sequences[i] for i in batch.tolist()], vocabulary)
        return decoder_loss(
            decoder,
            train.features[unit_index[batch]],
            inputs.to(train.features.device),
            targets.to(train.features.device),
            config.attention_regularization,
        )

    def evaluate() -> tuple[float, float | None]:
        with evaluating(decoder):
            loss = decoder_loss(
                decoder,
                val_features,
                val_inputs.to(val_features.device),
                val_targets.to(val_features.device),
                config.attention_regularization,
            )
        return float(loss), validation_bleu(decoder, val, config)

    report = ModelReport("decoder", "val_bleu")
    _fit(decoder, report, len(sequences), batch_loss, evaluate, config, progress, generator)
    return report


def train_language_model(
    language_model: LanguageModel,
    train_texts: Sequence[str],
    val_texts: Sequence[str],
    config: TrainingConfig,
    progress: Progress | None = None,
    generator: torch.Generator | None = None,
) -> ModelReport:
    """Fit the language model on `train_texts`, early-stopping on loss over `val_texts`.

    `progress` and `generator` as in `train_decoder`.
    """
    vocabulary = language_model.vocabulary
    device = next(language_model.parameters()).device
    sequences = [vocabulary.encode(text) for text in train_texts]
    val_inputs, val_targets = padded_sequences(
        [vocabulary.encode(t) for t in val_texts], vocabulary
    )

    def batch_loss(batch: Tensor) -> Tensor:
        inputs, targets = padded_sequences([sequences[i] for i in batch.tolist()], vocabulary)
        return language_model_loss(language_model, inputs.to(device), targets.to(device))

    def evaluate() -> tuple[float, float | None]:
        with evaluating(language_model):
            loss = language_model_loss(
                language_model, val_inputs.to(device), val_targets.to(device)
            )
        return float(loss), None

    report = ModelReport("language_model", "val_loss")
    _fit(language_model, report, len(sequences), batch_loss, evaluate, config, progress, generator)
    return report


def encode_annotated_units(
    encoder: MaskedPoolingEncoder,
    data: Milannotations,
    units: Sequence[AnnotatedUnit],
    batch_size: int,
) -> Tensor:
    """Encoder features of `units`' exemplars: (len(units), k, D) float.

    Reads the uint8 images and masks a few units at a time (memory-mapped arrays).
    """
    k = data.layers[units[0].layer].masks.shape[1]
    units_per_chunk = max(1, batch_size // k)
    parts = []
    with evaluating(encoder):
        for i in range(0, len(units), units_per_chunk):
            chunk = list(units[i : i + units_per_chunk])
            images = torch.from_numpy(data.images_of(chunk)).float().div_(255.0)
            masks = torch.from_numpy(data.masks_of(chunk)).float()
            parts.append(encoder.encode_units(images, masks, batch_size).cpu())
    return torch.cat(parts)


def train_captioner(
    encoder: MaskedPoolingEncoder,
    data: Milannotations,
    config: TrainingConfig | None = None,
    dimensions: ModelDimensions | None = None,
) -> tuple[Captioner, TrainingReport]:
    """Train a decoder and a language model on MILANNOTATIONS data over a frozen encoder.

    Units are split into train/validation by `config.validation_fraction`; the
    vocabulary is built from the training units' descriptions. The encoder's
    description records the exemplar image size (`input_size`), so that a service
    captioning with the result resizes its exemplars to what training saw.
    """
    started = time.perf_counter()
    config = config or TrainingConfig()
    dimensions = dimensions or ModelDimensions()
    encoder.description = replace(encoder.description, input_size=data.image_size)
    device = torch.device(config.device)
    train_units, val_units = data.split(config.validation_fraction, config.seed)
    train_texts = [text for unit in train_units for text in unit.descriptions]
    val_texts = [text for unit in val_units for text in unit.descriptions]
    vocabulary = Vocabulary.build(train_texts)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=rng_devices),
        Progress(disable=not config.show_progress) as progress,
    ):
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        train = CaptionSet(
            encode_annotated_units(encoder, data, train_units, config.encoder_batch_size).to(
                device
            ),
            tuple(unit.descriptions for unit in train_units),
        )
        val = CaptionSet(
            encode_annotated_units(encoder, data, val_units, config.encoder_batch_size).to(device),
            tuple(unit.descriptions for unit in val_units),
        )
        decoder = CaptionDecoder(
            vocabulary,
            encoder.feature_dim,
            embedding_dim=dimensions.embedding_dim,
            hidden_dim=dimensions.hidden_dim,
            attention_dim=dimensions.attention_dim,
            dropout=dimensions.dropout,
        ).to(device)
        language_model = LanguageModel(
            vocabulary,
            embedding_dim=dimensions.embedding_dim,
            hidden_dim=dimensions.hidden_dim,
            dropout=dimensions.dropout,
        ).to(device)
        decoder_report = train_decoder(decoder, train, val, config, progress, generator)
        lm_report = train_language_model(
            language_model, train_texts, val_texts, config, progress, generator
        )
    report = TrainingReport(
        train_units=len(train_units),
        val_units=len(val_units),
        vocabulary_size=len(vocabulary),
        feature_dim=encoder.feature_dim,
        backbone=encoder.description.to_json(),
        config=asdict(config),
        dimensions=asdict(dimensions),
        decoder=decoder_report,
        language_model=lm_report,
        train_seconds=round(time.perf_counter() - started, 3),
        val_unit_ids=[(unit.layer, unit.unit) for unit in val_units],
    )
    return Captioner(encoder, decoder, language_model), report
