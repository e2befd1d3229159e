import json
from pathlib import Path

import pytest
import torch

from services.captioner.decoder import CaptionDecoder
from services.captioner.milannotations import load_milannotations
from services.captioner.training import (
    CaptionSet,
    ModelDimensions,
    TrainingConfig,
    decoder_loss,
    encode_annotated_units,
    padded_sequences,
    train_captioner,
    validation_bleu,
)
from services.captioner.vocabulary import Vocabulary
from services.common.errors import InvalidArgument
from tests.unit.captioner.synthetic import colour_world, tiny_encoder

TINY = ModelDimensions(embedding_dim=16, hidden_dim=32, attention_dim=16, dropout=0.1)


def test_padded_sequences_shift_targets_and_pad() -> None:
    vocabulary = Vocabulary.build(["a b c"])
    inputs, targets = padded_sequences([[4, 5], [6]], vocabulary)
    start, stop, pad = vocabulary.start, vocabulary.stop, vocabulary.pad
    assert inputs.tolist() == [[start, 4, 5], [start, 6, pad]]
    assert targets.tolist() == [[4, 5, stop], [6, stop, pad]]


def test_decoder_loss_is_nll_plus_attention_regularisation_over_real_steps() -> None:
    vocabulary = Vocabulary.build(["a b c"])
    torch.manual_seed(0)
    decoder = CaptionDecoder(vocabulary, 6, embedding_dim=4, hidden_dim=8, attention_dim=4).eval()
    features = torch.randn(2, 3, 6)
    inputs, targets = padded_sequences([[4], [4, 5, 6]], vocabulary)
    with torch.no_grad():
        loss = decoder_loss(decoder, features, inputs, targets, 1.0)
        log_probs, alphas = decoder(features, inputs)
    # by hand: mean NLL over the 2 + 4 real targets; Σ_t α over the same steps
    picked = [log_probs[0, t, targets[0, t]] for t in range(2)]
    picked += [log_probs[1, t, targets[1, t]] for t in range(4)]
    nll = -sum(picked) / 6
    mass = torch.stack([alphas[0, :2].sum(0), alphas[1, :4].sum(0)])  # (2, k)
    expected = nll + ((1 - mass) ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)
    # extra padding columns change nothing
    pad = torch.full((2, 3), vocabulary.pad)
    with torch.no_grad():
        padded = decoder_loss(
            decoder, features, torch.cat([inputs, pad], 1), torch.cat([targets, pad], 1), 1.0
        )
    assert float(padded) == pytest.approx(float(loss), abs=1e-6)


def test_tiny_training_run_decreases_the_loss(tmp_path: Path) -> None:
    data = load_milannotations(colour_world(tmp_path / "milan"))
    encoder = tiny_encoder()
    config = TrainingConfig(
        max_epochs=30, patience=30, batch_size=8, validation_fraction=0.25, show_progress=False
    )
    captioner, report = train_captioner(encoder, data, config, TINY)

    assert report.train_units == 14 and report.val_units == 4
    decoder_losses = [e.train_loss for e in report.decoder.epochs]
    lm_losses = [e.train_loss for e in report.language_model.epochs]
    assert len(decoder_losses) == 30 and len(lm_losses) == 30
    assert decoder_losses[-1] < 0.5 * decoder_losses[0]
    assert lm_losses[-1] < 0.5 * lm_losses[0]
    assert report.decoder.epochs[-1].val_loss < report.decoder.epochs[0].val_loss
    assert all(e.val_bleu is not None for e in report.decoder.epochs)

    # the best epoch's weights were restored
    _, val_units = data.split(config.validation_fraction, config.seed)
    val = CaptionSet(
        encode_annotated_units(encoder, data, val_units, 64),
        tuple(u.descriptions for u in val_units),
    )
    best = report.decoder.epochs[report.decoder.best_epoch - 1].val_bleu
    assert validation_bleu(captioner.decoder, val, config) == pytest.approx(best)

    # the trained captioner names each validation unit's colour
    images = torch.from_numpy(data.images_of(val_units)).float() / 255
    masks = torch.from_numpy(data.masks_of(val_units)).float()
    results = captioner.caption(images, masks, beam_size=5, max_tokens=6)
    colours = [u.descriptions[0].split()[0] for u in val_units]
    assert all(c in r.tokens for c, r in zip(colours, results, strict=True))

    report.write_json(tmp_path / "report.json")
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["decoder"]["monitor"] == "val_bleu"
    assert len(written["language_model"]["epochs"]) == 30


def test_early_stopping_stops_after_patience_and_restores_the_best(tmp_path: Path) -> None:
    data = load_milannotations(colour_world(tmp_path / "milan", units_per_colour=2))
    encoder = tiny_encoder()
    config = TrainingConfig(
        max_epochs=30,
        patience=1,
        batch_size=8,
        learning_rate=1e-2,
        validation_fraction=0.3,
        show_progress=False,
    )
    captioner, report = train_captioner(encoder, data, config, TINY)
    for model in (report.decoder, report.language_model):
        assert model.stopped_early  # 4 training units: both overfit within 30 epochs
        assert len(model.epochs) == model.best_epoch + 1

    # the decoder's validation loss is the best epoch's, not the last epoch's
    _, val_units = data.split(config.validation_fraction, config.seed)
    vocabulary = captioner.vocabulary
    examples = [(i, vocabulary.encode(t)) for i, u in enumerate(val_units) for t in u.descriptions]
    inputs, targets = padded_sequences([ids for _, ids in examples], vocabulary)
    features = encode_annotated_units(encoder, data, val_units, 64)
    with torch.no_grad():
        loss = decoder_loss(
            captioner.decoder, features[[i for i, _ in examples]], inputs, targets, 1.0
        )
    best, last = report.decoder.epochs[report.decoder.best_epoch - 1], report.decoder.epochs[-1]
    assert float(loss) == pytest.approx(best.val_loss, abs=1e-6)
    assert float(loss) != pytest.approx(last.val_loss, abs=1e-6)


def test_config_is_validated() -> None:
    with pytest.raises(InvalidArgument, match="patience"):
        TrainingConfig(patience=0)
