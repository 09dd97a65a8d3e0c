"""Errors SPARE raises. Each message names the offending input and what would be valid."""


class SpareInputError(ValueError):
    """A user-facing input is invalid (names the input and what is valid)."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss; nothing was written."""

    def __init__(self, step: int, value: float):
        super().__init__(
            f"training loss became non-finite ({value}) at step {step}; nothing was saved. "
            "Lower the learning rate, or use a float32/bfloat16 model instead of float16."
        )
        self.step = step
        self.value = value


class Cancelled(RuntimeError):
    """The caller's `should_stop` hook asked to stop; nothing was written."""
