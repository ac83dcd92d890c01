"""The local Redis Cluster the cluster tests run on: slots on every master, real failover."""

from __future__ import annotations

from redis.asyncio.cluster import RedisCluster

from tests.cluster import LocalCluster


async def test_keys_on_every_master_survive_a_failover(redis_cluster: LocalCluster) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3
    assert all(len(redis_cluster.replicas_of(m.port)) == 1 for m in masters)
    # One key per master: hash tags chosen until every master owns one.
    keys: dict[int, str] = {}
    tag = 0
    while len(keys) < len(masters):
        key = f"harness:{{{tag}}}"
        keys.setdefault(redis_cluster.master_for_key(key).port, key)
        tag += 1

    client = RedisCluster.from_url(redis_cluster.url)
    try:
        for key in keys.values():
            await client.xadd(key, {"v": key})
            # Replicated before the kill below. WAIT goes to the key's master only when told:
            # by default redis-py sends it to its default node.
            node = client.get_node_from_key(key)
            assert await client.execute_command("WAIT", 1, 1000, target_nodes=node) == 1
        victim = masters[0]
        assert client.get_node_from_key(keys[victim.port]).port == victim.port
        replica = redis_cluster.replicas_of(victim.port)[0]

        redis_cluster.kill_master(victim.port)
        redis_cluster.wait_failover()
        assert redis_cluster.master_for_key(keys[victim.port]).port == replica.port

        # The client finds the promoted replica by itself; nothing acknowledged was lost.
        for key in keys.values():
            entries = await client.xrange(key)
            assert [fields for _, fields in entries] == [{b"v": key.encode()}]
        assert client.get_node_from_key(keys[victim.port]).port == replica.port
    finally:
        await client.aclose()
        redis_cluster.heal()
    assert redis_cluster.replicas_of(replica.port) == [victim]  # the old master rejoined as a replica
