"""Running the mirror under uvicorn: the ASGI application built in its lifespan (``app``), the
server's options and defences below the routes (``hardening``), uvicorn's httptools protocol with
request deadlines (``protocol``) and the zero-copy body path (``zerocopy``).  The only package
that knows uvicorn's internals, behind a start-up check that falls back to the public path.

May import: every other layer.
"""
