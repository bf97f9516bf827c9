"""What a GPU round's output folder says: its stages, its records, the headline numbers and
the misses. `gpu_round.sh` calls `python -m peft_fast_bench.report OUT` last (writes
OUT/summary.json, prints the short table); the ingester uses the same reading.

A round folder holds: stages.tsv (stage, exit status, seconds; written by gpu_round.sh),
tests.log and round.log, the JSON records of `--suite quick` and `--suite e2e` (PNGs beside
them), audit.json (`peft-fast audit --json`), and summary.json once this module has run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGE_SKIPPED = 99  # exit status gpu_round.sh records for a stage that does not apply (e.g. no audit yet)
TIMED_OUT = (124, 137)  # `timeout`'s statuses: the limit was reached (TERM, then KILL)
KERNEL_BACKENDS = ("triton", "triton_composite", "cuda")
PYTEST_RESULT = re.compile(r"^=*\s*(\d+ (passed|failed|skipped|error|errors|deselected|xfailed|xpassed)\b.*)$")


@dataclass
class Round:
    """The parsed content of one round folder."""

    folder: Path
    stages: list[dict[str, Any]] = field(default_factory=list)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # suite -> record
    record_files: dict[str, str] = field(default_factory=dict)  # suite -> file name
    figures: dict[str, str] = field(default_factory=dict)  # suite -> PNG file name
    tests: list[str] = field(default_factory=list)  # pytest's result lines
    audit: dict[str, Any] | None = None  # audit.json: its rows and findings

    @property
    def device(self) -> str:
        return next((r["device"] for r in self.records.values()), "unknown device")

    @property
    def is_gpu(self) -> bool:
        return bool(self.records) and all(r.get("kind") == "gpu" for r in self.records.values())

    @property
    def date(self) -> str:
        """The round's date (the earliest record's), ISO format."""
        return min((r["date"] for r in self.records.values()), default="")

    def part(self, suite: str) -> dict[str, Any] | None:
        """The record part of an op suite ("lora", "ia3", "sgmv"), inside the quick record or alone."""
        quick = self.records.get("quick")
        if quick is not None and suite in quick.get("parts", {}):
            return quick["parts"][suite]
        return self.records.get(suite)


def load_round(folder: Path) -> Round:
    """Read a round folder (see the module docstring); missing pieces are left empty."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"round folder {folder} does not exist")
    rnd = Round(folder)
    summary = folder / "summary.json"
    tsv = folder / "stages.tsv"
    if tsv.is_file():
        for line in tsv.read_text().splitlines():
            name, rc, seconds = line.split("\t")
            rnd.stages.append({"stage": name, "rc": int(rc), "seconds": int(seconds)})
    elif summary.is_file():
        rnd.stages = json.loads(summary.read_text()).get("stages", [])
    if (folder / "audit.json").is_file():
        rnd.audit = json.loads((folder / "audit.json").read_text())
    for path in sorted(folder.glob("*.json")):
        if path.name in ("summary.json", "audit.json"):
            continue
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "suite" in record and "device" in record:
            rnd.records[record["suite"]] = record
            rnd.record_files[record["suite"]] = path.name
            if path.with_suffix(".png").is_file():
                rnd.figures[record["suite"]] = path.with_suffix(".png").name
    log = folder / "tests.log"
    if log.is_file():
        rnd.tests = [
            m.group(1).rstrip("= ") for line in log.read_text().splitlines() if (m := PYTEST_RESULT.match(line))
        ]
    return rnd


def stage_status(stage: dict[str, Any]) -> str:
    """ok, skipped, timed out after N s, or failed (exit N)."""
    rc = stage["rc"]
    if rc == 0:
        return "ok"
    if rc == STAGE_SKIPPED:
        return "skipped"
    if rc in TIMED_OUT:
        return f"timed out after {stage['seconds']} s"
    return f"failed (exit {rc})"


def _fmt(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.2f}"


def _by_case(rows: list[dict], key: tuple[str, ...]) -> dict[tuple, dict[str, dict]]:
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cases.setdefault(tuple(r[k] for k in key), {})[r["variant"]] = r
    return cases


# (suite, case key, ratio field, variant columns: (heading, variant name))
OP_TABLES = {
    "lora": (("K", "N", "M", "r", "dropout"), "fwd_bwd_ratio",
             [("HF peft", "peft_fp32"), ("torch", "torch_bf16"), ("triton", "triton_bf16"), ("cuda", "cuda_bf16")]),
    "ia3": (("K", "N", "M", "feedforward"), "fwd_bwd_ratio",
            [("HF peft", "peft"), ("torch", "torch"), ("triton", "triton"), ("cuda", "cuda")]),
    "sgmv": (("phase", "K", "N", "tokens", "ranks", "popularity"), "ratio_to_linear",
             [("HF peft", "peft"), ("loop", "loop"), ("gather+bmm", "gather_bmm"), ("triton", "triton")]),
}  # fmt: skip
CPU_VARIANTS = {"peft_fp32": "peft_fp32", "torch_bf16": "torch_fp32"}  # a CPU record's names for the same columns


def _case_label(suite: str, case: tuple) -> str:
    if suite == "lora":
        K, N, M, r, p = case
        return f"LoRA {K}→{N}, {M} tokens, r={r}, p={p}"
    if suite == "ia3":
        K, N, M, ff = case
        return f"IA³ {K}→{N}, {M} tokens, {'feed-forward' if ff else 'attention'}"
    phase, K, N, tokens, ranks, pop = case
    return f"mixed {phase} {K}→{N}, {tokens} tokens, r={ranks}, {pop}"


def op_rows(rnd: Round, suite: str) -> list[tuple[str, float, list[float | None]]]:
    """Per case of an op suite: (label, bare linear ms, [ratio per OP_TABLES column])."""
    part = rnd.part(suite)
    if part is None:
        return []
    key, ratio, columns = OP_TABLES[suite]
    out = []
    for case, variants in _by_case(part["rows"], key).items():
        base = variants.get("linear")
        base_ms = (base.get("fwd_bwd_ms", base.get("fwd_ms")) if base else None) or math.nan
        values = []
        for _, name in columns:
            row = variants.get(name) or variants.get(CPU_VARIANTS.get(name, ""))
            values.append(row[ratio] if row else None)
        out.append((_case_label(suite, case), base_ms, values))
    return out


def e2e_rows(rnd: Round) -> list[dict]:
    """The e2e record's rows (empty when the round has none)."""
    return rnd.records.get("e2e", {}).get("rows", [])


def short_table(rnd: Round) -> str:
    """The plain-text table gpu_round.sh prints last."""
    lines = [f"GPU round on {rnd.device}, {rnd.date or 'no records'}", ""]
    lines += [f"  {s['stage']:<14} {stage_status(s):<24} {s['seconds']:>4} s" for s in rnd.stages]
    lines += [f"  tests: {t}" for t in rnd.tests]
    if rnd.audit is not None:
        lines.append(
            f"  audit: {len(rnd.audit.get('rows', []))} variants, {len(rnd.audit.get('findings', []))} findings"
        )
    for suite in OP_TABLES:
        rows = op_rows(rnd, suite)
        if not rows:
            continue
        heads = [h for h, _ in OP_TABLES[suite][2]]
        what = "fwd+bwd" if suite != "sgmv" else "forward"
        lines += ["", f"{suite}: {what} time / bare frozen linear"]
        lines.append(f"  {'case':<58} {'linear ms':>9} " + " ".join(f"{h:>10}" for h in heads))
        for label, base_ms, values in rows:
            lines.append(f"  {label:<58} {base_ms:>9.3f} " + " ".join(f"{_fmt(v):>10}" for v in values))
    rows = e2e_rows(rnd)
    if rows:
        lines += ["", "e2e training step", f"  {'variant':<15} {'tokens/s':>10} {'step/frozen':>11} {'peak MiB':>9}"]
        for r in rows:
            lines.append(
                f"  {r['variant']:<15} {r['tokens_per_s']:>10.0f} {r['step_ratio']:>11.2f} {r['peak_mib']:>9.0f}"
            )
    for miss in misses(rnd):
        lines.append(f"MISS: {miss}")
    return "\n".join(lines)


def headline_markdown(rnd: Round, link_prefix: str) -> str:
    """The README's headline section for this round: markdown tables, with each figure linked
    as `link_prefix + file name`."""
    torch_version = next((r["versions"].get("torch", "?") for r in rnd.records.values()), "?")
    out = [
        f"Measured on {rnd.device}, {rnd.date[:10]} (torch {torch_version}): medians with CUDA events, "
        "as ratios over the bare frozen linear layer of the same run (lower is better). "
        f"Records and logs: [`{link_prefix}`]({link_prefix}).",
        "",
    ]
    for suite in OP_TABLES:
        rows = op_rows(rnd, suite)
        if not rows:
            continue
        heads = [h for h, _ in OP_TABLES[suite][2]]
        what = "forward+backward" if suite != "sgmv" else "forward (inference)"
        out += [f"| {what} | bare linear (ms) | " + " | ".join(heads) + " |", "|---|---:|" + "---:|" * len(heads)]
        for label, base_ms, values in rows:
            out.append(f"| {label} | {base_ms:.3f} | " + " | ".join(_fmt(v) for v in values) + " |")
        out.append("")
    rows = e2e_rows(rnd)
    if rows:
        model = rnd.records["e2e"].get("model", {})
        out += [
            f"Training step, Llama-shaped model (hidden {model.get('hidden')}, {model.get('layers')} layers, "
            f"sequence {model.get('seq')}), LoRA r=16 on all linear layers:",
            "",
            "| variant | tokens/s | step time / frozen | peak memory (MiB) |",
            "|---|---:|---:|---:|",
        ]
        for r in rows:
            peak = "–" if math.isnan(r["peak_mib"]) else f"{r['peak_mib']:.0f}"
            out.append(f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['step_ratio']:.2f} | {peak} |")
        out.append("")
    figures = [f"[{suite}]({link_prefix}{name})" for suite, name in sorted(rnd.figures.items())]
    if figures:
        out.append("Figures: " + ", ".join(figures) + ".")
    return "\n".join(out).rstrip() + "\n"


def misses(rnd: Round) -> list[str]:
    """What the round shows falling short: failed or timed-out stages, the audit's findings,
    kernel backends left out or slower than the unfused torch composition or than HF peft, e2e variants that fail,
    train a different model (first loss) or run slower than HF peft."""
    found = [f"stage {s['stage']} {stage_status(s)}" for s in rnd.stages if s["rc"] not in (0, STAGE_SKIPPED)]
    found += [f"audit: {f}" for f in (rnd.audit or {}).get("findings", [])]
    for suite in ("lora", "ia3", "sgmv"):
        part = rnd.part(suite)
        if part is None:
            continue
        for backend, why in part.get("backends_left_out", {}).items():
            found.append(f"{suite}: backend {backend} did not run ({why})")
        key, ratio, _ = OP_TABLES[suite]
        tag = "_bf16" if suite == "lora" else ""
        for case, variants in _by_case(part["rows"], key).items():
            label = _case_label(suite, case)
            torch_row = variants.get(f"torch{tag}") or variants.get("loop" if suite == "sgmv" else "")
            peft_row = variants.get("peft_fp32" if suite == "lora" else "peft")
            for b in KERNEL_BACKENDS:
                row = variants.get(f"{b}{tag}")
                if row is None:
                    continue
                ours = f"{label}: {b} {row[ratio]:.2f}× linear"
                if torch_row is not None and row[ratio] > torch_row[ratio]:
                    found.append(f"{ours}, slower than the torch composition ({torch_row[ratio]:.2f}×)")
                if peft_row is not None and row[ratio] > peft_row[ratio]:
                    found.append(f"{ours}, slower than HF peft ({peft_row[ratio]:.2f}×)")
    e2e = rnd.records.get("e2e")
    if e2e is not None:
        for variant, error in e2e.get("errors", {}).items():
            found.append(f"e2e: {variant} failed: {error}")
        rows = {r["variant"]: r for r in e2e["rows"]}
        ref = rows.get("frozen")
        for name, r in rows.items():
            if ref is not None and abs(r["first_loss"] - ref["first_loss"]) > 2e-2 * abs(ref["first_loss"]):
                found.append(
                    f"e2e: {name}'s first loss {r['first_loss']:.4f} differs from the frozen model's "
                    f"{ref['first_loss']:.4f} (all start from B = 0: the same function)"
                )
        peft = rows.get("peft")
        for name in ("peft_fast_auto", "peft_patch"):
            if peft is not None and name in rows and rows[name]["tokens_per_s"] < peft["tokens_per_s"]:
                ours = rows[name]["tokens_per_s"]
                found.append(f"e2e: {name} {ours:.0f} tokens/s, slower than HF peft ({peft['tokens_per_s']:.0f})")
    return found


def write_summary(rnd: Round) -> Path:
    """OUT/summary.json: device, date, stages with their status, test results, misses, files."""
    path = rnd.folder / "summary.json"
    summary = {
        "device": rnd.device,
        "gpu": rnd.is_gpu,
        "date": rnd.date,
        "stages": [{**s, "status": stage_status(s)} for s in rnd.stages],
        "tests": rnd.tests,
        "records": rnd.record_files,
        "figures": rnd.figures,
        "misses": misses(rnd),
    }
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m peft_fast_bench.report OUT`: write OUT/summary.json, print the short table."""
    parser = argparse.ArgumentParser(prog="python -m peft_fast_bench.report", description=main.__doc__)
    parser.add_argument("out", type=Path, help="the round's output folder")
    args = parser.parse_args(argv)
    rnd = load_round(args.out)
    write_summary(rnd)
    print(short_table(rnd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
