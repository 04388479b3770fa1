"""The infrastructure under training and evaluation, one job per module (the training run itself,
which uses it, is :mod:`hmkd.training`).

- :mod:`~hmkd.engine.evaluation`: evaluating a detector on a data set, ``hmkd eval``, its output files;
- :mod:`~hmkd.engine.inference`: a detector over a loader, as COCO results;
- :mod:`~hmkd.engine.coco_results`: the COCO results format (conversion, checks);
- :mod:`~hmkd.engine.evaluator`: COCO metrics (pycocotools-identical numbers, two engines);
- :mod:`~hmkd.engine.checkpoint`, :mod:`~hmkd.engine.logging_utils`: the files a run writes;
- :mod:`~hmkd.engine.optim`, :mod:`~hmkd.engine.sampler`: optimisers and schedule, the data order;
- :mod:`~hmkd.engine.distributed`, :mod:`~hmkd.engine.signals`, :mod:`~hmkd.engine.loaders`:
  processes, signals and DataLoader workers.
"""
