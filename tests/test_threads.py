"""The entry points make OpenMP threads sleep while they wait, unless the user chose otherwise."""

from __future__ import annotations

import os

from cryomamba.cli import main
from cryomamba.threads import quiet_openmp


def test_passive_waiting_is_the_default_and_a_users_choice_is_kept(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    quiet_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    quiet_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_command_line_sets_it_before_anything_else(monkeypatch, capsys):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["--version"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert capsys.readouterr().out.strip()
