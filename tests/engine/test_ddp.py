"""Multi-process training on CPU: 2 gloo processes started by torchrun (``--standalone``: free port).

The run uses a distiller with its own trainable module and an extra-optimiser module, and makes
one rank (then both) skip the distillation term now and then, so the manual all-reduce of the
distiller's gradients meets missing gradients. Checked: the run finishes; student, distiller and
extra modules stay identical on both ranks; the sharded evaluation equals a single-process
``evaluate`` of the saved checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from hmkd.config import load_config, save_config
from hmkd.engine import distributed as du
from hmkd.engine.sampler import InfiniteBatchSampler
from hmkd.engine.evaluation import evaluate
from hmkd.models import build_model

WORKER = textwrap.dedent(
    '''
    import json, os, sys
    from dataclasses import dataclass
    import torch, torch.nn.functional as F
    from torch import nn
    from hmkd.config import load_config
    from hmkd.distill import Distiller, MethodOptions, register
    from hmkd.training import train
    from hmkd.models import fpn_channels_of

    RANK = int(os.environ["RANK"])
    OUT = sys.argv[2]

    @dataclass
    class Opts(MethodOptions):
        pass

    @register("toy_ddp", "test-only")
    class Toy(Distiller):
        Options = Opts
        needs_teacher = True

        def __init__(self, student, teacher=None, options=None):
            super().__init__(student=student, teacher=teacher, options=options)
            self.adapter = nn.Conv2d(fpn_channels_of(student), fpn_channels_of(teacher), 1)
            self.probe = nn.Linear(fpn_channels_of(teacher), 1)
            self._extra = None

        def extra_modules(self):
            return {"probe": self.probe}

        def extra_optimizers(self):
            if self._extra is None:
                self._extra = [("probe", torch.optim.AdamW(self.probe.parameters(), lr=1e-2), 1.0)]
            return self._extra

        def distill_losses(self, inputs, it):
            sums = {n: float(sum(p.double().sum() for p in m.parameters()))
                    for n, m in (("student", self.student), ("adapter", self.adapter), ("probe", self.probe))}
            with open(os.path.join(OUT, f"params_rank{RANK}.jsonl"), "a") as f:
                f.write(json.dumps({"it": it, **sums}) + "\\n")
            t = inputs.teacher_features["P3"]
            out = {"aux.probe": (self.probe(t.mean((2, 3))) - 1).pow(2).mean()}
            if not ((it == 1 and RANK == 1) or it == 2):  # missing grads: on one rank, then on both
                out["distill.toy"] = F.mse_loss(self.adapter(inputs.student.features["P3"]), t)
            return out

    train(load_config(sys.argv[1]), output_dir=OUT, progress=False)
    '''
)


def test_sampler_shards_are_disjoint_and_cover_the_global_stream():
    single = InfiniteBatchSampler(7, 4, seed=1)
    ranks = [InfiniteBatchSampler(7, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    for it in range(5):
        merged = ranks[0].batch(it) + ranks[1].batch(it)
        assert merged == single.batch(it)  # = the single-process stream with a 2x batch


def test_allreduce_gradients_single_process_is_a_no_op():
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    du.allreduce_gradients(du.DistContext(), [p])
    assert torch.equal(p.grad, torch.full((2,), 3.0))


def test_two_process_gloo_run_matches_single_process_evaluation(tmp_path):
    tiny = dict(detector="fcos", backbone="resnet18", fpn_channels=32, head_convs=1, levels=["P3", "P4", "P5", "P6"],
                min_size=128, max_size=128, detections_per_img=20, topk_candidates=100, num_classes=6)
    teacher_path = str(tmp_path / "teacher.pth")
    model_items = [f"{k}={json.dumps(v)}" for k, v in tiny.items()]
    cfg0 = load_config(None, [f"model.{i}" for i in model_items])
    torch.manual_seed(5)
    torch.save(build_model(cfg0.model).state_dict(), teacher_path)
    cfg = load_config(
        None,
        [f"model.{i}" for i in model_items]
        + [f"teacher.{i}" for i in model_items]
        + [
            "name=ddp", "device=cpu", "seed=3", f"teacher.weights={teacher_path}", "distill.method=fitnet",
            "data.kind=synthetic", f"data.root={tmp_path / 'synth'}", "data.synth.n_train=8", "data.synth.n_val=5",
            "data.synth.size=128", "data.batch_size=2", "data.eval_batch_size=1", "data.workers=0",
            "train.iters=4", "train.warmup_iters=1", "train.log_period=2", "train.ckpt_period=2",
        ],
    )
    # the worker's own method, registered there: a config naming it is read in the worker, where the
    # method exists (reading it here is an unknown method); this process writes the file and evaluates cfg
    cfg.distill.method = "toy_ddp"
    cfg_path = str(tmp_path / "cfg.yaml")
    save_config(cfg, cfg_path)
    (tmp_path / "worker.py").write_text(WORKER)
    out = tmp_path / "run"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "worker.py"), cfg_path, str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    metrics = json.load(open(out / "metrics.json"))
    assert metrics["status"] == "finished" and metrics["timing"]["world_size"] == 2
    # student (DDP), adapter (main optimiser, manual all-reduce) and probe (extra optimiser) agree
    recs = [[json.loads(x) for x in open(out / f"params_rank{r}.jsonl")] for r in range(2)]
    assert [r["it"] for r in recs[0]] == [0, 1, 2, 3]
    for a, b in zip(*recs):
        assert a == b
    assert recs[0][2]["adapter"] != recs[0][1]["adapter"]  # a grad on rank 0 only still updates both
    log = [json.loads(x) for x in open(out / "log.jsonl")]
    assert [r["iteration"] for r in log if "total" in r] == [2, 4]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same kernels, the same numbers
    try:
        single = evaluate(cfg, weights=str(out / "model_final.pth"), out_dir=str(tmp_path / "ev"),
                          progress=False)
    finally:
        torch.set_num_threads(threads)
    dets_ddp = json.load(open(out / "eval" / "detections.json"))
    dets_single = json.load(open(tmp_path / "ev" / "detections.json"))
    assert len(dets_ddp) == len(dets_single) > 0
    assert dets_ddp == dets_single
    assert json.load(open(tmp_path / "ev" / "metrics.json"))["bbox"] == json.load(open(out / "eval" / "metrics.json"))["bbox"]
    assert {k: v for k, v in metrics["bbox"].items() if k != "per_class"} == {
        k: (None if v != v else v) for k, v in single["bbox"].items() if k != "per_class"
    }
