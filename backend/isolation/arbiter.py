"""gunicorn's master for a backend forked from the backends' template: gunicorn's own, but it starts on
settings made once in the template, and a stop sees its workers end the moment they do.

gunicorn's master makes its settings (some 120 objects) and its command line's parser anew at every start:
~15 ms of a master's ~35 ms before it listens, which is on every wake's way. Every backend's are the same
until its own command line, configuration module and environment are read, so the template makes them once
(``BackendApplication.prepare``) and each fork starts from its own copy of them.

gunicorn's ``Arbiter.stop`` tells the workers to end, then looks for the ended ones every 0.1 s: a stop took
0.1 or 0.2 s however quickly the worker ended (in ~30 ms). The orchestrator stops a backend to put it to
sleep, and a wake that needs the room waits for that stop, and the room kept free for the next wakes is
sized by how long stops take. Here the master waits on the workers' pidfds instead, then lets gunicorn's
stop go on as it would (with nothing left to wait for).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from typing import ClassVar

import gunicorn.app.base as gunicorn_base
from gunicorn.app.wsgiapp import WSGIApplication
from gunicorn.arbiter import Arbiter
from gunicorn.config import Config

from backend.core.lifetime import wait_for_exit


class PromptArbiter(Arbiter):
    _graceful_stop = False

    def stop(self, graceful: bool = True) -> None:
        self._graceful_stop = graceful
        try:
            super().stop(graceful)
        finally:
            self._graceful_stop = False

    def kill_workers(self, sig: int) -> None:
        super().kill_workers(sig)
        if self._graceful_stop and sig == signal.SIGTERM:
            self._graceful_stop = False  # once: what gunicorn sends after its grace period is its own
            deadline = time.monotonic() + self.cfg.graceful_timeout
            for pid in list(self.WORKERS):
                wait_for_exit(pid, max(deadline - time.monotonic(), 0.0))
            self.reap_workers()


USAGE = "%(prog)s [OPTIONS] [APP_MODULE]"


class BackendApplication(WSGIApplication):
    """``gunicorn`` with ``sys.argv``'s arguments, under a ``PromptArbiter``: gunicorn's ``run`` (which reads
    its options first) makes the master it names in ``gunicorn.app.base``, and this process (a fork, a
    backend of its own) names this one there."""

    prepared: ClassVar[tuple[Config, argparse.ArgumentParser] | None] = None

    @classmethod
    def prepare(cls) -> None:
        """In the template: gunicorn's default settings and its parser, for every master forked from here."""
        config = Config(USAGE, prog="gunicorn")
        cls.prepared = (config, config.parser())

    def __init__(self) -> None:
        super().__init__(USAGE)

    def load_default_config(self) -> None:
        """The settings the template prepared, once (a reload makes new ones); read with this process's
        environment, which a fork adopts after the template made them."""
        prepared, BackendApplication.prepared = BackendApplication.prepared, None
        if prepared is None:
            super().load_default_config()
            return
        config, parser = prepared
        config.env_orig = os.environ.copy()
        config.parser = lambda: parser
        self.cfg = config

    def run(self) -> None:
        gunicorn_base.Arbiter = PromptArbiter
        super().run()


def prepare_for_forks() -> None:
    """gunicorn's settings, made once by the backends' template before it forks (``template.prepare_forks``)."""
    BackendApplication.prepare()
