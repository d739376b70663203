"""What the test helpers that run a server or a daemon have in common."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self


class Service:
    """Something a test starts and stops: ``with Thing(...) as thing:`` starts it, and stops it at the
    end whatever happened.  Subclasses define ``start`` (returning ``self``) and ``stop`` (safe to
    call twice)."""

    def start(self, *args: Any, **kwargs: Any) -> Self:
        raise NotImplementedError

    def stop(self) -> Any:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()
