"""The README is a first visit that works: its two commands are CI's, its Trainer snippet runs, its callback table
lists every callback with its docs page, and its links lead somewhere. (The catalogue and the Extending examples
moved to the docs site: ``tests/test_docs.py``.)"""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_interp
from tests.conftest import tiny_classifier, tiny_datamodule

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _section(heading: str) -> str:
    text = _readme()
    match = re.search(rf"^## {re.escape(heading)}\s*$", text, flags=re.MULTILINE)
    assert match is not None, f"README.md has no '## {heading}' section"
    section = text[match.end() :]
    following = re.search(r"^## ", section, flags=re.MULTILINE)
    return section[: following.start()] if following else section


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)


def test_the_quickstart_commands_are_the_example_and_cis_test_command():
    blocks = [block.strip() for block in _blocks(_section("Quickstart"), "bash")]
    first = blocks[0]
    (second,) = (block for block in blocks if ".[test]" in block)
    assert first == "pip install -e . && python examples/quickstart.py"
    assert (ROOT / "examples" / "quickstart.py").is_file()
    install, test = (part.strip() for part in second.split("&&"))
    assert install == 'pip install -e ".[test]"'
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = [line.strip() for line in ci if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == test == "python -m pytest", "CI runs exactly README's test command, last"
    assert any(re.match(r'python -m pip install -e "\.\[test(,docs)?\]"', line) for line in commands)


def test_the_trainer_snippet_runs_and_writes_the_report(tmp_path):
    (source,) = _blocks(_section("Add it to your own Trainer"), "python")
    assert "ReportCallback()" in source and "max_epochs=10" in source and "L.Trainer(" in source
    # the same snippet, shorter and quieter: two epochs of a tiny model, logs under tmp_path
    source = source.replace("max_epochs=10", "max_epochs=2").replace("L.Trainer(", "L.Trainer(**_quiet, ")
    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(str(tmp_path), name="readme")
    namespace: dict[str, object] = {
        "__name__": "readme_snippet",
        "model": tiny_classifier(),
        "datamodule": tiny_datamodule(),
        "_quiet": {
            "logger": logger,
            "default_root_dir": str(tmp_path),
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "log_every_n_steps": 1,
        },
    }
    exec(compile(source, f"{README}#trainer", "exec"), namespace)  # our own README's snippet
    trainer = namespace["trainer"]
    assert isinstance(trainer, pl.Trainer) and trainer.current_epoch == 2
    logged = set(trainer.callback_metrics)
    for group in ("interp_saliency/", "interp_gradcam/", "interp_probe/", "interp_similarity/"):
        assert any(key.startswith(group) for key in logged), group
    assert (Path(logger.log_dir) / "report.html").is_file()


def _callback_rows(text: str) -> list[tuple[str, str]]:
    """(class name, link) of each row of the table whose header is ``| callback | what it shows |``."""
    lines = text.splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.replace(" ", "").startswith("|callback|whatitshows|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        first = line.strip().strip("|").split(" | ")[0].strip()
        match = re.fullmatch(r"\[`(\w+)`\]\(([^)]+)\)", first)
        assert match is not None, f"a callback row must start with [`Name`](page.md): {line!r}"
        rows.append((match.group(1), match.group(2)))
    return rows


def test_the_callback_table_lists_every_callback_with_its_page():
    public = {name: getattr(lightning_interp, name) for name in lightning_interp.__all__}
    exported = {name for name, value in public.items() if isinstance(value, type) and issubclass(value, pl.Callback)}
    assert "UnshardedWindow" in exported and "ReportCallback" in exported
    docs_index = ROOT / "docs" / "callbacks" / "index.md"
    for table, base in ((_readme(), ROOT), (docs_index.read_text(encoding="utf-8"), docs_index.parent)):
        rows = _callback_rows(table)
        assert [name for name, _ in rows if name not in exported] == [], "a row names no exported callback"
        assert sorted(name for name, _ in rows) == sorted(exported), "every exported callback has one row"
        for name, link in rows:
            page = base / link
            assert page.is_file(), f"{name}: {link} does not exist"
            # the page documents the callback itself: its options from its docstring
            assert f"::: lightning_interp.callbacks.{name}" in page.read_text(encoding="utf-8"), page


def test_every_relative_link_of_the_readme_exists():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _readme())
    relative = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert relative, "the README links to its docs"
    missing = [link for link in relative if not (ROOT / link).exists()]
    assert missing == [], f"README links to files that do not exist: {missing}"


def test_the_quickstarts_cpu_install_takes_torch_and_torchvision_from_one_index_then_the_project():
    """A CPU-only install: torch and torchvision from PyTorch's CPU index in one command (PyPI's torchvision is
    built against the CUDA torch and fails to import beside the CPU one), then the Quickstart's own command, which
    keeps them (issue 31, point 2)."""
    cpu = [b for b in _blocks(_section("Quickstart"), "bash") if "download.pytorch.org/whl/cpu" in b]
    assert len(cpu) == 1, "the Quickstart shows the CPU-only install once"
    for block in cpu:
        lines = [line.strip() for line in block.strip().splitlines()]
        assert lines[0] == "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
        assert lines[1] == "pip install -e . && python examples/quickstart.py"
