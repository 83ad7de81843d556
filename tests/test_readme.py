"""The manual runs: every Python block and every shell command of README.md and docs/*.md is executed.

The pages are README.md, then the docs/*.md pages in the order the README links them (then any page
it does not link, by name; test_every_page_is_linked fails on those). They are parsed generically,
so a block or a page added later is covered without changing this file:
fenced blocks marked python are Python; fenced blocks marked bash/sh/shell, or unmarked blocks
whose every line is a command, are shell; so are inline code spans that are whole commands
(`python -m ...`, `torchrun ...`). Everything runs in document order, page after page, in one fresh
folder, as a reader following the manual would (a later block may use the files of an earlier one), with this
checkout's supermask on PYTHONPATH; configs/ and benchmarks/ are copied there, so nothing in the
checkout is written.

Scaled down, as a reader in a hurry would: training commands (supermask.train, imp, compare, tasks) get
`--epochs 1 --dataset synthetic`, compare's sweeps keep their first value, the training benchmark
trains on 512 images. Commands that cannot run here are skipped, each with its reason (SKIP: the
network, root, GPUs, ImageNet, a server, the test suite itself); a skipped command still counts
as covered. The run prints how many blocks it executed.

The commands run as written in a fresh clone: none writes (--out) into a folder or file the
checkout holds, such as the committed results under docs/ (the scripts beside them made those).
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s#]+)(#[^)\s]*)?\)")  # [text](target) and ![alt](target)


def pages() -> list[Path]:
    """README.md, then the docs/*.md pages in the order the README first links them, then the rest by name."""
    linked = [ROOT / m.group(1) for m in LINK.finditer(README.read_text())]
    docs = sorted((ROOT / "docs").glob("*.md"))
    ordered = [p for p in dict.fromkeys(linked) if p in docs]
    return [README, *ordered, *(p for p in docs if p not in ordered)]


PAGES = pages()

# (pattern searched in the command, why it is not run here). Keep this list short and explicit.
SKIP = [
    (r"^(python3? -m venv|\. \S*activate|pip install)\b", "creates a virtualenv / installs packages (network)"),
    (r"^sudo\b", "installs a system package (root, network)"),
    (r"-m pytest\b", "runs the test suite this test is part of"),
    (r"--nproc-per-node [3-9]|--nnodes|--dataset imagenet", "needs several GPUs or machines, or ImageNet on disk"),
    (r"supermask\.kernels\.aot", "compiles 212 GPU kernels ahead of time (many minutes; tests/test_kernels_aot.py)"),
    (r"^tensorboard\b", "starts a web server that runs until stopped"),
    (r"\.\.\.", "elided arguments in prose, not a complete command"),
]
TRAINING = ("supermask.train", "supermask.imp", "supermask.compare", "supermask.instability", "supermask.tasks")
SWEEPS = ("--seeds", "--ks", "--widths", "--imp-widths", "--controls", "--rewind-iters")  # first value only
BENCH_TRAIN_QUICK = ["--limit", "512", "--repeats", "1", "--skip-slow", "--warmup-steps", "2",
                     "--select-sizes", "1e3,1e4"]
COMMAND = re.compile(r"^([A-Z_]+=\S+\s+)*(python3?|torchrun|pip|sudo|tensorboard|\.)\s")
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")


@dataclass
class Item:
    page: str  # the page's path in the repository (README.md, docs/commands.md, ...)
    line: int
    kind: str  # "python" or "shell"
    text: str  # the code, or one command
    block: int  # index of the block (fenced block or inline span) over all pages it comes from
    skip: str | None = field(default=None)


def _commands(text: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, && split."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        while tokens:
            cut = tokens.index("&&") if "&&" in tokens else len(tokens)
            if tokens[:cut]:
                commands.append(" ".join(t if t in (">", ">>", "|") else shlex.quote(t) for t in tokens[:cut]))
            tokens = tokens[cut + 1:]
    return commands


def page_blocks(path: Path) -> list[list[Item]]:
    """The Python blocks and shell commands of one page, block by block, in document order."""
    text, page = path.read_text(), path.relative_to(ROOT).as_posix()
    found, spans = [], []
    for m in FENCE.finditer(text):
        lang, body = m.group(1).lower(), m.group(2)
        spans.append(m.span())
        line = text.count("\n", 0, m.start()) + 2
        if lang == "python":
            found.append((m.start(), [Item(page, line, "python", body, 0)]))
            continue
        lines = [ln for ln in body.replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if lang in ("bash", "sh", "shell") or (not lang and lines and all(COMMAND.match(ln + " ") for ln in lines)):
            found.append((m.start(), [Item(page, line, "shell", c, 0) for c in _commands(body)]))
    for m in INLINE.finditer(text):
        code = m.group(1)
        if any(a <= m.start() < b for a, b in spans) or not COMMAND.match(code + " ") or len(code.split()) < 2:
            continue  # (a bare `torchrun` or `tensorboard` in prose names the program)
        found.append((m.start(), [Item(page, text.count("\n", 0, m.start()) + 1, "shell", c, 0)
                                  for c in _commands(m.group(1))]))
    found.sort(key=lambda f: f[0])
    return [block_items for _, block_items in found]


def manual_items() -> tuple[list[Item], int]:
    """(every Python block and shell command of every page, in reading order; number of blocks)."""
    found = [block for page in PAGES for block in page_blocks(page)]
    items, seen = [], set()
    for block, block_items in enumerate(found):
        for item in block_items:
            if (item.kind, item.text) in seen:  # the same command again (prose repeats): run once
                continue
            seen.add((item.kind, item.text))
            item.block = block
            item.skip = next((why for pattern, why in SKIP if item.kind == "shell" and re.search(pattern, item.text)),
                             None)
            items.append(item)
    return items, len(found)


def scaled(command: str) -> str:
    """The command as the test runs it (see the module docstring)."""
    tokens = shlex.split(command.replace(" > ", " __REDIRECT__ "))
    tokens = [sys.executable if t in ("python", "python3") else t for t in tokens]
    if tokens and re.fullmatch(r"([A-Z_]+=\S+)", tokens[0]) is None and tokens[0] == "torchrun":
        tokens[0:1] = [sys.executable, "-m", "torch.distributed.run"]
    elif len(tokens) > 1 and tokens[1] == "torchrun":
        tokens[1:2] = [sys.executable, "-m", "torch.distributed.run"]

    def set_flag(flag, value):
        if flag in tokens:
            tokens[tokens.index(flag) + 1] = value
        else:
            tokens.extend([flag, value])

    module = next((tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "-m" and tokens[i + 1] in TRAINING), None)
    if module and "--evaluate" not in tokens:
        set_flag("--epochs", "1")
        set_flag("--dataset", "synthetic")
        for flag in SWEEPS:
            if flag in tokens:
                i = tokens.index(flag) + 1
                tokens[i] = tokens[i].split(",")[0]
    if any(t.endswith("benchmarks/bench_train.py") for t in tokens):
        tokens += BENCH_TRAIN_QUICK
    return " ".join(">" if t == "__REDIRECT__" else shlex.quote(t) for t in tokens)


ITEMS, N_BLOCKS = manual_items()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "configs", work / "configs")
    (work / "benchmarks").mkdir()
    for script in (ROOT / "benchmarks").glob("*.py"):
        shutil.copy(script, work / "benchmarks" / script.name)
    yield work
    ran = [i for i in ITEMS if i.skip is None]
    print(f"\n{len(PAGES)} pages: {N_BLOCKS} blocks with code ({len(ITEMS)} Python blocks and commands); ran "
          f"{len({i.block for i in ran})} blocks ({sum(i.kind == 'python' for i in ran)} Python blocks, "
          f"{sum(i.kind == 'shell' for i in ran)} commands); skipped {len(ITEMS) - len(ran)} commands")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["MPLBACKEND"] = "Agg"
    return env


# Every block in document order takes about 12 minutes on 2 shared cores: run with --slow (CI does).
@pytest.mark.slow
@pytest.mark.parametrize("item", ITEMS,
                         ids=[f"{i.page}:L{i.line}-{i.kind}-{i.text.split(chr(10))[0][:40]}" for i in ITEMS])
def test_readme_block_runs(item, workdir):
    if item.skip:
        pytest.skip(f"{item.page} line {item.line}: {item.skip}")
    if item.kind == "python":
        cmd = [sys.executable, "-c", item.text]
    else:
        cmd = ["bash", "-c", scaled(item.text)]
    done = subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (f"{item.page} line {item.line}: {cmd[-1]}\nexit {done.returncode}\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def test_the_parser_finds_every_kind_of_block():
    # the pages have Python blocks, shell blocks, unmarked command blocks and inline commands
    assert {i.kind for i in ITEMS} == {"python", "shell"}
    texts = [i.text for i in ITEMS]
    assert any(t.startswith("python -m supermask.compare") for t in texts)  # an unmarked fenced block
    assert any("OMP_NUM_THREADS=1 torchrun" in t for t in texts)
    assert "python -m supermask.imp --model fc --width 1 --dataset fashion-mnist --rounds 8 --epochs 10" in texts
    assert not any("frozen random weight" in t for t in texts)  # the diagram is no command
    assert scaled("python -m supermask.compare --epochs 10 --seeds 0,1 --ks 0.1,0.3") == shlex.join(
        [sys.executable, "-m", "supermask.compare", "--epochs", "1", "--seeds", "0", "--ks", "0.1", "--dataset",
         "synthetic"])
    assert _commands("a && b \\\n  c # note\n# comment\n") == ["a", "b c"]


@pytest.mark.parametrize("command", ["train", "imp", "compare", "export", "analyze", "runs"])
def test_help_shows_every_default(command):
    done = subprocess.run([sys.executable, "-m", f"supermask.{command}", "--help"], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    options = done.stdout.split("options:", 1)[1]
    entries = re.split(r"\n(?=  -)", options.strip("\n"))
    for entry in entries:
        if entry.lstrip().startswith("-h, --help"):
            continue
        assert "default" in entry, f"supermask.{command} --help: no default shown for\n{entry}"


@pytest.mark.slow
def test_results_json_holds_the_full_config(workdir):
    run = workdir / "runs" / "fm_ep_w2.5"  # written by docs/export.md
    if not (run / "results.json").is_file():
        pytest.skip("docs/export.md's commands did not run first")
    results = json.loads((run / "results.json").read_text())
    assert results["config"] == json.loads((run / "config.json").read_text())


def test_every_page_is_linked_from_the_readme():
    linked = {(ROOT / m.group(1)).resolve() for m in LINK.finditer(README.read_text())}
    unlinked = [p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_every_link_of_every_page_resolves():
    broken = []
    for page in PAGES:
        for m in LINK.finditer(page.read_text()):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def _tracked() -> set[str]:
    done = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("not a git checkout: which files a fresh clone holds is unknown")
    return set(done.stdout.splitlines())


def _written(command: str) -> list[str]:
    """The paths a shown command writes to: its --out, and the file after > or >>."""
    tokens = shlex.split(command)
    return [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t in ("--out", ">", ">>")]


def test_the_shown_commands_write_to_fresh_folders():
    # a reader's command must neither be refused nor overwrite what a fresh clone holds (the committed
    # results under docs/ were made by the scripts beside them, not by the pages' commands)
    tracked = _tracked()
    clashes = [f"{i.page} line {i.line}: {i.text}" for i in ITEMS if i.kind == "shell"
               for out in _written(i.text)
               if out.rstrip("/") in tracked or any(t.startswith(out.rstrip("/") + "/") for t in tracked)]
    assert not clashes, "commands writing into the checkout:\n" + "\n".join(clashes)
    assert _written("python -m supermask.analyze a b --out docs/analysis") == ["docs/analysis"]  # (the check bites)
    assert "docs/analysis/report.md" in tracked


def test_one_version():
    # the version is written once, in supermask/__init__.py; setup.py reads it without importing torch
    import supermask

    done = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == supermask.__version__
    assert (ROOT / "setup.py").read_text().count(supermask.__version__) == 0
