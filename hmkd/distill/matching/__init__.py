"""The matching decoder family that ICD and HMKD share, in one room.

- :mod:`~hmkd.distill.matching.decoder`: the decoder (inquiry encoding, one DETR-style decoder layer
  without self-attention, the auxiliary identification + localisation heads);
- :mod:`~hmkd.distill.matching.options`: :class:`DecoderOptions`, the decoder options ICD and HMKD share;
- :mod:`~hmkd.distill.matching.projection`: the student-side value projection;
- :mod:`~hmkd.distill.matching.optim`: the decoder's own optimiser and learning-rate schedule;
- :mod:`~hmkd.distill.matching.task`: the auxiliary task's inquiries (real, jittered, fake), targets and output;
- :mod:`~hmkd.distill.matching.positional`: the sine position codes of cells and boxes, the valid cells of a padded map;
- :mod:`~hmkd.distill.matching.method`: :class:`DecoderDistiller`, what ICD and HMKD add to a distiller
  to own such a decoder (its optimiser, schedule, state and fitted file);
- :mod:`~hmkd.distill.matching.fit`: fitting the decoder once per teacher on the frozen teacher alone,
  and its cache;
- :mod:`~hmkd.distill.matching.quality`: how well a decoder matches (identification accuracy, attention
  mass inside the object);
- :mod:`~hmkd.distill.matching.report`: ``hmkd fit-decoder``'s fit and report.
"""
