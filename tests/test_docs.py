"""The docs say what the code does: server flags and error codes in docs/server.md."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER_DOC = (ROOT / "docs" / "server.md").read_text()


def test_every_server_flag_is_documented_and_every_documented_flag_exists():
    from cryomamba.serve import add_server_arguments

    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    flags.discard("--help")
    documented = set(re.findall(r"^\| `(--[a-z-]+)`", SERVER_DOC, flags=re.M))
    documented |= set(re.findall(r"^\| `--[a-z-]+`, `(--[a-z-]+)`", SERVER_DOC, flags=re.M))
    documented |= {
        f.split()[0] for f in re.findall(r"^\| `(--[a-z-]+ [A-Z]+)`", SERVER_DOC, flags=re.M)
    }
    assert flags == documented


def test_every_error_code_the_server_raises_is_in_the_error_table():
    source = "\n".join(p.read_text() for p in (ROOT / "src/cryomamba/server").glob("*.py"))
    raised = set(re.findall(r'ApiError\(\s*\d{3},\s*"([a-z_]+)"', source))
    assert len(raised) > 20  # the pattern still finds the server's errors
    table = SERVER_DOC.split("## Errors", 1)[1].split("\n## ", 1)[0]
    missing = sorted(code for code in raised if f"`{code}`" not in table)
    assert not missing, f"codes missing from docs/server.md's error table: {missing}"
