"""The sealed wire contract between gateways and engines.

Everything both sides of the queue must agree on lives here and nowhere else: the job and
event messages (:mod:`.messages`), the Redis names (:mod:`.keys`) and who may use which
(:mod:`.acl`: the Redis users per role), the connection and its one
mapping of Redis errors (:mod:`.lane`), what a refused or absent Redis is told as (:mod:`.reach`), the image/blob store (:mod:`.store`), and both halves of
the queue's Lua scripts (:mod:`.fairness`: submit and promote; :mod:`.backlog`: the bytes held;
:mod:`.replies`: the reply stream's life and the engines' appends), and the media policy both
sides apply to the URLs a request carries (:mod:`.media`).

The gateway imports only this package of ``engines``; this package imports nothing else of the
project and no ML library (import-linter's contracts in ``pyproject.toml`` enforce both).
"""
