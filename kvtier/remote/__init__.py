"""The remote tier and its server: wire protocol (protocol), clients (client for kvtier servers
over ZeroMQ, redis for Redis/Valkey), shared sharding (sharding), and the server (server, with
one TieredCache per namespace in store, their lifecycle in namespaces, and the bound on what
peers can make it hold in guard)."""
