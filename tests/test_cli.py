"""The command line itself: light --help, --version, quiet broken pipes, train --device, the papers listed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokendrop.cli import main
from tokendrop.papers import PAPERS
from tokendrop.train.config import load_config, shipped_configs

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["train", "eval", "plot", "demo", "configs", "bench"]
HEAVY = ("torch", "timm", "numpy", "torchvision", "matplotlib", "PIL", "sklearn")


def run_cli(*args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tokendrop", *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, env=env, cwd=ROOT, timeout=120)


def test_help_imports_nothing_heavy():
    """--help of the command and of every subcommand, in a fresh interpreter: no torch, timm or numpy loaded."""
    code = f"""
import sys
from tokendrop.cli import main
for argv in [["--help"]] + [[c, "--help"] for c in {COMMANDS!r}]:
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
print("LOADED", sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []"
    for c in COMMANDS:
        assert f"tokendrop {c}" in proc.stdout  # every usage line was printed


def test_version_matches_the_package():
    from tokendrop._version import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"tokendrop {__version__}"
    pyproject = (ROOT / "pyproject.toml").read_text()  # the wheel's version is read from the same module
    assert 'dynamic = ["version"]' in pyproject and 'version = { attr = "tokendrop._version.__version__" }' in pyproject
    import tokendrop

    assert tokendrop.__version__ == __version__


@pytest.mark.parametrize("args", [("configs",), ("--help",)])
def test_closed_pipe_exits_quietly(args):
    """The reader has gone before the first write (as `tokendrop configs | head -0`): exit 0, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = run_cli(*args, stdout=write_end)
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_pipe_closed_after_one_line():
    """`tokendrop configs | head -1` through a real shell pipeline: the first line arrives, no error follows."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", f"{sys.executable} -m tokendrop configs | head -1"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.split()[0] == shipped_configs()[0]


def test_train_device_reaches_the_config(tmp_path, monkeypatch):
    from tokendrop.train import trainer

    seen = {}

    def fake_train(cfg, out, resume=False, progress=True):
        seen["cfg"] = cfg
        return out

    monkeypatch.setattr(trainer, "train", fake_train)
    assert main(["train", "--config", "fashion_mnist_ptd", "--device", "cpu", "--out", str(tmp_path / "a")]) == 0
    assert seen["cfg"].run.device == "cpu"
    assert main(["train", "--config", "fashion_mnist_ptd", "--out", str(tmp_path / "b")]) == 0
    assert seen["cfg"].run.device == load_config("fashion_mnist_ptd").run.device == "auto"
    # --device wins over --set run.device, as a flag given for this run
    assert main(["train", "--config", "fashion_mnist_ptd", "--set", "run.device=auto", "--device", "cpu",
                 "--out", str(tmp_path / "c")]) == 0
    assert seen["cfg"].run.device == "cpu"


def test_train_bad_device_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", "fashion_mnist_ptd", "--device", "tpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device: 'tpu' is not a device" in err[0]
    assert not out.exists()


def test_configs_name_their_papers(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    keys = [p.key for p in PAPERS]
    listed = {}
    for line in out.splitlines()[:len(shipped_configs())]:
        name, reproduces = line.split(maxsplit=1)
        listed[name] = reproduces
        assert reproduces.startswith((*keys, "CPU-sized counterpart of cifar100_")), line
    assert sorted(listed) == shipped_configs()
    cited = [p for p in PAPERS if any(r.startswith(p.key) for r in listed.values())]
    assert {p.key for p in cited} == {"PTD report (Chaudhary)", "CTD (Chaudhary 2024)", "TNT (Rao et al. 2024)",
                                      "Which Tokens to Use? (Haurum et al.)", "TPC-ViT (Zhu)"}
    for p in cited:  # each cited paper with its title, authors and link
        assert f"  {p.key}: {p.citation()}" in out and p.title in out and p.link in out
    assert "seed" not in out.lower()

