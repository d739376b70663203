"""Test-support layer for the mirror: real processes, real images, real faults.

Modules:

* :mod:`.procs` -- subprocess wrapper, free ports, HTTP readiness polling.
* :mod:`.images` -- build OCI / Docker images and indexes as files on disk.
* :mod:`.client` -- push and fetch images over the Registry HTTP API V2.
* :mod:`.catalog` -- the standard image set the session pushes upstream.
* :mod:`.accesslog` -- parse docker-registry's "response completed" log lines.
* :mod:`.matching` -- the path-matching rule shared by all request counters.
* :mod:`.registry` -- run ``docker-registry`` as an upstream or as a proxy.
* :mod:`.mirror` -- run the mirror under test as a subprocess.
* :mod:`.dockerd` -- run a private ``dockerd`` that pulls through a mirror.
* :mod:`.asgi` -- run an ASGI app on loopback in a background thread.
* :mod:`.faults` -- a forwarding proxy that injects HTTP faults.
* :mod:`.hub` -- a Docker Hub emulator (token auth, CDN redirects, rate limit).
"""
