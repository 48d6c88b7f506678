"""Build the technical report from run directories: ``make -C paper RUNS=DIR`` (or ``python paper/build.py``).

Every number in the text is a ``{{macro}}`` filled from ``numbers.json`` and every table and figure is regenerated,
all by ``experiments/diloco_report.py`` from RUNS (a ``reproduce_diloco.py --out`` folder) and, for the Streaming
DiLoCo section (macros ``streaming.*``), by ``experiments/streaming_report.py`` from STREAMING_RUNS (a
``reproduce_streaming.py --out`` folder) and, for the attacks section (macros ``attacks.*``), by
``experiments/attacks_report.py`` from ATTACKS_RUNS (a ``reproduce_attacks.py --out`` folder) and, for the
heterogeneous-swarm section (macros ``heterogeneous.*``), by ``experiments/reproduce_heterogeneous.py`` from
HETEROGENEOUS_RUNS (its ``--out`` folder) and, for the SWARM section (macros ``swarm.*``), by
``experiments/reproduce_swarm.py`` from SWARM_RUNS (its ``--out`` folder), its measured throughput on locoswarm-netem
(macros ``netem_swarm.*``) by ``experiments/netem_swarm_study.py`` from NETEM_SWARM_RUNS, and for the two-scale
table (macros ``small.*``) by ``experiments/diloco_report.py`` from SMALL_RUNS (a ``reproduce_diloco.py --scale
small`` folder, whole or partly run). A macro the data does not define is an error, never a blank. Outputs in OUT:
``report.md`` (the filled text), ``report.pdf``, ``numbers.json``, ``tables/`` and ``figures/``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "experiments"))
sys.path.insert(0, str(HERE))

MACRO = re.compile(r"\{\{\s*([\w.:\-]+)\s*\}\}")


def resolve_runs(runs: str) -> Path:
    """RUNS as given, relative to paper/ (make -C paper) or to the repository root, whichever holds plan.json."""
    p = Path(runs)
    for cand in [p] if p.is_absolute() else [HERE / p, REPO / p, Path.cwd() / p]:
        if (cand / "plan.json").exists():
            return cand.resolve()
    raise SystemExit(f"paper/build.py: no plan.json under {runs!r} (run experiments/reproduce_diloco.py, "
                     "reproduce_streaming.py or reproduce_attacks.py --out DIR first, then make -C paper RUNS=DIR, "
                     "STREAMING_RUNS=DIR or ATTACKS_RUNS=DIR with DIR absolute or relative to the repository root)")  # fmt: skip


def fill(template: str, numbers: dict[str, str], tables: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key.startswith("table:"):
            name = key.split(":", 1)[1]
            if name not in tables:
                raise KeyError(f"report.md uses {{{{{key}}}}} but RUNS has no '{name}' table (have: {sorted(tables)})")
            return tables[name]
        if key not in numbers:
            raise KeyError(f"report.md uses {{{{{key}}}}} but numbers.json has no such key")
        return numbers[key]

    return MACRO.sub(sub, template)


def setup_table(rep, numbers: dict[str, str]) -> str:
    """The paper's setting next to this one (the paper's column: Douillard et al. 2023, Table 1 and Section 3)."""
    sc = rep.scale
    model = [o.split("=", 1)[1] for o in sc["model"] if o.startswith("model=")][0]
    data = [o.split("=", 1)[1] for o in sc["data"] if o.startswith("data=")][0]
    rows = [
        ("model", "150M-parameter transformer (60M / 400M in the model-size ablation)",
         f"{numbers['params']} parameters ({model}{' + overrides' if len(sc['model']) > 1 else ''})"),
        ("data", "C4", data),
        ("workers K", "8", str(sc["workers"])),
        ("inner steps H", "500", str(sc["H"])),
        ("total inner steps", "88k", str(sc["max_steps"])),
        ("synchronous warm-start", "24k steps", f"{sc['warmup_sync']} steps"),
        ("inner optimiser", "AdamW", "AdamW"),
        ("outer optimiser", "Nesterov, lr 0.7, momentum 0.9", "Nesterov, lr 0.7, momentum 0.9"),
    ]  # fmt: skip
    return "\n".join(
        ["| | DiLoCo paper | here |", "| --- | --- | --- |", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    )


def streaming_section(runs: Path, out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Numbers (``streaming.*``) and tables (``streaming``, ``streaming_claims``) of the Streaming DiLoCo section;
    draws ``figures/streaming.png``."""
    import streaming_report as sr

    rep = sr.load(runs)
    t = sr.study_table(rep)
    c = sr.claims(t)
    nums = sr.numbers(rep, t, c)
    nums["streaming.params"] = f"{count_params(rep) / 1e6:.2f}M"
    nums["streaming.runs_dir"] = str(runs.relative_to(REPO)) if runs.is_relative_to(REPO) else str(runs)
    t.to_csv(out / "tables" / "streaming.csv", index=False)
    c.to_csv(out / "tables" / "streaming_claims.csv", index=False)
    sr.figure(rep, t, out / "figures" / "streaming.png")
    return nums, {"streaming": sr.to_markdown(t), "streaming_claims": sr.claims_markdown(c, rep.plan["scale"])}


def attacks_section(runs: Path, out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Numbers (``attacks.*``) and tables (``attacks``, ``attacks_rejections``, ``attacks_verify``) of the attacks
    section; draws ``figures/attacks.png``."""
    import attacks_report as ar

    rep = ar.load(runs)
    trim = ar.trim_of(rep.plan["attacks"])
    t = ar.cells_table(rep)
    v = ar.verify_table(rep)
    nums = ar.numbers(rep, t, v)
    nums["attacks.params"] = f"{count_params(rep, ar.cell('mean')) / 1e6:.2f}M"
    nums["attacks.runs_dir"] = str(runs.relative_to(REPO)) if runs.is_relative_to(REPO) else str(runs)
    t.to_csv(out / "tables" / "attacks.csv", index=False)
    v.to_csv(out / "tables" / "attacks_verify.csv", index=False)
    ar.figure(t, out / "figures" / "attacks.png", trim)
    at = rep.plan["attacks"]
    return nums, {"attacks": ar.to_markdown(t, trim), "attacks_rejections": ar.rejections_markdown(t, trim),
                  "attacks_verify": ar.verify_markdown(v, at["verify_fraction"], at["lazy_fraction"])}  # fmt: skip


def heterogeneous_section(runs: Path, out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Numbers (``heterogeneous.*``) and the table (``heterogeneous``) of the heterogeneous-swarm section; draws
    ``figures/heterogeneous.png``."""
    import reproduce_heterogeneous as rh

    nums, tables = rh.paper_numbers(runs)
    rh.figure(runs, out / "figures" / "heterogeneous.png")
    nums["heterogeneous.runs_dir"] = str(runs.relative_to(REPO)) if runs.is_relative_to(REPO) else str(runs)
    return nums, tables


def swarm_section(runs: Path, out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Numbers (``swarm.*``) and the table (``swarm``) of the SWARM section; draws ``figures/swarm.png``."""
    import reproduce_swarm as rs

    nums, tables = rs.paper_numbers(runs)
    rs.figure(runs, out / "figures" / "swarm.png")
    nums["swarm.runs_dir"] = str(runs.relative_to(REPO)) if runs.is_relative_to(REPO) else str(runs)
    return nums, tables


def netem_swarm_section(runs: Path, out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Numbers (``netem_swarm.*``) and the table (``netem_swarm``) of the SWARM section's measured throughput on
    locoswarm-netem; draws ``figures/netem_swarm.png``."""
    import netem_swarm_study as ns

    nums, tables = ns.paper_numbers(runs)
    _, numbers = ns.table(runs, json.loads((runs / "plan.json").read_text())["seeds"])  # report/ is not committed
    ns.figure(numbers, out / "figures" / "netem_swarm.png")
    nums["netem_swarm.runs_dir"] = str(runs.relative_to(REPO)) if runs.is_relative_to(REPO) else str(runs)
    return nums, tables


def small_section(rep, runs: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Numbers (``small.*``) and the table (``scales``) of the two-scale section: the claims at RUNS's scale
    (``rep``) next to those at scale small, read from SMALL_RUNS (a ``reproduce_diloco.py --scale small`` folder,
    which may be partly run: its unfinished claims say so)."""
    from diloco_report import gap_and_agreement, gap_by_h, load, scales_markdown

    small = load(runs)
    ok = small.runs[small.runs["status"] == "ok"]
    nums = {
        "small.description": small.plan["description"],
        "small.n_runs": str(len(small.runs)),
        "small.n_ok": str(len(ok)),
        "small.seeds": ", ".join(str(s) for s in sorted(set(ok["seed"]))) or "none",
        "small.cpu_minutes": f"{ok['wall_seconds'].sum() / 60:.0f}",
        "small.params": f"{count_params(small) / 1e6:.2f}M" if (ok["variant"] == "diloco").any() else "-",
        "small.runs_dir": str(runs.relative_to(REPO)) if runs.is_relative_to(REPO) else str(runs),
    }
    # where DiLoCo's gap to DDP opens and how much its workers agree, at scale small and, to compare, RUNS's
    for name, r in (("small", small), ("small.vs", rep)):
        g = gap_and_agreement(r) or {}
        nums[f"{name}.seeds_paired"] = str(g.get("seeds", 0))
        for key, fmt in (("gap_first", "{:+.2%}"), ("gap_last", "{:+.2%}"), ("gap_first_step", "{:.0f}"),
                         ("cosine", "{:.2f}"), ("norm_ratio", "{:.2f}"), ("K", "{:.0f}")):  # fmt: skip
            nums[f"{name}.{key}"] = fmt.format(g[key]) if g else "-"
        nums[f"{name}.gap_share"] = f"{g['gap_first'] / g['gap_last']:.0%}" if g.get("gap_last") else "-"
        nums[f"{name}.gap_by_h"], nums[f"{name}.gap_by_h_trend"] = gap_by_h(r)
    nums["small.vs.scale"] = rep.plan["scale"]
    nums["small.H"] = str(small.scale["H"])
    nums["small.orthogonal"] = f"{1 / math.sqrt(small.scale['workers']):.2f}"
    reps = {rep.plan["scale"]: rep, small.plan["scale"]: small}  # one column if RUNS is itself a small run
    return nums, {"scales": scales_markdown(reps)}


def count_params(rep, variant: str = "diloco") -> int:
    """Parameters of the reference run's (``variant``'s) model, built on the meta device (no memory, any size)."""
    import torch

    from locoswarm.model import GPT, GPTShape

    r = rep.runs[(rep.runs["variant"] == variant) & (rep.runs["status"] == "ok")].iloc[0]
    with torch.device("meta"):
        shape = GPTShape(n_layer=int(r["model.n_layer"]), n_head=int(r["model.n_head"]), d_model=int(r["model.d_model"]),
                         seq_len=int(r["model.seq_len"]), vocab_size=256 if r["data.tokenizer"] == "byte" else 50257,
                         dropout=0.0)  # fmt: skip
        return GPT(shape).num_params()


def build(
    runs: Path,
    out: Path,
    streaming_runs: Path,
    attacks_runs: Path,
    heterogeneous_runs: Path,
    swarm_runs: Path,
    netem_swarm_runs: Path,
    small_runs: Path,
) -> Path:
    from diloco_report import claims, claims_markdown, figures, load, numbers, study_tables, to_markdown
    from pdf import render

    rep = load(runs)
    tables = study_tables(rep)
    c = claims(rep, tables)
    nums = numbers(rep, tables, c)
    nums["params"] = f"{count_params(rep) / 1e6:.2f}M"
    nums["runs_dir"] = str(runs.relative_to(REPO)) if runs.is_relative_to(REPO) else str(runs)
    md_tables = {s: to_markdown(t) for s, t in tables.items()}
    md_tables["claims"] = claims_markdown(c, rep.plan["scale"])
    md_tables["setup"] = setup_table(rep, nums)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(exist_ok=True)
    for section, section_runs in [(streaming_section, streaming_runs), (attacks_section, attacks_runs),
                                  (heterogeneous_section, heterogeneous_runs), (swarm_section, swarm_runs),
                                  (netem_swarm_section, netem_swarm_runs)]:  # fmt: skip
        section_nums, section_tables = section(section_runs, out)
        nums.update(section_nums)
        md_tables.update(section_tables)
    small_nums, small_tables = small_section(rep, small_runs)
    nums.update(small_nums)
    md_tables.update(small_tables)
    for name, text in md_tables.items():
        (out / "tables" / f"{name}.md").write_text(text + "\n")
    for study, t in tables.items():
        t.to_csv(out / "tables" / f"{study}.csv", index=False)
    c.to_csv(out / "tables" / "claims.csv", index=False)
    (out / "numbers.json").write_text(json.dumps(nums, indent=2) + "\n")
    figures(rep, tables, out / "figures")
    text = fill((HERE / "report.md").read_text(), nums, md_tables)
    (out / "report.md").write_text(text)
    pdf = render(text, out / "report.pdf", base_dir=out, title="locoswarm: DiLoCo reproduced")
    print(f"paper: {pdf} ({pdf.stat().st_size / 1e3:.0f} kB) from {runs}: {nums['claims_held']} of "
          f"{nums['claims_total']} claims held at scale {nums['scale']}")  # fmt: skip
    return pdf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build paper/report.pdf from a reproduce_diloco.py output folder.")
    p.add_argument("--runs", default="results/ci", help="a reproduce_diloco.py --out folder (default: committed ci)")
    p.add_argument("--streaming-runs", default="results/streaming_ci",
                   help="a reproduce_streaming.py --out folder (default: committed ci)")  # fmt: skip
    p.add_argument("--attacks-runs", default="results/attacks_ci",
                   help="a reproduce_attacks.py --out folder (default: committed ci)")  # fmt: skip
    p.add_argument("--heterogeneous-runs", default="results/heterogeneous_ci",
                   help="a reproduce_heterogeneous.py --out folder (default: committed)")  # fmt: skip
    p.add_argument("--swarm-runs", default="results/swarm_ci",
                   help="a reproduce_swarm.py --out folder (default: committed)")  # fmt: skip
    p.add_argument("--netem-swarm-runs", default="results/netem_swarm",
                   help="an experiments/netem_swarm_study.py --out folder (default: committed)")  # fmt: skip
    p.add_argument("--small-runs", default="results/small",
                   help="a reproduce_diloco.py --scale small --out folder, whole or partly run (default: committed)")  # fmt: skip
    p.add_argument("--out", type=Path, default=HERE / "build")
    args = p.parse_args(argv)
    build(resolve_runs(args.runs), args.out.resolve(), resolve_runs(args.streaming_runs),
          resolve_runs(args.attacks_runs), resolve_runs(args.heterogeneous_runs), resolve_runs(args.swarm_runs),
          resolve_runs(args.netem_swarm_runs), resolve_runs(args.small_runs))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
