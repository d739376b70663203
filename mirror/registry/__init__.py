"""Repositories and their policies: one :class:`~mirror.registry.repository.Repository` protocol,
the namespace router that picks an implementation for a name (``namespaces``), the cached kind
(``cached`` over the pull-through policy, ``pullthrough``, ``links``, ``referrers``, ``flight``,
``failures``) and the pushed kind (``local``, ``uploads``); replicas of one mirror: the signature of
their requests to each other (``peers``) and their fills, one upstream fetch per digest among them
(``cluster``).

May import: ``spec``, ``config``, ``observe``, ``storage``, ``metadata``, ``upstream``,
``maintenance``.  Never HTTP: routes call it, not the other way round.
"""
