"""The matching decoder family that ICD and HMKD share, in one room.

- :mod:`~hmkd.distill.matching.decoder`: the decoder (inquiry encoding, one DETR-style decoder layer
  without self-attention, the auxiliary identification + localisation heads), its options and the
  student-side value projection;
- :mod:`~hmkd.distill.matching.task`: the auxiliary task's inquiries (real, jittered, fake) and targets;
- :mod:`~hmkd.distill.matching.positional`: the sine position codes of cells and boxes;
- :mod:`~hmkd.distill.matching.method`: :class:`DecoderDistiller`, what ICD and HMKD add to a distiller
  to own such a decoder (its optimiser, schedule, state and fitted file);
- :mod:`~hmkd.distill.matching.fit`: fitting the decoder once per teacher on the frozen teacher alone,
  and its cache;
- :mod:`~hmkd.distill.matching.quality`: how well a decoder matches (identification accuracy, attention
  mass inside the object);
- :mod:`~hmkd.distill.matching.report`: ``hmkd fit-decoder``'s fit and report.
"""
