"""The README's example runs and its key table lists every config key."""

import re
from pathlib import Path

from tokendrop.papers import PAPERS
from tokendrop.train.config import config_reference

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_python_example_runs(capsys):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    code = code.replace("for epoch in range(200):", "for epoch in range(2):")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.split("\n")
    assert out[0] == "166" and out[1] == "[137, 96, 67]"


def test_every_config_key_is_documented():
    for key, _, _ in config_reference():
        assert f"| `{key}` |" in README, key


def test_readme_names_every_paper():
    for p in PAPERS:
        assert f"**{p.key}**" in README and p.title in README, p.key
        assert not p.link or p.link.split(" (")[0] in README, p.key
    assert "seed 0" not in README.lower()
