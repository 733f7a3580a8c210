"""The Trainer under torchrun (CPU, gloo): DDP and FSDP2 give a single process's weights; a checkpoint written
by 2 ranks resumes on 1 and continues the same run; only rank 0 prints; clear errors for bad set-ups.

This file is also the worker that torchrun starts: ``torchrun --nproc_per_node=2 THIS_FILE --strategy ...``.

Tolerance: the runs differ only in the order of float sums (each rank's two micro-batch gradients are summed,
then the two ranks' sums are averaged by the all-reduce or reduce-scatter, instead of four gradients summed in
a row). In fp32 that moves a gradient by ~1e-7 relative; AdamW divides by sqrt(v), so over a few steps the
weights (of size ~0.1) move apart by ~1e-7..1e-6. We allow 2e-5, and check that one optimizer step moves the
weights by far more than that (so the comparison can fail).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from labkit.train import TrainConfig, Trainer

TOL = 2e-5
STEPS, HALF = 6, 3
VOCAB, SEQ, BATCH = 17, 16, 4
HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


class TinyGPT(nn.Module):
    """Embeddings, a ModuleList of pre-norm causal blocks (what FSDP shards one by one), a tied head. No biases:
    a key bias gets an exactly-zero gradient (softmax ignores it), which AdamW would blow up from float noise."""

    def __init__(self, dim=32, layers=2, heads=2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, dim), nn.Embedding(SEQ, dim)
        self.h = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True,
                                                          norm_first=True, bias=False) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.wte.weight
        for emb in (self.wte, self.wpe):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, x, y):
        t = x.shape[1]
        h = self.wte(x) + self.wpe(torch.arange(t, device=x.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        for block in self.h:
            h = block(h, src_mask=mask, is_causal=True)
        logits = self.head(self.ln_f(h))
        return logits, nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


CORPUS = torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(3))


def get_batch(split, g):
    data = CORPUS[:3500] if split == "train" else CORPUS[3500:]
    i = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=g)
    return torch.stack([data[j:j + SEQ] for j in i]), torch.stack([data[j + 1:j + SEQ + 1] for j in i])


def make_trainer(ckpt=None, strategy=None, dim=32):
    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=STEPS, lr=3e-3, warmup_steps=1, grad_accum=4, eval_every=STEPS, eval_batches=3,
                      progress=False, live_plot=False, ckpt_path=ckpt, strategy=strategy)
    return Trainer(TinyGPT(dim=dim), get_batch, config=cfg, device="cpu")


def full_weights(t: Trainer) -> dict:
    """Every weight, whole, on every rank (FSDP's shards gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(t.model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


class StepCount:
    """State the run tracks beside the weights (Trainer.track): the optimizer steps taken, as a tensor."""

    def __init__(self):
        self.n = torch.zeros((), dtype=torch.long)

    def tick(self, *_):
        self.n += 1

    def state_dict(self):
        return {"n": self.n.clone()}

    def load_state_dict(self, state):
        self.n = state["n"].clone()


def counted(t: Trainer) -> StepCount:
    count = StepCount()
    t.track("count", count)
    t.optimizer.register_step_post_hook(count.tick)
    return count


def worker(args) -> None:
    """One rank: train HALF steps (checkpoint there), keep the weights, train on to STEPS without checkpoints."""
    t = make_trainer(ckpt=args.ckpt, strategy=args.strategy)
    counted(t)                                                     # its state goes into the sharded checkpoint
    print(f"rank {t.dist.rank} of {t.dist.world_size}: {args.strategy}")  # the Trainer prints nothing itself here
    out = Path(args.out)
    t.fit(steps=HALF)
    half = full_weights(t)
    t.cfg = dataclasses.replace(t.cfg, ckpt_path=None)
    t.fit()
    result = {"history": t.history, "generator_sum": int(t.generator.get_state().sum())}
    if args.bad_ckpt:  # a one-process checkpoint cannot be read under torchrun: a clear message
        try:
            t.load(args.bad_ckpt)
        except ValueError as e:
            result["bad_ckpt_error"] = str(e)
    final = full_weights(t)
    if t.is_main:
        torch.save({"half": half, "final": final}, out / "weights.pt")
        (out / "result.json").write_text(json.dumps(result))


LONG = 400        # the Ctrl-C run's max_steps: far more than it gets to


def long_trainer(ckpt=None, strategy=None, marker: Path | None = None, delay: float = 0.0):
    """A run of LONG steps with no checkpoint before the end (eval_every=LONG): only an interrupt can save one.
    With ``marker``, each batch drawn after step 3 touches it (the test's cue to press Ctrl-C)."""
    t = make_trainer(ckpt=ckpt, strategy=strategy)
    t.cfg = dataclasses.replace(t.cfg, max_steps=LONG, eval_every=LONG)

    def get(split, g):
        if marker is not None and t.step >= 3:
            marker.touch()
        time.sleep(delay)
        return get_batch(split, g)

    t.get_batch = get
    return t


def interrupt_worker(args) -> None:
    t = long_trainer(ckpt=args.ckpt, strategy=args.strategy, marker=Path(args.out) / f"running.{os.environ['RANK']}",
                     delay=0.02)
    t.fit()
    if t.is_main:
        (Path(args.out) / "stopped.json").write_text(json.dumps({"step": t.step}))


def torchrun(tmp_path: Path, strategy: str, *extra: str) -> subprocess.CompletedProcess:
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--log-dir", str(logs), "--redirects", "3", str(HERE), "--strategy", strategy, "--out", str(tmp_path), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("LABKIT_STRATEGY", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=150)
    print(f"torchrun {strategy}: {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:] + "".join(
        p.read_text()[-3000:] for p in logs.rglob("std*.log"))
    return proc


def rank_output(tmp_path: Path, rank: int) -> str:
    return "".join(p.read_text() for p in sorted((tmp_path / "logs").rglob(f"attempt_0/{rank}/stdout.log")))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference():
    """One process, the same global batch (grad_accum=4 micro-batches of 4), weights at HALF and at STEPS."""
    t = make_trainer()
    t.fit(steps=HALF)
    half, generator = full_weights(t), t.generator.get_state()
    t.fit()
    return {"half": half, "final": full_weights(t), "generator_at_half": generator, "history": t.history}


def test_the_tolerance_can_fail(reference):
    moved = max_diff(reference["half"], reference["final"])
    print(f"weights move by {moved:.2e} in {STEPS - HALF} steps; tolerance {TOL:g}")
    assert moved > 100 * TOL


def test_ddp_two_ranks_equal_one_process(tmp_path, reference):
    bad = tmp_path / "single.pt"
    make_trainer().save(bad)
    torchrun(tmp_path, "ddp", "--bad-ckpt", str(bad))
    got = torch.load(tmp_path / "weights.pt", weights_only=True)
    result = json.loads((tmp_path / "result.json").read_text())
    errs = {k: max_diff(got[k], reference[k]) for k in ("half", "final")}
    print(f"DDP x2 vs one process: max abs weight diff {errs}")
    assert max(errs.values()) < TOL
    losses = [h["train_loss_step"] for h in result["history"]]
    ref_losses = [h["train_loss_step"] for h in reference["history"]]
    assert losses == pytest.approx(ref_losses, abs=1e-5)  # the reported loss is the mean over both ranks
    assert result["history"][-1]["val_loss"] == pytest.approx(reference["history"][-1]["val_loss"], abs=1e-5)
    assert "one-process checkpoint" in result["bad_ckpt_error"]
    assert "rank 0 of 2" in rank_output(tmp_path, 0) and rank_output(tmp_path, 1).strip() == "rank 1 of 2: ddp"


def test_fsdp_two_ranks_then_resume_on_one(tmp_path, reference):
    ckpt = tmp_path / "ckpt"
    torchrun(tmp_path, "fsdp", "--ckpt", str(ckpt))
    got = torch.load(tmp_path / "weights.pt", weights_only=True)
    errs = {k: max_diff(got[k], reference[k]) for k in ("half", "final")}
    print(f"FSDP2 x2 vs one process: max abs weight diff {errs}")
    assert max(errs.values()) < TOL
    # the checkpoint: one folder, rank 0's metadata and one shard per rank, no temp folder left behind
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt")) == ["ckpt"]
    assert rank_output(tmp_path, 1).strip() == "rank 1 of 2: fsdp"   # no progress, no "resumed", no samples
    # ... resumes in one process: same step, same data order, and it continues the 2-rank run
    resumed = make_trainer(ckpt=str(ckpt))
    count = counted(resumed)
    resumed.load()
    assert int(count.n) == HALF                                    # Trainer.track's state came back with the run
    assert resumed.step == HALF and torch.equal(resumed.generator.get_state(), reference["generator_at_half"])
    resumed.cfg = dataclasses.replace(resumed.cfg, ckpt_path=None)
    resumed.fit()
    err_run, err_ref = max_diff(full_weights(resumed), got["final"]), max_diff(full_weights(resumed), reference["final"])
    print(f"resumed on 1 rank vs the 2-rank run: {err_run:.2e}; vs one process throughout: {err_ref:.2e}")
    assert err_run < TOL and err_ref < TOL
    # a checkpoint of another model is refused with a clear message
    with pytest.raises(ValueError, match="does not match this model"):
        make_trainer(ckpt=str(ckpt), dim=48).load()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ctrl_c_under_torchrun_saves_one_checkpoint_and_resumes(tmp_path, strategy):
    """Ctrl-C in the terminal (SIGINT to torchrun and its workers, and torchrun's own SIGINT to them): the ranks stop
    together at one step boundary, write one checkpoint, and exit cleanly; one process resumes it and continues
    exactly like a run that was never interrupted."""
    import signal

    ckpt = tmp_path / "ckpt"
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir", str(logs),
           "--redirects", "3", str(HERE), "--strategy", strategy, "--out", str(tmp_path), "--ckpt", str(ckpt),
           "--interrupt"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("LABKIT_STRATEGY", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)          # its own process group, as a terminal's job is
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"running.{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)                    # what Ctrl-C does: the whole foreground group
        out = proc.communicate(timeout=90)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    worker_logs = "".join(p.read_text()[-2000:] for p in logs.rglob("std*.log"))
    assert (tmp_path / "stopped.json").exists(), out[-3000:] + worker_logs
    stopped = json.loads((tmp_path / "stopped.json").read_text())["step"]
    assert 3 <= stopped < LONG
    assert f"interrupted at step {stopped}: checkpoint saved" in rank_output(tmp_path, 0)
    assert "interrupted" not in rank_output(tmp_path, 1)
    assert "Traceback" not in worker_logs, worker_logs
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # one process resumes at that step and continues: the weights equal an uninterrupted run's
    resumed = long_trainer(ckpt=str(ckpt))
    resumed.load()
    assert resumed.step == stopped
    resumed.cfg = dataclasses.replace(resumed.cfg, ckpt_path=None)
    resumed.fit(steps=2)
    straight = long_trainer()
    straight.fit(steps=stopped + 2)
    err = max_diff(full_weights(resumed), full_weights(straight))
    print(f"{strategy}: Ctrl-C at step {stopped}, resumed on 1 rank, 2 steps on: {err:.2e} from an uninterrupted run")
    assert err < TOL


def test_an_interrupted_swap_resumes_from_the_old_folder(tmp_path, reference, capsys):
    """A crash between the two renames of a save leaves NAME.old (the last good checkpoint) and maybe NAME.tmp:
    the Trainer resumes from NAME.old, and the run continues exactly."""
    from labkit import distributed

    t = make_trainer()
    t.fit(steps=HALF)
    ckpt = tmp_path / "ckpt"
    distributed.save(ckpt, t.model, t.optimizer, t.generator, t._counters(), None)
    ckpt.rename(tmp_path / "ckpt.old")          # the crash: NAME moved aside, the new folder not yet renamed in
    (tmp_path / "ckpt.tmp").mkdir()             # and a half-written temp folder
    resumed = make_trainer(ckpt=str(ckpt))
    resumed.fit()
    assert f"at step {HALF}" in capsys.readouterr().out          # it resumed (a fresh start gives the same weights)
    assert resumed.step == STEPS and ckpt.exists()                 # and saved its own checkpoint at the end
    err = max_diff(full_weights(resumed), reference["final"])
    print(f"resumed from NAME.old, then trained on: {err:.2e} from the uninterrupted run")
    assert err < TOL


CHAPTER_CELLS = [
    ("parameters", "import labkit\nSIZE = labkit.size()"),
    ("", "%matplotlib inline\nimport json, os\nimport torch\nfrom labkit.train import TrainConfig, Trainer\n"
         "import test_labkit_distributed as t\n"
         "cfg = TrainConfig(max_steps=4, lr=3e-3, warmup_steps=1, grad_accum=2, eval_every=4, eval_batches=2,\n"
         "                  progress=False, live_plot=False)\n"
         "torch.manual_seed(0)\n"
         "trainer = Trainer(t.TinyGPT(), t.get_batch, config=cfg, device='cpu',\n"
         "                  eval_fn=lambda model: {'probe': float(sum(p.numel() for p in model.parameters()))})\n"
         "trainer.fit()"),
    ("", "print(f'RANK-LINE {os.environ.get(\"RANK\")} of {os.environ.get(\"WORLD_SIZE\")}')\n"
         "if trainer.is_main:\n"
         "    open('result.json', 'w').write(json.dumps(trainer.history))"),
]


def test_labkit_run_torchrun_runs_a_chapter_on_two_processes(tmp_path):
    """`labkit run NOTEBOOK --torchrun 2`: the chapter exported as a script (magics commented out), run by torchrun
    on 2 gloo ranks; only rank 0's output is shown; a chapter's eval_fn runs under torchrun too."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell(src, metadata={"tags": [tag] if tag else []}) for tag, src in CHAPTER_CELLS])
    path = tmp_path / "99_demo.ipynb"
    nbformat.write(nb, path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE.parent)]))
    env.pop("LABKIT_STRATEGY", None)
    proc = subprocess.run([sys.executable, "-m", "labkit", "run", str(path), "--torchrun", "2",
                           "--out", str(tmp_path / "99_demo.py")], capture_output=True, text=True, env=env,
                          timeout=240, cwd=tmp_path)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["processes"] == 2 and summary["ok"]
    assert "RANK-LINE 0 of 2" in proc.stdout and "RANK-LINE 1" not in proc.stdout
    assert "# %matplotlib inline" in (tmp_path / "99_demo.py").read_text()
    history = json.loads((tmp_path / "result.json").read_text())
    assert history[-1]["step"] == 4 and history[-1]["probe"] > 0 and "val_loss" in history[-1]


# ---------------------------------------------------------------- errors a user meets (no torchrun needed)
@pytest.fixture
def torchrun_env(monkeypatch):
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)


def test_world_size_must_divide_grad_accum(torchrun_env):
    with pytest.raises(ValueError, match="grad_accum=3 .* multiple of the world size 2"):
        Trainer(TinyGPT(), get_batch, config=TrainConfig(grad_accum=3, warmup_steps=0), device="cpu")


def test_missing_nccl_is_explained(torchrun_env, monkeypatch):
    from labkit import distributed

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(distributed.dist, "is_nccl_available", lambda: False)
    with pytest.raises(RuntimeError, match="no NCCL"):
        distributed.setup(torch.device("cuda"), "ddp", grad_accum=2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(RuntimeError, match="sees 1 GPU"):
        distributed.setup(torch.device("cuda"), "ddp", grad_accum=2)


def test_vram_per_gpu_shards_the_state_under_fsdp_only():
    from labkit.vram import TrainJob, estimate

    job = TrainJob(make_model=TinyGPT, make_batch=lambda: (torch.randint(VOCAB, (BATCH, SEQ)),) * 2,
                   loss_fn=lambda m, b: m(*b)[1], amp_dtype=None)
    one, ddp, fsdp = (estimate(job, world_size=4, strategy=s) if s else estimate(job) for s in (None, "ddp", "fsdp"))
    assert ddp.breakdown["params"] == one.breakdown["params"] and ddp.peak_bytes >= one.peak_bytes
    for cat in ("params", "grads", "optimizer"):
        assert fsdp.breakdown[cat] == -(-one.breakdown[cat] // 4)
    assert fsdp.breakdown["comm_buckets"] > 0
    with pytest.raises(ValueError, match="strategy must be"):
        estimate(job, world_size=2, strategy="zero")


def test_bad_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="strategy must be"):
        TrainConfig(strategy="zero3")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt")
    parser.add_argument("--bad-ckpt")
    parser.add_argument("--interrupt", action="store_true")
    args = parser.parse_args()
    interrupt_worker(args) if args.interrupt else worker(args)
