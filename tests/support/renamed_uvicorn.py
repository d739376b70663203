"""``python -m tests.support.renamed_uvicorn serve ...``: ``python -m mirror`` on a uvicorn whose
httptools protocol renamed an attribute, as a future release might.

uvicorn's own ``httptools_impl`` module is compiled again from its source with
``expected_content_length`` renamed throughout (uvicorn itself keeps working) and put in its
place before the mirror starts: the mirror's start-up check must notice and fall back to
uvicorn's public path.  Only with one worker (``--workers 1``): workers start fresh interpreters.
"""

from __future__ import annotations

import inspect
import sys
import types

import uvicorn.protocols.http
import uvicorn.protocols.http.httptools_impl as real

RENAMED = ("expected_content_length", "content_length_left")


def install() -> None:
    source = inspect.getsource(real)
    assert RENAMED[0] in source, "nothing to rename: update this module with uvicorn"
    module = types.ModuleType(real.__name__)
    module.__file__ = real.__file__
    exec(compile(source.replace(*RENAMED), real.__file__ or real.__name__, "exec"), module.__dict__)
    sys.modules[real.__name__] = module
    uvicorn.protocols.http.httptools_impl = module  # type: ignore[attr-defined]


if __name__ == "__main__":
    install()
    from mirror.cli import main

    raise SystemExit(main())
