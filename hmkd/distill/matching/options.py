"""The options of a method with a matching decoder (ICD, HMKD): :class:`DecoderOptions`, which each
method's ``Options`` extends with its own defaults and fields.

What each option accepts is declared on its field with :func:`~hmkd.allowed.allowed` (``docs/CONFIG.md``
is generated from these declarations); :meth:`DecoderOptions.check` adds what relates one option to
another. :meth:`DecoderOptions.decoder_kwargs` gives the :class:`~hmkd.distill.matching.decoder.MatchingDecoder`
arguments they set.
"""

from __future__ import annotations

from dataclasses import dataclass

from hmkd.allowed import allowed
from hmkd.distill.matching.decoder import ENCODINGS, POSITION_CODES
from hmkd.distill.matching.task import FAKE_KINDS, MAX_INQUIRIES, MAX_INQUIRIES_DEFAULT
from hmkd.distill.options import MethodOptions, refuse

__all__ = ["DECODER_SCHEDULES", "DECODER_TRAINING", "DecoderOptions"]

#: Decoder learning-rate schedules: ``constant`` or ``cosine`` to 0 over the run (ICD's).
DECODER_SCHEDULES = ("constant", "cosine")
#: What a fitted decoder does during distillation: keeps learning (``joint``) or not (``frozen``).
DECODER_TRAINING = ("joint", "frozen")


@dataclass
class DecoderOptions(MethodOptions):
    """The options of a method with a matching decoder (ICD, HMKD); each method sets its own defaults.

    Attributes:
        heads, hidden: decoder heads N_m and attention width (ICD and the HMKD paper: 8, 256).
        encoding: inquiry encoding, ``icd`` or ``hmkd`` (see :mod:`hmkd.distill.matching.decoder`).
        fakes_per_real: fake inquiries per object in the aux task (ICD: 5).
        max_inquiries: cap on real + fake inquiries per image (None: ICD's ``MAX_LABELS`` of the
            student's family, 100 for Faster/Mask R-CNN, 300 otherwise).
        jitter: the aux task's inquiry centres move by ``U(-jitter, jitter)`` x (w, h) (ICD: 0.3).
        padding_mask: mask padded cells out of the attention, position embedding normalised over
            each image's valid extent (ICD and DETR: on).
        decoder_lr, decoder_weight_decay: the decoder's own AdamW (ICD: 1e-4 / 1e-4; the HMKD
            paper's 1e-3 / 1e-3 is in ``configs/coco/base_hmkd.yaml``).
        decoder_clip: max L2 norm its gradients are clipped to, jointly (None: no clipping).
        decoder_schedule: ``constant`` or ``cosine`` (to 0 over the run, ICD's).
        fakes: the aux task's fake inquiries: ``random`` (ICD's), ``displaced`` (a real object's
            inquiry moved outside its box) or ``mixed`` (half each); see
            :mod:`hmkd.distill.matching.task`.
        displacement: [low, high] of a displaced fake's move in units of its box's (w, h).
        position_code: ``normalised`` (DETR's, ICD's) or ``absolute`` (pixel sine codes with
            cell-level resolution on keys and inquiries).
        attention_supervision: weight of the direct supervision of the attention towards the
            object's cells in the aux task (an extension beyond ICD and the paper; 0: off).
        decoder_fit: ``none`` (the decoder starts untrained and learns during distillation, as ICD
            and the paper train it), ``auto`` (fit it on the frozen teacher alone before
            distilling, cached by teacher, options and data, and reused), or the path of a file
            ``hmkd fit-decoder`` wrote.
        decoder_training: with a fitted decoder, ``joint`` (it keeps learning its task during
            distillation, warm-started) or ``frozen`` (no aux task, no decoder optimiser).
        fit_iters, fit_lr: the fit's iterations and its constant AdamW learning rate (None:
            ``decoder_lr``); batches are the config's training batches.
    """

    heads: int = allowed(8, ge=1)
    hidden: int = allowed(256, ge=16, multiple_of=16, words="a positive multiple of 16")
    encoding: str = allowed("icd", one_of=ENCODINGS)
    fakes_per_real: int = allowed(5, ge=0)
    max_inquiries: int | None = allowed(None, ge=1)
    jitter: float = allowed(0.3, ge=0)
    padding_mask: bool = True
    decoder_lr: float = allowed(1e-4, gt=0)
    decoder_weight_decay: float = allowed(1e-4, ge=0)
    decoder_clip: float | None = allowed(1.0, gt=0)
    decoder_schedule: str = allowed("constant", one_of=DECODER_SCHEDULES)
    fakes: str = allowed("random", one_of=FAKE_KINDS)
    displacement: list[float] = allowed(factory=lambda: [1.5, 3.0], ge=0, length=2, ordered=True,
                                        words="[low, high] with 0 <= low <= high")
    position_code: str = allowed("normalised", one_of=POSITION_CODES)
    attention_supervision: float = allowed(0.0, ge=0)
    decoder_fit: str = "none"  # none | auto | a file: checked in check()
    decoder_training: str = allowed("joint", one_of=DECODER_TRAINING)
    fit_iters: int = allowed(600, ge=1)
    fit_lr: float | None = allowed(None, gt=0)

    def check(self) -> None:
        super().check()
        if self.hidden % self.heads:
            refuse("heads", f"a divisor of hidden ({self.hidden})", self.heads)
        if not isinstance(self.decoder_fit, str) or not self.decoder_fit:
            refuse("decoder_fit", "none, auto or the path of a fitted decoder", self.decoder_fit)
        if self.decoder_training == "frozen" and self.decoder_fit == "none":
            refuse("decoder_training", "joint when decoder_fit is none (a frozen untrained decoder attends at random)",
                   self.decoder_training)

    @property
    def frozen(self) -> bool:
        """The decoder is fitted beforehand and does not learn during distillation."""
        return self.decoder_training == "frozen"

    def decoder_kwargs(self) -> dict:
        """The :class:`MatchingDecoder` arguments these options set (its task and codes)."""
        return dict(hidden=self.hidden, heads=self.heads, encoding=self.encoding, fakes_per_real=self.fakes_per_real,
                    jitter=self.jitter, padding_mask=self.padding_mask, fakes=self.fakes,
                    displacement=tuple(self.displacement), position_code=self.position_code,
                    attention_supervision=self.attention_supervision)

    def inquiry_cap(self, detector_kind: str) -> int:
        """``max_inquiries``, or ICD's default for a student of ``detector_kind``."""
        if self.max_inquiries is not None:
            return self.max_inquiries
        return MAX_INQUIRIES.get(detector_kind, MAX_INQUIRIES_DEFAULT)
