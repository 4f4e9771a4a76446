"""The one exception type pccl raises for library failures."""

from __future__ import annotations

from pccl._types import Result


def _as_result(code: Result | int) -> Result:
    """A Result member for ``code``; an unknown number (a newer core?) counts as INTERNAL_ERROR."""
    if isinstance(code, Result):
        return code
    try:
        return Result(int(code))
    except ValueError:
        return Result.INTERNAL_ERROR


class PCCLError(Exception):
    """A library call failed; ``.result`` says how, so callers can retry on e.g. RANK_CONNECTION_LOST.

    ``detail`` is the core's human-readable reason (which peer, which address), kept apart from the
    code so that programs branch on ``.result`` and people read the message.
    """

    def __init__(self, result: Result | int, func_name: str, detail: str | None = None) -> None:
        self.result: Result = _as_result(result)
        self.func_name = func_name
        if self.result is Result.INTERNAL_ERROR and not isinstance(result, Result) and int(result) != 2:
            detail = f"unknown result code {int(result)}" + (f"; {detail}" if detail else "")
        self.detail = detail or None
        message = f"{func_name} failed: {self.result.name}"
        if self.detail:
            message += f" ({self.detail})"
        super().__init__(message)

    def __reduce__(self) -> tuple[type[PCCLError], tuple[Result, str, str | None]]:
        # Exception pickles its args (the message) by default, which does not match __init__:
        # rebuild from the fields so the error survives multiprocessing.
        return (type(self), (self.result, self.func_name, self.detail))

    @staticmethod
    def check(code: Result | int, func_name: str, detail: str | None = None) -> None:
        """Raise PCCLError unless ``code`` is SUCCESS."""
        if _as_result(code) is not Result.SUCCESS:
            raise PCCLError(code, func_name, detail)

