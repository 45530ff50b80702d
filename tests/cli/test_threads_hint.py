"""On a busy CPU, `opt` tells a person at a terminal that --threads 1 is often faster (once), and
says nothing when the machine is idle, --threads was given, or stderr is not a terminal."""

from __future__ import annotations

import os

import pytest

from opt_cli import options


class FakeBackend:
    def __init__(self):
        self.threads = None

    def set_threads(self, n):
        self.threads = n


@pytest.fixture
def two_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(options, "_HINTED", [])
    monkeypatch.setattr(options, "_at_a_terminal", lambda: True)


def test_a_busy_machine_gets_the_hint_once(two_cpus, monkeypatch, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (9.5, 9.0, 8.0))
    options.apply_threads(FakeBackend(), None)
    options.apply_threads(FakeBackend(), None)
    err = capsys.readouterr().err.splitlines()
    assert err == ["note: the CPUs are busy (load average 9.5 on 2); on a shared machine --threads 1 often runs "
                   "several times faster than the default"]


@pytest.mark.parametrize("load, threads", [((0.3, 0.2, 0.1), None), ((9.5, 9.0, 8.0), 1)])
def test_no_hint_when_idle_or_threads_given(two_cpus, monkeypatch, capsys, load, threads):
    monkeypatch.setattr(os, "getloadavg", lambda: load)
    backend = FakeBackend()
    options.apply_threads(backend, threads)
    assert capsys.readouterr().err == ""
    assert backend.threads == threads


def test_no_hint_for_a_script_reading_stderr(monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (9.5, 9.0, 8.0))
    monkeypatch.setattr(options, "_HINTED", [])
    options.apply_threads(FakeBackend(), None)  # capsys: stderr is not a terminal
    assert capsys.readouterr().err == ""
