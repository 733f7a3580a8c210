"""The benchmark scripts' logic, on small notebooks made here. Speed targets are never asserted."""
import json
import os
import subprocess
import sys

import nbformat
import pytest
import torch

import benchmarks
from benchmarks import KERNELS, SCRIPTS, Kernel, __main__ as bench_main
from benchmarks import course_time, cpu_mfu, gpu_memory, kernels
from benchmarks._common import chapter_name, chapter_title, chapters, load_notebook

from .conftest import ROOT
from .test_labkit_notebook import make_nb

# A compact GPT with nanoGPT's interface (config dataclass, forward(idx, targets) -> (logits, loss)) and fused
# attention, so the FLOP count must add the CPU attention kernel by formula.
GPT_CELL = '''import torch
import torch.nn.functional as F
from types import SimpleNamespace
from torch import nn


class GPTConfig(SimpleNamespace):
    def __init__(self, block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=True):
        super().__init__(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                         n_embd=n_embd, dropout=dropout, bias=bias)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h = c.n_head
        self.ln1, self.ln2 = nn.LayerNorm(c.n_embd, bias=c.bias), nn.LayerNorm(c.n_embd, bias=c.bias)
        self.qkv, self.proj = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias), nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.up, self.down = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias), nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(C, 2))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.tok, self.pos = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.head = nn.Linear(c.n_embd, c.vocab_size, bias=False)

    def forward(self, idx, targets=None):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln(x))
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten()) if targets is not None else None
'''

VRAM_CELL = '''import torch
from torch import nn
import labkit
from labkit.vram import TrainJob

WIDTH = labkit.pick(tiny=32, full=256)


def vram_job():
    return TrainJob(make_model=lambda: nn.Sequential(nn.Embedding(50, WIDTH), nn.Linear(WIDTH, 50)),
                    make_batch=lambda: torch.randint(0, 50, (4, 8)),
                    loss_fn=lambda m, x: m(x).logsumexp(-1).mean(), amp_dtype=None, name=f"toy LM {WIDTH} wide")
'''

BENCH_CELL = '''def benchmark_toy(lengths):
    return {"lengths": list(lengths), "doubled": [2 * n for n in lengths]}
'''


@pytest.fixture
def nbdir(tmp_path):
    d = tmp_path / "notebooks"
    d.mkdir()
    make_nb(d / "96_toy.ipynb", [
        ("md", "# 96 · Toy chapter\n\nA chapter made by the tests.", []),
        ("code", "import labkit\nSIZE = labkit.size()\nprint('size', SIZE)", ["parameters"]),
        ("code", GPT_CELL, ["model"]),
        ("code", VRAM_CELL, ["vram"]),
        ("code", BENCH_CELL, ["bench"]),
        ("code", "print(GPT(GPTConfig())(torch.zeros(1, 4, dtype=torch.long))[0].shape)", []),
    ])
    make_nb(d / "95_plain.ipynb", [("md", "Intro without a heading", []), ("code", "X = 1", ["parameters"])])
    (d / "notes.ipynb").write_text("{}")  # not a chapter: no NN_ prefix
    return d


# ------------------------------------------------------------------ the package and the entry point
def test_the_repo_package_is_imported_not_fairscales():
    # fairscale installs a top-level `benchmarks` package too; the tests must see ours.
    assert benchmarks.__file__.startswith(str(ROOT))


def test_entry_point_lists_and_dispatches(capsys):
    assert bench_main.main([]) == 0
    listed = capsys.readouterr().out
    for name in [*SCRIPTS, *KERNELS]:
        assert name in listed
    assert {"course_time", "cpu_mfu", "gpu_memory"} <= set(SCRIPTS) and "mamba_scans" in KERNELS
    assert bench_main.main(["no_such_benchmark"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_entry_point_runs_as_a_module_from_the_repo_root():
    out = subprocess.run([sys.executable, "-m", "benchmarks"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "cpu_mfu" in out.stdout, out.stderr


# ------------------------------------------------------------------ shared helpers
def test_chapters_are_discovered_and_filtered(nbdir):
    assert [p.name for p in chapters(nbdir)] == ["95_plain.ipynb", "96_toy.ipynb"]
    assert [p.stem for p in chapters(nbdir, ["96"])] == ["96_toy"]
    assert [p.stem for p in chapters(nbdir, ["96_toy.ipynb"])] == ["96_toy"]
    with pytest.raises(SystemExit, match="no chapter notebook named 42_x"):
        chapters(nbdir, ["42_x"])


def test_chapter_title_comes_from_the_notebook(nbdir, tmp_path):
    assert chapter_title(nbdir / "96_toy.ipynb") == "Toy chapter"
    assert chapter_title(nbdir / "95_plain.ipynb") == "plain"  # no heading: the file name
    nb = make_nb(tmp_path / "03_x.ipynb", [("md", "# 03 · nanoGPT: GPT-2 (124M), trained - for real\ntext", [])])
    assert chapter_title(nb) == "nanoGPT: GPT-2 (124M), trained - for real" and chapter_name(nb) == "nanoGPT"


def test_notebook_loading_supports_dataclasses(tmp_path):
    # labkit.notebook.load alone fails on a @dataclass in a cell (see benchmarks._common.load_notebook)
    nb = make_nb(tmp_path / "94_dc.ipynb", [
        ("code", "from dataclasses import dataclass\n\n@dataclass\nclass Config:\n    n_layer: int = 1", ["model"])])
    assert load_notebook(nb)["Config"](n_layer=3).n_layer == 3


# ------------------------------------------------------------------ course_time
def test_readme_table_is_rebuilt_between_the_markers(nbdir, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{course_time.START}\n| old | table |\n{course_time.END}\n\nafter\n")
    timings = {"96_toy": {"seconds": 41.6, "peak_rss_mib": 900, "ok": True},
               "95_plain": {"seconds": 12.0, "peak_rss_mib": None, "ok": False}}
    vram = {"96_toy": {"name": "toy LM 256 wide", "peak_bytes": int(9.6 * 2**30), "peak_gib": 9.6, "fits": True}}
    table = course_time.table(chapters(nbdir), timings, vram)
    assert course_time.update_readme(readme, table)
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore") and text.rstrip().endswith("after") and "| old |" not in text
    lines = text.split(course_time.START)[1].split(course_time.END)[0].strip().splitlines()
    assert lines[0] == course_time.TABLE_HEADER.splitlines()[0]
    assert lines[2] == "| 95 | plain | [`95_plain.ipynb`](notebooks/95_plain.ipynb) | fails (12 s) | — | — |"
    assert lines[3] == ("| 96 | Toy chapter | [`96_toy.ipynb`](notebooks/96_toy.ipynb) | 42 s, 0.9 GiB RAM | "
                        "toy LM 256 wide | 9.6 GiB ✓ |")
    assert not course_time.update_readme(readme, table)  # idempotent
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="chapters:start"):
        course_time.update_readme(readme, table)


def test_readme_peak_shows_a_gpu_measurement_only_of_the_same_config():
    report = {"name": "toy", "peak_bytes": int(8.57 * 2**30), "peak_gib": 8.57, "fits": True}
    same = {"estimate_gib": 8.57, "measured_total_gib": 8.74, "fits": True}
    assert course_time._fmt_peak(report, same) == "8.6 / 8.7 GiB ✓"
    over = {"estimate_gib": 8.57, "measured_total_gib": 12.3, "fits": False}
    assert course_time._fmt_peak(report, over) == "8.6 / 12.3 GiB ✗ (over)"
    stale = {"estimate_gib": 10.5, "measured_total_gib": 11.03, "fits": True}  # measured before a config change
    assert course_time._fmt_peak(report, stale) == course_time._fmt_peak(report) == "8.6 GiB ✓"
    failed = {"estimate_gib": 8.57, "measured_total_gib": None, "fits": None}
    assert course_time._fmt_peak(report, failed) == "8.6 GiB ✓"


def test_summary_reports_targets_without_enforcing_them():
    text, all_ran = course_time.summarize({"a": {"seconds": 120.0, "ok": True}, "b": {"seconds": 5.0, "ok": True}})
    assert all_ran and "SLOW" in text and "ok" in text
    _, all_ran = course_time.summarize({"a": {"seconds": 1.0, "ok": False}})
    assert not all_ran


@pytest.mark.slow
def test_course_time_runs_one_chapter_and_updates_the_readme(nbdir, tmp_path, capsys):
    results, readme = tmp_path / "course_time.json", tmp_path / "README.md"
    readme.write_text(f"{course_time.START}\n{course_time.END}\n")
    code = course_time.main(["--only", "96_toy", "--notebooks-dir", str(nbdir), "--results", str(results),
                             "--readme", str(readme), "--runs-dir", str(tmp_path / "runs"), "--update-readme"])
    out = capsys.readouterr().out
    print(out)
    assert code == 0, out
    data = json.loads(results.read_text())
    r = data["chapters"]["96_toy"]
    assert r["ok"] and r["seconds"] > 0 and r["execute_seconds"] > 0 and set(data["chapters"]) == {"96_toy"}
    # the kernel (torch imported) is the largest process: well over 100 MiB; the tree sum is at least that
    assert r["max_process_rss_mib"] > 100 and r["peak_rss_mib"] >= r["max_process_rss_mib"] * 0.9
    assert {"cpu_model", "cores", "torch", "date"} <= set(data["machine"])
    assert r["full_size"] == {"name": "toy LM 256 wide", "peak_gib": pytest.approx(0.5, abs=0.05), "fits": True}
    assert "size tiny" in json.dumps(nbformat.read(r["executed_notebook"], as_version=4).cells[1].outputs)
    row = next(line for line in readme.read_text().splitlines() if "96_toy" in line)
    assert "Toy chapter" in row and "toy LM 256 wide" in row and "GiB ✓" in row and " s, " in row
    assert "95_plain" in readme.read_text()  # every chapter gets a row, timed or not
    # --no-run only rebuilds the README from the JSON
    readme.write_text(f"{course_time.START}\n{course_time.END}\n")
    assert course_time.main(["--no-run", "--notebooks-dir", str(nbdir), "--results", str(results),
                             "--readme", str(readme)]) == 0
    assert "toy LM 256 wide" in readme.read_text()


# ------------------------------------------------------------------ cpu_mfu
def test_flop_count_adds_cpu_attention_by_formula(nbdir):
    GPT, GPTConfig, _ = cpu_mfu.load_gpt(str(nbdir / "96_toy.ipynb"))
    c = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16)
    model = GPT(c)
    B, T, C, V, L = 3, 16, 16, 32, 2
    x = torch.randint(0, V, (B, T))
    flops = cpu_mfu.count_flops(model, x, x)
    attention_fwd = L * 4 * B * T * T * C  # QK^T and PV, dense
    assert flops["attention_by_formula"] == 3 * attention_fwd  # forward + a backward of twice that
    linear = L * (3 * C * C + C * C + 8 * C * C) + C * V  # weights per token of every matmul
    assert flops["total"] - flops["attention_by_formula"] == 3 * 2 * B * T * linear
    assert flops["total_causal_halved"] == flops["total"] - 3 * attention_fwd // 2
    # the same count under bf16 autocast
    assert cpu_mfu.count_flops(model, x, x, bf16=True)["total"] == flops["total"]


def test_gemm_roofline_measures_something():
    r = cpu_mfu.gemm_flops(64, torch.float32, repeats=2)
    assert r["flops_per_s"] > 0 and r["best_s"] <= r["median_s"] and r["n"] == 64


def test_cpu_mfu_end_to_end_on_a_small_setting(nbdir, tmp_path, capsys):
    out = tmp_path / "cpu_mfu.json"
    # the default is nanoGPT's CPU recipe; a smaller shape keeps this test fast
    assert cpu_mfu.RECIPE == dict(vocab_size=96, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
                                  bias=False, batch_size=12)
    small = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "block_size=16", "--set", "batch_size=2"]
    assert cpu_mfu.main(["--notebook", str(nbdir / "96_toy.ipynb"), "--gemm-n", "128", "--gemm-repeats", "2",
                         "--warmup", "1", "--iters", "2", "--profile-steps", "1", "--out", str(out), *small]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["recipe"]["n_layer"] == 1 and r["recipe"]["batch_size"] == 2 and r["model_source"] == "96_toy"
    assert r["is_nanogpt_cpu_recipe"] is False and r["runs"]["fp32"]["tokens_per_s"] > 0
    for prec in ("fp32", "bf16"):
        run = r["runs"][prec]
        assert run["median_step_s"] > 0 and 0 < run["profile"]["gemm_share"] < 1 and run["diagnosis"]
        assert run["mfu_vs_fp32_roofline"] == pytest.approx(
            r["flops_per_step"]["total"] / run["median_step_s"] / r["roofline"]["fp32"]["flops_per_s"])
    assert "what limits it" in printed and "MFU" in printed


def test_cpu_mfu_says_which_chapter_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="none of .*99_absent"):
        cpu_mfu.load_gpt(str(tmp_path / "99_absent.ipynb"))


# ------------------------------------------------------------------ gpu_memory
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_gpu_memory_without_cuda_exits_with_a_clear_message(capsys):
    assert gpu_memory.main([]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--device cpu --dry-run" in err


REQUIRED = {"peak_reserved_gib", "peak_allocated_gib", "estimate_gib", "error_pct", "step_s", "fits", "error"}


def test_gpu_memory_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu_memory.main(["--device", "cpu", "--dry-run", "--steps", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert {"device", "torch", "chapters"} <= set(r)
    entry = r["chapters"]["dry_run"]
    assert REQUIRED <= set(entry) and entry["error"] is None and entry["steps_done"] == 1
    assert entry["step_s"] > 0 and entry["estimate_gib"] > 0.5  # includes the CUDA-context line
    assert entry["alloc_conf"] == os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")


def test_gpu_memory_passes_the_allocator_setting_to_its_workers(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    out = tmp_path / "gpu_memory.json"
    assert gpu_memory.main(["--device", "cpu", "--dry-run", "--steps", "1", "--expandable-segments",
                            "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["alloc_conf"] == r["chapters"]["dry_run"]["alloc_conf"] == "expandable_segments:True"


def test_gpu_memory_reads_the_chapters_vram_jobs(nbdir, tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu_memory.main(["--device", "cpu", "--size", "tiny", "--notebooks-dir", str(nbdir), "--steps", "1",
                            "--out", str(out)]) == 0
    chapters_ = json.loads(out.read_text())["chapters"]
    assert list(chapters_) == ["96_toy"]  # 95_plain has no vram cell
    entry = chapters_["96_toy"]
    assert entry["name"] == "toy LM 32 wide" and entry["item"] == "tokens" and entry["items_per_s"] > 0


def test_gpu_memory_measures_a_chapters_further_jobs(nbdir, tmp_path):
    """--job NB=NAME: vram_job(NAME) measured too, under "jobs" (the "chapters" readers keep one entry each)."""
    cell = VRAM_CELL.replace("def vram_job():", "def vram_job(which='narrow'):\n    w = {'narrow': WIDTH, 'wide': 2 * WIDTH}[which]")
    cell = cell.replace("nn.Embedding(50, WIDTH), nn.Linear(WIDTH, 50)", "nn.Embedding(50, w), nn.Linear(w, 50)")
    cell = cell.replace('name=f"toy LM {WIDTH} wide"', 'name=f"toy LM {w} wide"')
    make_nb(nbdir / "94_jobs.ipynb", [("code", "import labkit\nSIZE = labkit.size()", ["parameters"]),
                                      ("code", "X = 1", ["model"]), ("code", cell, ["vram"])])
    out = tmp_path / "gpu.json"
    assert gpu_memory.main(["--device", "cpu", "--size", "tiny", "--notebooks-dir", str(nbdir), "--steps", "1",
                            "--only", "94", "--job", "94_jobs=wide", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert list(r["chapters"]) == ["94_jobs"] and r["chapters"]["94_jobs"]["name"] == "toy LM 32 wide"
    assert list(r["jobs"]) == ["94_jobs:wide"] and r["jobs"]["94_jobs:wide"]["name"] == "toy LM 64 wide"
    assert r["jobs"]["94_jobs:wide"]["error"] is None
    with pytest.raises(SystemExit, match="CHAPTER=NAME"):
        gpu_memory.main(["--device", "cpu", "--notebooks-dir", str(nbdir), "--job", "94_jobs", "--out", str(out)])


def test_measure_records_an_out_of_memory_error_instead_of_crashing():
    from labkit.vram import TrainJob

    def boom(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    job = TrainJob(make_model=lambda: torch.nn.Linear(4, 4), make_batch=lambda: torch.randn(2, 4), loss_fn=boom,
                   amp_dtype=None)
    r = gpu_memory.measure(job, "cpu", steps=1)
    assert r["fits"] is False and "out of memory under the 12 GiB cap" in r["error"]
    job.loss_fn = lambda m, x: 1 / 0
    r = gpu_memory.measure(job, "cpu", steps=1)
    assert r["fits"] is None and r["error"].startswith("ZeroDivisionError")


def test_items_are_tokens_for_ids_and_samples_for_images():
    assert gpu_memory.items_in((torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, 8, dtype=torch.long))) == (32, "tokens")
    assert gpu_memory.items_in({"x": torch.zeros(6, 3, 8, 8), "t": torch.zeros(6, dtype=torch.long)}) == (6, "samples")


# ------------------------------------------------------------------ chapter kernels
def test_every_registered_kernel_is_defined_in_its_chapter():
    """Each KERNELS entry names a chapter notebook that defines the function in a `model` or `bench` cell."""
    import labkit.notebook

    for name, k in KERNELS.items():
        path = labkit.notebook.resolve(k.notebook)
        sources = labkit.notebook.cells(path, "model") + labkit.notebook.cells(path, "bench")
        assert any(f"def {k.function}(" in src for src in sources), f"{name}: {path.name} defines no {k.function}"


def test_kernel_benchmark_runs_the_notebooks_function(nbdir, tmp_path, capsys):
    out = tmp_path / "toy.json"
    k = Kernel(str(nbdir / "96_toy.ipynb"), "benchmark_toy", "toy", {"lengths": (1, 2)})
    assert kernels.run_kernel("toy", k, ["--arg", "lengths=3,4", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["result"] == {"lengths": [3, 4], "doubled": [6, 8]} and r["kwargs"] == {"lengths": [3, 4]}
    missing = Kernel(str(nbdir / "96_toy.ipynb"), "benchmark_absent", "toy")
    assert kernels.run_kernel("toy", missing, ["--out", str(out)]) == 2
    assert "defines no `benchmark_absent`" in capsys.readouterr().err
