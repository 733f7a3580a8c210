"""The Trainer: exact resume, interrupt safety, schedule, config errors, and that it actually learns."""
import math
import os

import pytest
import torch
from torch import nn

from labkit.data import sort_task
from labkit.train import TrainConfig, Trainer, lr_at, save_atomic


class TinyModel(nn.Module):
    """Small, with dropout, so that resume must restore the dropout RNG as well as the data order."""

    def __init__(self, vocab=3, dim=32, length=11):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(length, dim))
        self.drop = nn.Dropout(0.2)
        self.mix = nn.Linear(length * dim, length * dim)
        self.head = nn.Linear(dim, vocab)
        self.length, self.dim = length, dim

    def forward(self, x, y):
        b, t = x.shape
        h = self.drop(self.emb(x) + self.pos[:t])
        h = h + torch.tanh(self.mix(h.reshape(b, -1))).reshape(b, t, -1)
        logits = self.head(h)
        return logits, nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)


def get_batch(split, g):
    return sort_task(16, generator=g)


def make(cfg, seed=0):
    torch.manual_seed(seed)
    return Trainer(TinyModel(), get_batch, config=cfg, device="cpu")


def cfg(**kw):
    base = dict(max_steps=30, lr=3e-3, warmup_steps=3, eval_every=10, eval_batches=2, progress=False, live_plot=False)
    base.update(kw)
    return TrainConfig(**base)


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_is_bit_identical(tmp_path):
    full = make(cfg())
    full.fit()
    ckpt = tmp_path / "run.pt"
    part = make(cfg(ckpt_path=str(ckpt)))
    part.fit(steps=13)                      # stops between evals: saved at the end of the call
    assert part.step == 13 and ckpt.exists()
    resumed = make(cfg(ckpt_path=str(ckpt)), seed=99)   # different init: everything must come from the file
    resumed.fit()
    assert resumed.step == 30
    assert same_weights(full.model, resumed.model)
    assert [h["train_loss_step"] for h in full.history] == [h["train_loss_step"] for h in resumed.history]


def test_resume_without_rng_restore_would_differ(tmp_path):
    """Guard against a vacuous identity test: a fresh trainer from the same weights but new RNG differs."""
    full = make(cfg())
    full.fit()
    part = make(cfg())
    part.fit(steps=13)
    other = make(cfg(), seed=0)
    other.model.load_state_dict(part.model.state_dict())
    other.optimizer.load_state_dict(part.optimizer.state_dict())
    other.step = 13                          # but generator and dropout RNG are fresh
    other.fit()
    assert not same_weights(full.model, other.model)


@pytest.mark.parametrize("accum", [1, 2])
def test_interrupt_saves_and_resumes_exactly(tmp_path, accum):
    """Ctrl-C in the middle of a step (after one micro-batch was consumed) loses nothing."""
    full = make(cfg(grad_accum=accum))
    full.fit()
    ckpt = tmp_path / "run.pt"
    calls = {"n": 0}

    def flaky_batch(split, g):
        if split == "train":
            calls["n"] += 1
            if calls["n"] == 15 * accum + 2 + accum:   # 15 steps, one eval (2 train batches), then mid-step 16
                raise KeyboardInterrupt
        return get_batch(split, g)

    torch.manual_seed(0)
    t = Trainer(TinyModel(), flaky_batch, config=cfg(ckpt_path=str(ckpt), grad_accum=accum), device="cpu")
    t.fit()
    assert t.step == 15 and ckpt.exists()
    resumed = make(cfg(ckpt_path=str(ckpt), grad_accum=accum), seed=5)
    resumed.fit()
    assert same_weights(full.model, resumed.model)


def test_grad_accumulation_matches_one_big_batch():
    """Two micro-batches of 8 with grad_accum=2 equal one batch of 16 (no dropout, same data)."""
    data = sort_task(16, generator=torch.Generator().manual_seed(1))

    def run(accum):
        torch.manual_seed(0)
        m = TinyModel()
        m.drop.p = 0.0
        parts = iter([(data[0][:8], data[1][:8]), (data[0][8:], data[1][8:])] if accum == 2 else [data])
        t = Trainer(m, lambda s, g: next(parts), config=cfg(max_steps=1, warmup_steps=0, grad_accum=accum, grad_clip=None),
                    device="cpu")
        t.train_step()
        return m

    a, b = run(1), run(2)
    err = max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    print(f"grad accumulation vs big batch: max abs weight diff {err:.2e}")
    assert err < 1e-6


def test_lr_schedule_shape():
    c = cfg(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(55, c) == pytest.approx(0.55)          # halfway through the cosine
    assert lr_at(100, c) == pytest.approx(0.1)
    assert all(lr_at(s, c) >= lr_at(s + 1, c) for s in range(10, 100))


@pytest.mark.parametrize("bad", [dict(max_steps=0), dict(grad_accum=0), dict(warmup_steps=500), dict(lr=-1.0)])
def test_bad_config_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="bad TrainConfig"):
        cfg(**bad)


def test_it_learns_the_sort_task():
    t = make(cfg(max_steps=150, warmup_steps=10, eval_every=150))
    hist = t.fit()
    first, last = hist[0]["train_loss_step"], hist[-1]["val_loss"]
    print(f"sort task: loss {first:.3f} -> val {last:.3f}")
    assert last < 0.6 * first and math.isfinite(last)


def test_weight_decay_only_on_matrices():
    t = make(cfg())
    groups = t.optimizer.param_groups
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] > 0
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0


def test_vectors_with_unit_dimensions_are_not_decayed():
    from labkit.train import adamw

    m = torch.nn.Module()
    m.mix = torch.nn.Parameter(torch.zeros(1, 1, 8))        # RWKV's time_mix: a vector, stored 3-D
    m.conv = torch.nn.Parameter(torch.zeros(4, 4, 3, 3))    # a conv kernel: a matrix
    decay, no_decay = adamw(m, TrainConfig()).param_groups
    assert [p.shape for p in decay["params"]] == [m.conv.shape]
    assert [p.shape for p in no_decay["params"]] == [m.mix.shape]


def test_adamw_takes_a_model_or_parameters_and_honours_no_weight_decay():
    from labkit.train import adamw

    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.zeros(4, 3))
    m.A_log = torch.nn.Parameter(torch.zeros(4, 3))           # a matrix that mamba-ssm exempts
    m.A_log._no_weight_decay = True
    m.frozen = torch.nn.Parameter(torch.zeros(4, 3), requires_grad=False)
    cfg = TrainConfig(lr=1e-3, weight_decay=0.3, betas=(0.8, 0.9))
    for opt in (adamw(m, cfg), adamw(m.parameters(), cfg), adamw(list(m.parameters()), cfg, "cpu")):
        decay, no_decay = opt.param_groups
        assert [id(p) for p in decay["params"]] == [id(m.w)] and [id(p) for p in no_decay["params"]] == [id(m.A_log)]
        assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0 and decay["betas"] == (0.8, 0.9)
    assert adamw(m, cfg, "cpu").param_groups[0]["fused"] and not adamw(m, cfg).param_groups[0]["fused"]
    assert adamw(m, cfg, lr=5e-4, weight_decay=0.0).param_groups[0]["weight_decay"] == 0.0
    with pytest.raises(TypeError, match="unexpected"):
        adamw(m, cfg, momentum=0.9)


def test_the_vram_trace_keeps_the_no_weight_decay_marker():
    """The estimator rebuilds parameters on fake storage (to_empty): the marker must survive, so that the traced
    optimizer has the same groups as the one that trains."""
    import labkit.vram
    from labkit.train import adamw

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(8, 8))
            self.A_log = torch.nn.Parameter(torch.ones(8, 8))
            self.A_log._no_weight_decay = True

        def forward(self, x):
            return (x @ self.w @ self.A_log).sum()

    groups = []

    def make_optimizer(params):
        opt = adamw(params, TrainConfig(), "cuda")
        groups.append([len(g["params"]) for g in opt.param_groups])
        return opt

    labkit.vram.estimate(labkit.vram.TrainJob(make_model=Two, make_batch=lambda: torch.ones(2, 8),
                                              loss_fn=lambda m, x: m(x), make_optimizer=make_optimizer))
    assert groups == [[1, 1]]


def test_param_group_lr_scale_multiplies_the_schedule():
    t = make(cfg(max_steps=3, warmup_steps=0))
    base = t.optimizer.param_groups[0]
    fast = dict(base, params=[], lr_scale=3.0)
    t.optimizer.add_param_group(fast)
    t.train_step()
    groups = t.optimizer.param_groups
    assert groups[-1]["lr"] == pytest.approx(3.0 * groups[0]["lr"]) and groups[0]["lr"] > 0


def test_atomic_save_leaves_no_temp_files(tmp_path):
    save_atomic({"x": torch.ones(3)}, tmp_path / "a.pt")
    assert os.listdir(tmp_path) == ["a.pt"]
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["x"], torch.ones(3))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_atomic({"x": Boom()}, tmp_path / "a.pt")
    assert os.listdir(tmp_path) == ["a.pt"]            # the old checkpoint survives, no temp left
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["x"], torch.ones(3))


def test_out_of_memory_is_answered_with_the_knobs():
    def oom(split, g):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    t = Trainer(TinyModel(), oom, config=cfg(), device="cpu")
    with pytest.raises(RuntimeError) as e:
        t.fit()
    msg = str(e.value)
    assert "ran out of memory at step 0" in msg and "grad_accum" in msg and "labkit vram" in msg
    assert isinstance(e.value.__cause__, torch.cuda.OutOfMemoryError)


def test_throughput_and_mfu_are_logged():
    t = Trainer(TinyModel(), get_batch, config=cfg(max_steps=10, log_every=5), device="cpu",
                items_per_batch=16 * 11, flops_per_item=1e6, peak_flops=1e12)
    hist = t.fit()
    logged = [h for h in hist if "items_per_s" in h]
    assert [h["step"] for h in logged] == [5, 10]
    for h in logged:
        assert h["items_per_s"] > 0
        assert h["mfu"] == pytest.approx(h["items_per_s"] * 1e6 / 1e12)


def test_forced_bf16_autocast_and_bad_amp_value():
    t = Trainer(TinyModel(), get_batch, config=cfg(max_steps=4, amp="bf16"), device="cpu")
    assert t.amp_dtype == torch.bfloat16
    t.fit()
    with pytest.raises(ValueError, match="amp must be"):
        Trainer(TinyModel(), get_batch, config=cfg(amp="int4"), device="cpu")


class Average:
    """An EMA-like object tracked by the Trainer: a running mean of the weights, updated after each step."""

    def __init__(self, model):
        self.model, self.sum = model, {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
        self.count = torch.zeros((), dtype=torch.long)

    def update(self):
        self.count += 1
        for k, v in self.model.state_dict().items():
            self.sum[k] += v

    def state_dict(self):
        return {"sum": {k: v.clone() for k, v in self.sum.items()}, "count": self.count.clone()}

    def load_state_dict(self, state):
        self.sum, self.count = {k: v.clone() for k, v in state["sum"].items()}, state["count"].clone()


def tracked_run(config, seed=0):
    trainer = make(config, seed)
    avg = Average(trainer.model)
    trainer.track("average", avg)
    trainer.optimizer.register_step_post_hook(lambda *_: avg.update())
    return trainer, avg


def test_tracked_state_resumes_with_the_run(tmp_path):
    """Trainer.track: the EMA-like object is saved with each checkpoint and restored on resume, so the resumed
    run's average equals an uninterrupted one's; a checkpoint without it is refused with a clear message."""
    full, full_avg = tracked_run(cfg())
    full.fit()
    ckpt = tmp_path / "run.pt"
    part, _ = tracked_run(cfg(ckpt_path=str(ckpt)))
    part.fit(steps=13)
    resumed, avg = tracked_run(cfg(ckpt_path=str(ckpt)), seed=99)
    resumed.fit()
    assert int(avg.count) == int(full_avg.count) == 30
    assert all(torch.equal(avg.sum[k], full_avg.sum[k]) for k in avg.sum)
    plain = tmp_path / "plain.pt"
    make(cfg(ckpt_path=str(plain))).fit(steps=5)
    with pytest.raises(ValueError, match=r"no state for \['average'\].*Trainer.track"):
        tracked_run(cfg(ckpt_path=str(plain)))[0].fit()
    with pytest.raises(TypeError, match="needs state_dict"):
        make(cfg()).track("x", object())
