"""Replicas from DNS: the ``dns:`` settings, the resolver, the refreshers and the name cache.

An upstream entry with ``resolve: true`` (A/AAAA) or ``srv:`` stands for the
addresses its name gives; :class:`~proxy.cluster.dns.refresh.Refresher` keeps
that set current (TTL-bounded refresh, backoff, ``max_stale``) and hands each
change to the upstream runtime, which applies it like a reload of that
upstream. Plain host names in replica URLs go through the same resolver and
the :class:`~proxy.cluster.dns.refresh.NameCache`.
"""

from proxy.cluster.options import DnsOptions

__all__ = ["DnsOptions"]
