"""Error types that the CLI turns into one line on stderr."""


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr with exit code 2, no traceback."""


class NotAvailable(UserError):
    """A feature that needs something this machine lacks (TensorRT, CUDA, NVML...)."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what} is not available here: {reason}")
        self.what = what
        self.reason = reason


class GateFailed(Exception):
    """A CI assertion (speedup, latency, regression) did not hold: exit code 1 with the reason."""


class TargetNotReached(UserError):
    """A measured latency target that pruning could not reach (exit 2 from `prune`; a failed bound in `optimize`)."""
