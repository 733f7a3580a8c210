"""How long each chapter takes at the tiny size, and how much memory it needs.

Runs every chapter notebook (found at run time: ``notebooks/NN_*.ipynb``) through ``labkit run NB --size tiny``
in a subprocess and measures, for each:

* ``seconds``: wall time of the whole ``labkit run`` process (kernel start, every cell, shutdown): what a reader
  waits. ``execute_seconds`` is labkit's own figure (the cells only).
* ``peak_rss_mib``: the largest *sum* of resident memory over the process tree (``labkit run`` + the Jupyter
  kernel + anything they start), polled every 0.1 s with psutil. A sum of RSS counts shared pages (libraries)
  once per process, so it errs high; a spike shorter than the poll interval can be missed.
* ``max_process_rss_mib``: the peak RSS of the largest single process of the tree (almost always the kernel),
  exact, from the kernel's accounting (``os.wait4``'s ``ru_maxrss``, which covers the waited-for descendants).

Writes ``benchmarks/results/course_time.json`` (``--only`` merges into it) and prints the targets: each chapter
<= 90 s, the whole course <= 15 min. ``--update-readme`` regenerates the README's chapter table (between
``<!-- chapters:start -->`` and ``<!-- chapters:end -->``) from that JSON plus each chapter's
``labkit vram NB --size full --json``; the chapter names come from each notebook's title, the full-size
description from the VRAM report's ``name``, so the table cannot go stale.

    python -m benchmarks course_time                       # every chapter (minutes)
    python -m benchmarks course_time --only 01_mingpt      # one chapter, merged into the JSON
    python -m benchmarks course_time --no-run              # only rebuild the README table from the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/course_time.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (GiB, MiB, RESULTS_DIR, ROOT, chapter_name, chapters, labkit_command,
                                machine_info, read_json, write_json)

CHAPTER_TARGET_S = 90
COURSE_TARGET_S = 15 * 60
START, END = "<!-- chapters:start -->", "<!-- chapters:end -->"
TABLE_HEADER = ("| # | chapter | notebook | tiny run (2 CPU cores) | full size "
                "| full-size peak, 12 GiB budget: estimated / measured on a GPU |\n"
                "|---|---|---|---|---|---|")
STALE_GIB = 0.05  # a GPU measurement whose own estimate differs more than this from today's is of another config


# ------------------------------------------------------------------ running one chapter
def _tree(pid: int):
    import psutil

    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _tree_rss(pid: int) -> int:
    import psutil

    total = 0
    for p in _tree(pid):
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def _kill_tree(pid: int) -> None:
    """End the process we started and its descendants (by pid: nothing else)."""
    import psutil

    procs = _tree(pid)
    for p in reversed(procs):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def run_chapter(nb: Path, out_dir: Path, timeout_s: float = 900, poll_s: float = 0.1) -> dict:
    """Run one chapter at the tiny size in a subprocess; return its timing and memory."""
    try:
        import psutil  # noqa: F401  (comes with jupyter)
        have_psutil = True
    except ImportError:
        have_psutil = False
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / f"{nb.stem}.tiny.ipynb"
    log = out_dir / f"{nb.stem}.tiny.log"
    cmd = [*labkit_command(), "run", str(nb), "--size", "tiny", "--out", str(executed)]
    env = {**os.environ, "LABKIT_SIZE": "tiny", "PYTHONUNBUFFERED": "1"}
    waited: dict = {}
    with open(log, "w") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

        def wait():  # wait4 reaps the child and returns its rusage (descendants it waited for included)
            _, status, usage = os.wait4(proc.pid, 0)
            waited.update(status=status, usage=usage, seconds=time.perf_counter() - t0)

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        peak_sum, timed_out = 0, False
        while waiter.is_alive():
            if have_psutil:
                peak_sum = max(peak_sum, _tree_rss(proc.pid))
            waiter.join(poll_s)
            if waiter.is_alive() and time.perf_counter() - t0 > timeout_s:
                timed_out = True
                _kill_tree(proc.pid)
                waiter.join()
    code = os.waitstatus_to_exitcode(waited["status"])
    proc.returncode = code  # already reaped by wait4: keep Popen from waiting again
    text = log.read_text(errors="replace")
    reported = {}
    for line in reversed(text.splitlines()):  # `labkit run` ends with one JSON line
        if line.startswith("{") and '"notebook"' in line:
            try:
                reported = json.loads(line)
            except json.JSONDecodeError:
                pass
            break
    result = {
        "seconds": round(waited["seconds"], 1),
        "execute_seconds": reported.get("seconds"),
        "peak_rss_mib": round(peak_sum / MiB) if have_psutil else None,
        "max_process_rss_mib": round(waited["usage"].ru_maxrss * 1024 / MiB),  # Linux: ru_maxrss is in KiB
        "ok": code == 0 and not timed_out,
        "exit_code": code,
        "executed_notebook": str(executed),
    }
    if timed_out:
        result["error"] = f"killed after {timeout_s:.0f} s"
    elif code != 0:
        result["error"] = text[-2000:]
    return result


# ------------------------------------------------------------------ the README table
def full_size_report(nb: Path, timeout_s: float = 600) -> dict | None:
    """``labkit vram NB --size full --json`` as a dict (None if the chapter has no vram cell or it failed)."""
    proc = subprocess.run([*labkit_command(), "vram", str(nb), "--size", "full", "--json"], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout_s, env={**os.environ, "LABKIT_SIZE": "full"})
    if proc.returncode not in (0, 1):  # 1 = estimated but does not fit: still a report
        print(f"  {nb.name}: labkit vram failed ({proc.returncode}): {proc.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    try:
        start = proc.stdout.index("{")
        return json.loads(proc.stdout[start:])
    except ValueError:
        print(f"  {nb.name}: labkit vram printed no JSON", file=sys.stderr)
        return None


def _fmt_tiny(entry: dict | None) -> str:
    if not entry:
        return "—"
    secs = f"{entry['seconds']:.0f} s"
    mem = entry.get("peak_rss_mib")
    cell = f"{secs}, {mem / 1024:.1f} GiB RAM" if mem else secs
    return cell if entry.get("ok") else f"fails ({secs})"


def _fmt_peak(report: dict | None, measured: dict | None = None) -> str:
    """``8.6 GiB ✓`` from the estimate alone; ``8.6 / 8.7 GiB ✓`` when a GPU measurement of the same config exists.

    A measurement counts only if the estimate recorded beside it (``gpu_memory.json``) still equals today's:
    after a config change it is of another config, and is left out rather than shown stale.
    """
    if not report:
        return "—"
    gib = report["peak_bytes"] / GiB
    real = (measured or {}).get("measured_total_gib")
    then = (measured or {}).get("estimate_gib")
    if real is not None and then is not None and abs(then - gib) <= STALE_GIB:
        fits = report["fits"] and measured.get("fits") is True
        return f"{gib:.1f} / {real:.1f} GiB " + ("✓" if fits else "✗ (over)")
    return f"{gib:.1f} GiB ✓" if report["fits"] else f"{gib:.1f} GiB ✗ (over)"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip() or "—"


def table(notebooks: list[Path], timings: dict, vram: dict, link_prefix: str = "notebooks/",
          measured: dict | None = None) -> str:
    """The README's chapter table; ``measured``: ``gpu_memory.json``'s chapters (real peaks on a GPU), if any."""
    measured = measured or {}
    rows = [TABLE_HEADER]
    for nb in notebooks:
        report = vram.get(nb.stem)
        rows.append("| " + " | ".join([
            nb.stem[:2],
            _cell(chapter_name(nb)),
            f"[`{nb.name}`]({link_prefix}{nb.name})",
            _fmt_tiny(timings.get(nb.stem)),
            _cell(report["name"]) if report else "—",
            _fmt_peak(report, measured.get(nb.stem)),
        ]) + " |")
    return "\n".join(rows)


def update_readme(readme: Path, new_table: str) -> bool:
    """Replace what lies between the chapter markers; True if the file changed."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} section to rewrite")
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    new = pattern.sub(lambda _: f"{START}\n{new_table}\n{END}", text, count=1)
    if new != text:
        readme.write_text(new)
    return new != text


# ------------------------------------------------------------------ main
def summarize(results: dict) -> tuple[str, bool]:
    """The table printed at the end, and whether every chapter ran (the speed targets are only reported)."""
    lines = [f"{'chapter':<22}{'seconds':>9}{'tree RSS MiB':>14}{'kernel RSS MiB':>16}   target <= {CHAPTER_TARGET_S} s"]
    all_ran, total = True, 0.0
    for stem, r in results.items():
        ok = r["ok"] and r["seconds"] <= CHAPTER_TARGET_S
        all_ran &= r["ok"]
        total += r["seconds"]
        verdict = "ok" if ok else ("FAILED" if not r["ok"] else "SLOW")
        lines.append(f"{stem:<22}{r['seconds']:>9.1f}{str(r.get('peak_rss_mib') or '—'):>14}"
                     f"{str(r.get('max_process_rss_mib') or '—'):>16}   {verdict}")
    course_ok = total <= COURSE_TARGET_S
    lines.append(f"{'sum (all measured)':<22}{total:>9.1f}{'':>30}   course target <= {COURSE_TARGET_S} s: "
                 + ("ok" if course_ok else "OVER"))
    return "\n".join(lines), all_ran


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks course_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[], metavar="NB",
                   help="run only these chapters (stem, file name or number; repeat or comma-separate)")
    p.add_argument("--no-run", action="store_true", help="run nothing: rebuild the README table from the JSON")
    p.add_argument("--update-readme", action="store_true", help="rewrite the README's chapter table afterwards")
    p.add_argument("--notebooks-dir", type=Path, default=None, help="where the chapters are (default notebooks/)")
    p.add_argument("--results", type=Path, default=RESULTS_DIR / "course_time.json")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "_build" / "runs", help="executed copies and logs")
    p.add_argument("--timeout", type=float, default=900, help="kill a chapter after this many seconds")
    args = p.parse_args(argv)
    only = [s for item in args.only for s in item.split(",") if s]
    notebooks = chapters(args.notebooks_dir, only)
    data = read_json(args.results)
    data.setdefault("chapters", {})

    if not args.no_run:
        if not notebooks:
            print(f"no chapter notebooks found in {args.notebooks_dir or 'notebooks/'}", file=sys.stderr)
            return 2
        data["machine"] = machine_info()
        for nb in notebooks:
            print(f"running {nb.name} at the tiny size ...", flush=True)
            data["chapters"][nb.stem] = r = run_chapter(nb, args.runs_dir, timeout_s=args.timeout)
            print(f"  {r['seconds']:.1f} s, tree RSS {r['peak_rss_mib']} MiB, kernel {r['max_process_rss_mib']} MiB"
                  + ("" if r["ok"] else f"  FAILED (exit {r['exit_code']}; log {args.runs_dir / (nb.stem + '.tiny.log')})"),
                  flush=True)
        data["chapters"] = dict(sorted(data["chapters"].items()))
        data["targets"] = {"chapter_s": CHAPTER_TARGET_S, "course_s": COURSE_TARGET_S}
        data["rss_method"] = ("peak_rss_mib: max over time of the summed RSS of the labkit-run process tree "
                              "(psutil, 0.1 s polls; shared pages counted per process); max_process_rss_mib: "
                              "ru_maxrss of the largest single process (the kernel), from os.wait4")
        write_json(args.results, data)
        print(f"wrote {args.results}")

    if data["chapters"]:
        present = {nb.stem for nb in chapters(args.notebooks_dir)}
        shown = {k: v for k, v in data["chapters"].items() if k in present}
        text, ok = summarize(shown)  # ok: every chapter ran; speed verdicts are printed, not enforced
        print(text)
        if data.get("machine"):
            m = data["machine"]
            print(f"measured on {m.get('cpu_model')}, {m.get('cores')} cores, torch {m.get('torch')}, {m.get('date')}")
    else:
        ok = True
        print(f"no timings in {args.results} yet")

    if args.update_readme or args.no_run:
        all_nbs = chapters(args.notebooks_dir)
        vram = {}
        for nb in all_nbs:
            import labkit.notebook

            if labkit.notebook.cells(nb, "vram"):
                print(f"estimating {nb.name} at full size ...", flush=True)
                vram[nb.stem] = full_size_report(nb)
        added = False
        for stem, report in vram.items():
            if report and stem in data["chapters"]:
                data["chapters"][stem]["full_size"] = {"name": report["name"], "peak_gib": round(report["peak_gib"], 2),
                                                       "fits": report["fits"]}
                added = True
        if added:
            write_json(args.results, data)
        gpu_file = RESULTS_DIR / "gpu_memory.json"
        measured = read_json(gpu_file).get("chapters", {}) if gpu_file.exists() else {}
        changed = update_readme(args.readme, table(all_nbs, data["chapters"], vram, measured=measured))
        print(f"{args.readme}: chapter table " + ("rewritten" if changed else "already up to date"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
