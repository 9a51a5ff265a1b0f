"""Why torch's compile caches were bypassed, collected while a job starts.

A graph that Inductor's FX graph cache or the AOTAutograd cache will not hold (torch's own checks:
an unsupported operator, a custom pass, a value it cannot pickle) is compiled again at every start,
however warm the folder. torch says why only at INFO level, which a job does not show. While a
`BypassReasons` is attached, it takes those two loggers' INFO records, keeps the "Bypassing ..." and
"unable to ..." reasons with their counts, and hands every record of WARNING and above to torch's
handlers as before. A logger the user already shows at INFO (TORCH_LOGS) is left alone: the reasons
are then in the user's log.
"""

from __future__ import annotations

import logging
from collections import Counter

LOGGERS = ("torch._inductor.codecache", "torch._functorch._aot_autograd.autograd_cache")
_KEPT = ("Bypassing", "unable to")


class BypassReasons(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reasons: Counter[str] = Counter()
        self._attached: list[tuple[logging.Logger, int, bool]] = []

    def attach(self) -> "BypassReasons":
        for name in LOGGERS:
            logger = logging.getLogger(name)
            if logger.getEffectiveLevel() <= logging.INFO or self in logger.handlers:
                continue
            self._attached.append((logger, logger.level, logger.propagate))
            logger.setLevel(logging.INFO)
            logger.propagate = False  # its INFO records stop here; warnings are passed on in emit
            logger.addHandler(self)
        return self

    def detach(self) -> None:
        for logger, level, propagate in self._attached:
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate
        self._attached = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            # On to the handlers above the listened logger (which stops propagation), not above the
            # record's own logger: a child's parent is the listened logger, whose handler is this one.
            parent = self._listened(record.name).parent
            if parent is not None:
                parent.handle(record)
            return
        message = record.getMessage().strip()
        if any(key in message for key in _KEPT):
            self.reasons[" ".join(message.splitlines()[0].split())[:200]] += 1

    def _listened(self, name: str) -> logging.Logger:
        return next(logger for logger, _, _ in self._attached
                    if name == logger.name or name.startswith(logger.name + "."))

    def summary(self) -> str:
        """'; not cached: <reason> (x2); <reason>' or '' when nothing was bypassed."""
        if not self.reasons:
            return ""
        return "; not cached: " + "; ".join(f"{reason}{f' (x{count})' if count > 1 else ''}"
                                            for reason, count in self.reasons.most_common(4))
