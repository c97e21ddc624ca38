"""The node's template process: the daemon's modules imported once, one fork per pod.

A new interpreter importing the daemon's modules costs every pod ≈ 100 ms before its first
answer and ≈ 15 MiB of private memory (code objects, mostly); forked from a process that
already holds them, the daemon shares those pages with every other daemon (copy-on-write,
``gc.freeze()`` keeps the collector from touching them) and serves at once.

Life of a request (``start``'s fast path, :mod:`shim.binary.template_client`):

1. ``start`` connects to ``<template dir>/<digest>.sock`` (mode 0600; the peer must have the
   template's uid, SO_PEERCRED, and ``start``'s parent must be the template's containerd,
   else it is refused and logged) and sends its argv, environment, ``/proc/self/cgroup``,
   umask and stdin, with its working directory, stdout and stderr as file descriptors.
2. The template checks that its code on disk is still what it imported (the size and mtime of
   every module file it loaded, looked at only when inotify saw a change in their directories:
   :mod:`shim.template.codewatch`): if not, it stops serving (``start`` runs itself and
   launches a new template) and exits. Then it hands the connection (SCM_RIGHTS) to the
   *spare intermediate* it forked in advance, while no request was waiting, and forks the next
   spare: a spare serves one request and is never reused; an unused one exits when the
   template closes its channel (or dies). With no spare (a fork refused, the spare killed) the
   template forks the intermediate for the request, as it always could.
3. The intermediate becomes ``start``: its cgroups, environment, working directory, umask,
   stdout and stderr; if the ``[shim]`` table turns ``template`` off it declines. It runs
   :func:`shim.__main__.main` with ``launch`` = :func:`shim.template.child.fork_daemon`,
   which forks the daemon (setsid, stdio on /dev/null, every other descriptor closed, signal
   mask cleared, ``random`` reseeded, ``/proc/<pid>/cmdline`` and ``environ`` those of a
   spawned daemon).
   It answers ``ok <exit status> <daemon pid>`` and exits: the daemon is orphaned exactly as a
   daemon spawned by ``start`` is when ``start`` exits. The template reaps the intermediate.
   An intermediate that cannot do its part before ``start``'s work answers ``fallback
   <reason>``: ``start`` then runs itself.

Lifetime: the template watches its containerd (``start``'s parent, given on its command line)
through a pidfd and exits the moment it exits; SIGTERM or SIGINT stops it too (through the
signal module's wakeup pipe, polled with the rest: a handler that raised could be lost in a
fork). One template per (containerd address, code identity): a lock file held for its whole
life makes concurrent launches race-free (the losers exit at once). No thread, no event loop
ever exists in the template (fork with either is unsafe): it waits with ``poll``.
"""
