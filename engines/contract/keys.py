"""Redis names of the wire contract: every key and channel gateways and engines share.

Part of the sealed contract package (``engines.contract``); imports nothing of the project.
"""

from __future__ import annotations

#: Consumer group every engine of a model joins on that model's job stream.
ENGINE_GROUP = "engines"


class Keys:
    """Every Redis key and channel name Conduit uses, in one place.

    Names carry a hash tag (``{...}``) so that keys that are used together land in the
    same Redis Cluster slot.
    """

    def __init__(self, prefix: str = "conduit") -> None:
        self.prefix = prefix
        #: ZSET engine_id -> heartbeat expiry (ms since epoch).
        self.engines = f"{prefix}:{{registry}}:engines"
        #: HASH engine_id -> msgpack EngineInfo.
        self.engine_info = f"{prefix}:{{registry}}:engine-info"
        #: HASH model -> last time (ms) any engine served it; tells "down" from "unknown".
        self.models_seen = f"{prefix}:{{registry}}:models-seen"
        #: Pub/Sub channel: job ids whose client went away.
        self.cancel_channel = f"{prefix}:cancel"
        #: STRING: INCRed on every API key change; gateways poll it to drop their key caches.
        self.keys_version = f"{prefix}:{{keys}}:version"
        #: SET of every API key id (``conduit keys list`` without a SCAN; same slot as the records).
        self.keys_index = f"{prefix}:{{keys}}:index"
        #: Pub/Sub channel: the new ``keys_version`` after each key change (a fast path; polling suffices).
        self.keys_changed = f"{prefix}:keys-changed"

    def jobs(self, model: str) -> str:
        """The job stream of one model (one consumer group, every engine of it consumes)."""
        return f"{self.prefix}:jobs:{{{model}}}"

    def engine_jobs(self, model: str, engine_id: str) -> str:
        """The stream of ``model``'s jobs addressed to one engine (``JobOptions.engine``), read by that engine
        only; the model's hash tag, so one script can move a job between it and :meth:`jobs`."""
        return f"{self.prefix}:jobs:{{{model}}}:engine:{engine_id}"

    def result(self, response_id: str) -> str:
        """STREAM: the result record of one background response: every event of the job that computes it
        (``JobOptions.result`` names this stream), in order, as its reply stream gets them. The gateway
        creates it, with an expiry, before it queues the job; engines only append to it (``APPEND``: never
        a stream they have not seen), so any gateway reads the response, from any event on (``seq``), after
        the one that submitted it is gone."""
        return f"{self.prefix}:result:{{{response_id}}}"

    def dead_letters(self, model: str) -> str:
        """Jobs that failed too many attempts, kept for inspection."""
        return f"{self.prefix}:dead:{{{model}}}"

    def replies(self, gateway_id: str) -> str:
        """The reply stream of one gateway process; its single reader demultiplexes it."""
        return f"{self.prefix}:replies:{{{gateway_id}}}"

    def reply_generation(self, gateway_id: str) -> str:
        """Which incarnation of a gateway's reply stream this is (``engines.contract.replies``)."""
        return f"{self.replies(gateway_id)}:gen"

    def job(self, model: str, job_id: str) -> str:
        """One job's key, alive from its submission until its engine acks it (or its deadline).

        The gateway creates it (``SET NX``) in the script that queues the job, so a resent
        submission never makes a second job; an engine sets it to ``OUTPUT_STARTED`` when a
        streaming job's first output is written, so a reclaimed job is failed, not re-run,
        once output may have reached its client; the engine deletes it with the job's ack. A
        gateway taking over an ``Idempotency-Key`` whose job is not (or no longer) queued sets it
        to ``FENCED``, so that job id is never queued after. Same hash tag as the model's job
        stream: one slot.
        """
        return f"{self.prefix}:job:{{{model}}}:{job_id}"

    def api_key(self, key_id: str) -> str:
        """One API key's record (msgpack ``KeyRecord``: its argon2id hash, never the secret)."""
        return f"{self.prefix}:{{keys}}:key:{key_id}"

    # ---- fair queueing (engines.contract.fairness): one slot per model, the job stream's ----------

    def wait(self, model: str, tenant: str) -> str:
        """LIST of the jobs of one tenant (API key id) waiting for an engine of ``model``."""
        return f"{self.wait_prefix(model)}{tenant}"

    def wait_prefix(self, model: str) -> str:
        """:meth:`wait` without the tenant: the promote script names the lists of the ring's tenants."""
        return f"{self.prefix}:wait:{{{model}}}:"

    def ring(self, model: str) -> str:
        """LIST of the tenants with jobs waiting for ``model``, served in turn from its head."""
        return f"{self.prefix}:ring:{{{model}}}"

    def fair_state(self, model: str) -> str:
        """HASH ``waiting`` (jobs in all wait lists of ``model``), ``turn`` (jobs the ring's
        head took in its current turn), ``n:<tenant>`` (the jobs counted for one tenant's list, so
        those that expired with it stop counting)."""
        return f"{self.prefix}:fair:{{{model}}}"

    def weights(self, model: str) -> str:
        """HASH tenant -> weight (``Job.priority``) of the tenants in the ring."""
        return f"{self.prefix}:weights:{{{model}}}"

    def tenant_backlog(self, model: str, tenant: str) -> str:
        """ZSET job id -> deadline (ms) of one tenant's jobs queued or running on ``model``: its
        share of the backlog. Added by the submit script, removed with the job's ack."""
        return f"{self.prefix}:tenant-backlog:{{{model}}}:{tenant}"

    def queued_bytes(self, model: str) -> str:
        """HASH ``total``, ``t:<tenant>``, ``s:<job id>``: the bytes of ``model``'s jobs queued or
        running (``engines.contract.backlog``)."""
        return f"{self.prefix}:queued-bytes:{{{model}}}"

    def queued_jobs(self, model: str) -> str:
        """ZSET job id -> deadline (ms) of the jobs counted in :meth:`queued_bytes`."""
        return f"{self.prefix}:queued-jobs:{{{model}}}"

    def image(self, ref: str) -> str:
        """One stored image (``ImageStore``), alive for its job's ``output_ttl_ms``, or one input of a
        job (``JobOptions.inputs``, an ``in_`` reference), alive until the job's deadline."""
        return f"{self.prefix}:image:{ref}"

    def rate_limits(self, key_id: str) -> tuple[str, str, str, str]:
        """One API key's rate-limit state (``gateway.tenancy.limits``): requests, tokens and
        images per second of the last minute (hashes, second -> count) and its requests in
        flight (ZSET request id -> expiry ms). One hash tag: one slot, one script sees all."""
        tag = f"{self.prefix}:{{rl:{key_id}}}"
        return f"{tag}:requests", f"{tag}:tokens", f"{tag}:images", f"{tag}:in-flight"

    def usage(self, key_id: str, day: str) -> str:
        """One API key's usage on one UTC day (``yyyymmdd``): a hash ``<model>|<counter>`` -> count."""
        return f"{self.prefix}:usage:{{{key_id}}}:{day}"

    def idempotency(self, key_id: str, digest: str) -> str:
        """One ``Idempotency-Key`` of one API key (``key_id``; "" without auth): a hash, state
        ``running`` (the claim: its lease, renewed by its owner, and its job) or ``done`` (the
        stored response, 24 h). ``digest`` is the SHA-256 of the client's header value, never
        the value itself. (``idem:`` named the string records of earlier versions.)"""
        return f"{self.prefix}:idempotency:{{{key_id}}}:{digest}"

    def idempotency_bytes(self, key_id: str) -> str:
        """The bytes of responses one API key stored in its current ``idempotency_ttl_s`` window
        (a counter, expiring with the window; ``gateway.tenancy.claims``). The records' hash tag."""
        return f"{self.prefix}:idempotency-bytes:{{{key_id}}}"

    def stored_response(self, key_id: str, response_id: str) -> str:
        """One stored response of one API key (``key_id``; "" without auth): the ``Response``, and the input
        items a ``previous_response_id`` continues from (``gateway.responses.store``), kept ``response_ttl_s``.
        The key's hash tag (``r:`` first: an empty tag, ``{}``, would hash the whole name, and the anonymous
        key's id is ""): one slot with its ledger (:meth:`stored_response_ledger`)."""
        return f"{self.prefix}:response:{{r:{key_id}}}:{response_id}"

    def response_charged(self, key_id: str, response_id: str) -> str:
        """Set (``NX``) by the gateway that charges a background response's usage to its key, once, when
        it stores its end (``gateway.responses.records``); expires with its result record. The key's
        hash tag, as its stored responses."""
        return f"{self.prefix}:response-charged:{{r:{key_id}}}:{response_id}"

    def stored_response_ledger(self, key_id: str) -> tuple[str, str]:
        """The live-bytes ledger of one API key's stored responses (``gateway.responses.store``): a ZSET
        response id -> expiry (ms, Redis's clock) and a HASH response id -> bytes with the field ``live``
        (their sum). The records' hash tag: one script saves a record and counts it. ``key_id``
        :data:`EVERY_KEY` names the gateway-wide ledger (members ``<key id>/<response id>``), in a slot of
        its own."""
        tag = f"{self.prefix}:response-ledger:{{r:{key_id}}}"
        return f"{tag}:expiry", f"{tag}:bytes"

#: The key id of the gateway-wide ledger of stored responses (``Keys.stored_response_ledger``): no API
#: key's id (12 hex digits, or "" without auth) has a ``*``.
EVERY_KEY = "*global*"

#: Value of a job key from its submission until a streaming job's output begins (``Keys.job``).
IN_QUEUE = b"q"
#: Value of a job key once a streaming job's output began (``Keys.job``).
OUTPUT_STARTED = b"o"
#: Value of the key of a job never queued, set by a gateway that took over its ``Idempotency-Key``
#: (``Keys.job``): the submission script then queues nothing under that id, until its deadline.
FENCED = b"f"
