"""`peft-fast bench --ingest DIR`: file a GPU round's output folder into the repository.

1. copies the round's files into bench/results/<device>-<YYYYmmdd>/ (a new folder: -2, -3,
   ... when that day's exists);
2. regenerates README.md's headline section, between `<!-- bench:headline:start -->` and
   `<!-- bench:headline:end -->`, linking the folder and each figure;
3. rewrites peft_fast/ops/backend_table.json, the default table "auto" reads, from the
   round's LoRA rows (when the round timed the kernel backends);
4. appends the round's misses to bench/NOTES.md.

It works on a source checkout (never on an installed package): `repo` must hold README.md
with both markers, bench/NOTES.md and peft_fast/ops/. Dry-run (CPU) rounds are refused
unless `allow_cpu` (used by the tests).
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path

from .lora import backend_table_from_rows
from .report import headline_markdown, load_round, misses, stage_status
from .timing import device_slug

START = "<!-- bench:headline:start -->"
END = "<!-- bench:headline:end -->"
TABLE = Path("peft_fast/ops/backend_table.json")
NOTES = Path("bench/NOTES.md")
RESULTS = Path("bench/results")


def default_repo() -> Path:
    """The checkout this package was installed from (editable install), where bench/ lives."""
    return Path(__file__).resolve().parent.parent


def _check_repo(repo: Path) -> str:
    readme = repo / "README.md"
    for need in (readme, repo / NOTES, repo / TABLE.parent):
        if not need.exists():
            raise ValueError(
                f"repo {repo} is not a peft_fast source checkout: {need.relative_to(repo)} is missing "
                "(pass --repo with the repository's root)"
            )
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"{readme} must hold one {START} line followed by one {END} line")
    return text


def replace_headline(readme_text: str, section: str) -> str:
    """`readme_text` with everything between the markers replaced by `section`."""
    head, rest = readme_text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{section.rstrip()}\n{END}{tail}"


def ingest(round_dir: Path, repo: Path | None = None, allow_cpu: bool = False) -> Path:
    """File `round_dir` into `repo` (default: `default_repo()`); return the new results folder.

    Raises ValueError for a folder with no records, a CPU round (unless `allow_cpu`), or a
    repo that is not a source checkout with the README markers; nothing is written then."""
    repo = Path(repo) if repo is not None else default_repo()
    readme = _check_repo(repo)
    rnd = load_round(Path(round_dir))
    if not rnd.records:
        raise ValueError(f"round folder {round_dir} holds no benchmark record (*.json with suite and device)")
    if not rnd.is_gpu and not allow_cpu:
        raise ValueError(
            f"round folder {round_dir} is a CPU (dry-run) round on {rnd.device}: it measures no GPU numbers; "
            "pass --allow-cpu to file it anyway"
        )
    day = _dt.datetime.fromisoformat(rnd.date).strftime("%Y%m%d")
    base = f"{device_slug(rnd.device)}-{day}"
    dest = repo / RESULTS / base
    n = 2
    while dest.exists():
        dest = repo / RESULTS / f"{base}-{n}"
        n += 1
    dest.mkdir(parents=True)
    for path in sorted(Path(round_dir).iterdir()):
        if path.is_file():
            shutil.copy2(path, dest / path.name)
    rel = dest.relative_to(repo).as_posix() + "/"
    print(f"copied {sum(1 for _ in dest.iterdir())} files to {rel}")

    (repo / "README.md").write_text(replace_headline(readme, headline_markdown(rnd, rel)))
    print(f"README.md: headline section regenerated from {rel}")

    lora = rnd.part("lora")
    if rnd.is_gpu and lora is not None:
        source = rel + rnd.record_files.get("quick", rnd.record_files.get("lora", ""))
        table = backend_table_from_rows(lora["rows"], source, rnd.device)
        (repo / TABLE).write_text(json.dumps(table, indent=1) + "\n")
        print(f"{TABLE}: {len(table['entries'].get('lora_linear', {}))} shape classes from {source}")
    else:
        print(f"{TABLE}: unchanged (the round timed no kernel backends on a GPU)")

    found = misses(rnd)
    lines = [f"\n## GPU round: {rnd.device}, {rnd.date} (`{rel}`)\n", "Stages:"]
    lines += [f"- {s['stage']}: {stage_status(s)} ({s['seconds']} s)" for s in rnd.stages] or ["- (no stage list)"]
    lines += [f"- tests: {t}" for t in rnd.tests]
    lines += ["", "Misses:" if found else "Misses: none."]
    lines += [f"- {m}" for m in found]
    with (repo / NOTES).open("a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{NOTES}: {len(found)} misses appended")
    return dest
