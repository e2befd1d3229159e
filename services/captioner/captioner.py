"""The captioner: exemplar encoder, caption decoder and language model as one unit."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from torch import Tensor, nn

from services.captioner.decoder import CaptionDecoder
from services.captioner.decoding import (
    DEFAULT_BEAM_SIZE,
    DEFAULT_MAX_TOKENS,
    DEFAULT_PMI_LAMBDA,
    CaptionResult,
    check_decoding_parameters,
    decode_units,
    evaluating,
)
from services.captioner.encoder import MaskedPoolingEncoder
from services.captioner.language_model import LanguageModel
from services.captioner.vocabulary import Vocabulary
from services.common.errors import InvalidArgument


class Captioner(nn.Module):
    """Describes units in words from their exemplar images and masks (MILAN)."""

    def __init__(
        self,
        encoder: MaskedPoolingEncoder,
        decoder: CaptionDecoder,
        language_model: LanguageModel,
    ) -> None:
        super().__init__()
        decoder.vocabulary.require_same(language_model.vocabulary, "language_model.vocabulary")
        if decoder.feature_dim != encoder.feature_dim:
            raise InvalidArgument(
                f"is {decoder.feature_dim} but the encoder gives {encoder.feature_dim}",
                field="decoder.feature_dim",
            )
        self.encoder = encoder
        self.decoder = decoder
        self.language_model = language_model

    @property
    def vocabulary(self) -> Vocabulary:
        """The vocabulary shared by decoder and language model."""
        return self.decoder.vocabulary

    def caption(
        self,
        images: Tensor,
        masks: Tensor,
        beam_size: int = DEFAULT_BEAM_SIZE,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        pmi_lambda: float = DEFAULT_PMI_LAMBDA,
        encoder_batch_size: int = 64,
    ) -> list[CaptionResult]:
        """Caption every unit, all units' beams decoded as one batch.

        images: (U, k, 3, H, W) float RGB in [0, 1], the unmasked exemplars;
        masks: (U, k, 1, H', W') float or {0, 1}. Returns one result per unit, in order.
        """
        if images.dim() != 5 or images.shape[2] != 3:
            raise InvalidArgument(
                f"has shape {tuple(images.shape)}; want (U, k, 3, H, W)", "images"
            )
        if masks.dim() != 5 or masks.shape[:3] != (*images.shape[:2], 1):
            raise InvalidArgument(
                f"has shape {tuple(masks.shape)}; want {(*images.shape[:2], 1)} + (H, W)", "masks"
            )
        check_decoding_parameters(beam_size, max_tokens, pmi_lambda)
        with evaluating(self.encoder):
            features = self.encoder.encode_units(images, masks, encoder_batch_size)
        return decode_units(
            self.decoder, self.language_model, features, beam_size, max_tokens, pmi_lambda
        )


def captions_csv(layer: str, units: Sequence[int], captions: Sequence[str]) -> str:
    """The captions as CSV text with header `layer,unit,description`, one row per unit."""
    if len(units) != len(captions):
        raise InvalidArgument(f"has {len(units)} entries for {len(captions)} captions", "units")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["layer", "unit", "description"])
    writer.writerows([layer, unit, caption] for unit, caption in zip(units, captions, strict=True))
    return out.getvalue()
