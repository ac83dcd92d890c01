"""The interface every engine kind implements, and the handle a job writes its output to."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from engines.contract.messages import ChoiceDelta, Generated, Job, Usage


class JobRejected(Exception):
    """The engine refuses a job with an OpenAI-shaped error (bad parameters, too long...).

    Raised by a backend before any output was produced; the gateway answers with
    ``status`` and the envelope built from the other fields (and ``Retry-After`` when
    ``retry_after_s`` says).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        code: str = "invalid_request",
        type: str = "invalid_request_error",
        param: str | None = None,
        retry_after_s: int = 0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.type = type
        self.param = param
        #: Seconds the client should wait before retrying (a 429's ``Retry-After``); 0: not said.
        self.retry_after_s = retry_after_s


class JobOutput(Protocol):
    """Where a backend writes one job's events; the worker batches them onto Redis."""

    def started(self) -> None:
        """Generation began (call once, before the first delta)."""

    def delta(self, choices: list[ChoiceDelta], usage: Usage | None = None, total: Generated | None = None) -> None:
        """New output for some choices; ``usage``: the usage so far as the client asked to see it per
        chunk; ``total``: the job's usage so far, every choice together (what it is charged if it
        never ends with ``done``: give it on every delta)."""

    async def image(self, data: bytes, *, index: int, format: str, width: int, height: int, seed: int,
                    partial: int | None = None, joined: bool = False, batch: int = 1) -> None:
        """One encoded image (final, or partial preview number ``partial``) of an image job:
        stored once in the image store, announced by an ``ImageReady`` event carrying its reference."""

    def embedded(self, index: int, vector: bytes) -> None:
        """Input ``index``'s embedding of an ``embedding`` job, as little-endian float32 bytes (one
        ``Embedded`` event; never streamed to a client before the job's ``done``)."""

    def done(self, usage: Usage) -> None:
        """The job finished successfully; nothing may follow."""

    async def inputs(self) -> list[bytes]:
        """The job's inputs by reference (``JobOptions.inputs``: an edit's pictures), read from the
        blob store in order; raises :class:`JobRejected` when one is gone."""

    async def fetch(self, url: str, param: str) -> bytes:
        """The picture at an http(s) ``url`` the request named (its ``param``), fetched under the
        engine's media policy (``engines.media``); raises :class:`JobRejected` for what it refuses."""


class Backend(Protocol):
    """One engine kind (vLLM, diffusers, synthetic) serving one or more models."""

    kind: str
    #: Job kinds it runs (``Job.kind``); the worker answers any other with a 501 ``Failed``.
    kinds: frozenset[str]
    models: list[str]
    max_concurrency: int
    max_model_len: int | None
    #: Characters of the longest vocabulary entry (None: no tokenizer; see ``EngineInfo``).
    max_chars_per_token: int | None
    #: Sequences it runs at once (None: not a sequence batcher; see ``EngineInfo``).
    max_sequences: int | None

    async def start(self) -> None:
        """Load the model(s); called once before any job."""

    async def run(self, job: Job, out: JobOutput) -> None:
        """Run one job to completion, writing events to ``out``.

        Cancelling the task running this coroutine must stop the work (abort the request
        in the engine); raise :class:`JobRejected` to refuse the job.
        """

    async def close(self) -> None:
        """Release the model(s)."""
